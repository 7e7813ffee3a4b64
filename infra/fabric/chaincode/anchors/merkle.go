package anchors

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"strings"
)

// emptyTreeHash is the RFC 9162 Merkle tree hash of the empty tree, SHA-256 of nothing.
var emptyTreeHash = sha256.Sum256(nil)

// nodeHash is the RFC 9162 §2.1.1 interior node hash H(0x01 || left || right).
func nodeHash(left, right []byte) []byte {
	h := sha256.New()
	h.Write([]byte{0x01})
	h.Write(left)
	h.Write(right)
	return h.Sum(nil)
}

// ParseConsistencyProof reads a JSON array of base64 SHA-256 hashes; an empty string means no proof.
func ParseConsistencyProof(proofJSON string) ([][]byte, error) {
	if strings.TrimSpace(proofJSON) == "" {
		return nil, nil
	}
	var encoded []string
	if err := json.Unmarshal([]byte(proofJSON), &encoded); err != nil {
		return nil, invalidf("consistency proof must be a JSON array of base64 hashes: %v", err)
	}
	proof := make([][]byte, len(encoded))
	for i, e := range encoded {
		h, err := base64.StdEncoding.Strict().DecodeString(e)
		if err != nil || len(h) != sha256.Size {
			return nil, invalidf("consistency proof hash %d is not the base64 of %d bytes", i, sha256.Size)
		}
		proof[i] = h
	}
	return proof, nil
}

// VerifyConsistency checks that the tree (newSize, newRoot) extends (oldSize, oldRoot), following
// the consistency proof verification of RFC 9162 §2.1.4.2 with SHA-256.
func VerifyConsistency(oldSize, newSize uint64, oldRoot, newRoot []byte, proof [][]byte) error {
	switch {
	case oldSize > newSize:
		return inconsistentf("tree size %d is smaller than %d", newSize, oldSize)
	case oldSize == newSize:
		if len(proof) != 0 {
			return inconsistentf("a proof between equal tree sizes must be empty")
		}
		if !bytes.Equal(oldRoot, newRoot) {
			return inconsistentf("same tree size %d with a different root hash", newSize)
		}
		return nil
	case oldSize == 0:
		// Every tree extends the empty tree; RFC 9162 defines no proof for it.
		if len(proof) != 0 {
			return inconsistentf("a proof from the empty tree must be empty")
		}
		return nil
	case len(proof) == 0:
		return inconsistentf("a consistency proof from size %d to %d is required", oldSize, newSize)
	}
	path := proof
	if oldSize&(oldSize-1) == 0 {
		// The old tree is a complete subtree of the new one, so its root starts the path.
		path = append([][]byte{oldRoot}, proof...)
	}
	fn, sn := oldSize-1, newSize-1
	for fn&1 == 1 {
		fn >>= 1
		sn >>= 1
	}
	fr, sr := path[0], path[0]
	for _, c := range path[1:] {
		if sn == 0 {
			return inconsistentf("consistency proof from size %d to %d has too many hashes", oldSize, newSize)
		}
		if fn&1 == 1 || fn == sn {
			fr = nodeHash(c, fr)
			sr = nodeHash(c, sr)
			for fn&1 == 0 && fn != 0 {
				fn >>= 1
				sn >>= 1
			}
		} else {
			sr = nodeHash(sr, c)
		}
		fn >>= 1
		sn >>= 1
	}
	if sn != 0 {
		return inconsistentf("consistency proof from size %d to %d has too few hashes", oldSize, newSize)
	}
	if !bytes.Equal(fr, oldRoot) {
		return inconsistentf("consistency proof does not lead to the anchored root of size %d", oldSize)
	}
	if !bytes.Equal(sr, newRoot) {
		return inconsistentf("consistency proof does not lead to the root of size %d", newSize)
	}
	return nil
}
