package anchors

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
)

// testTree is a reference RFC 6962 Merkle tree built the slow, obvious way, to check the verifier.
type testTree [][]byte

func leavesOf(n int) testTree {
	t := make(testTree, n)
	for i := range t {
		t[i] = fmt.Appendf(nil, "entry-%d", i)
	}
	return t
}

// largestPowerOfTwoBelow returns the largest power of two k with k < n (n >= 2).
func largestPowerOfTwoBelow(n int) int {
	k := 1
	for k*2 < n {
		k *= 2
	}
	return k
}

// root is MTH(D[n]) of RFC 6962 §2.1.
func (t testTree) root() []byte {
	switch len(t) {
	case 0:
		h := sha256.Sum256(nil)
		return h[:]
	case 1:
		h := sha256.Sum256(append([]byte{0x00}, t[0]...))
		return h[:]
	}
	k := largestPowerOfTwoBelow(len(t))
	return nodeHash(t[:k].root(), t[k:].root())
}

// consistency is PROOF(m, D[n]) of RFC 6962 §2.1.2.
func (t testTree) consistency(m int) [][]byte { return t.subproof(m, true) }

func (t testTree) subproof(m int, complete bool) [][]byte {
	n := len(t)
	if m == n {
		if complete {
			return nil
		}
		return [][]byte{t.root()}
	}
	k := largestPowerOfTwoBelow(n)
	if m <= k {
		return append(t[:k].subproof(m, complete), t[k:].root())
	}
	return append(t[k:].subproof(m-k, false), t[:k].root())
}

func proofJSON(t *testing.T, proof [][]byte) string {
	t.Helper()
	encoded := make([]string, len(proof))
	for i, h := range proof {
		encoded[i] = base64.StdEncoding.EncodeToString(h)
	}
	raw, err := json.Marshal(encoded)
	if err != nil {
		t.Fatal(err)
	}
	return string(raw)
}

func TestEmptyTreeRoot(t *testing.T) {
	// RFC 9162 §2.1.1: MTH({}) = SHA-256().
	want, _ := base64.StdEncoding.DecodeString("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=")
	if !bytes.Equal(testTree(nil).root(), want) || !bytes.Equal(emptyTreeHash[:], want) {
		t.Fatal("empty tree hash is not SHA-256 of nothing")
	}
}

// TestVerifyConsistencyAllSizes checks every pair of sizes up to 40: the true proof verifies, and
// each altered, shortened, lengthened or misattributed proof is refused.
func TestVerifyConsistencyAllSizes(t *testing.T) {
	const maxSize = 40
	full := leavesOf(maxSize)
	for n := 1; n <= maxSize; n++ {
		newTree := full[:n]
		newRoot := newTree.root()
		for m := 1; m < n; m++ {
			oldRoot := full[:m].root()
			proof := newTree.consistency(m)
			if err := VerifyConsistency(uint64(m), uint64(n), oldRoot, newRoot, proof); err != nil {
				t.Fatalf("%d -> %d: valid proof refused: %v", m, n, err)
			}
			for i := range proof {
				bad := cloneProof(proof)
				bad[i][0] ^= 0x01
				mustBeInconsistent(t, fmt.Sprintf("%d -> %d, hash %d flipped", m, n, i),
					VerifyConsistency(uint64(m), uint64(n), oldRoot, newRoot, bad))
			}
			mustBeInconsistent(t, fmt.Sprintf("%d -> %d, last hash dropped", m, n),
				VerifyConsistency(uint64(m), uint64(n), oldRoot, newRoot, proof[:len(proof)-1]))
			mustBeInconsistent(t, fmt.Sprintf("%d -> %d, extra hash", m, n),
				VerifyConsistency(uint64(m), uint64(n), oldRoot, newRoot, append(cloneProof(proof), newRoot)))
			mustBeInconsistent(t, fmt.Sprintf("%d -> %d, other new root", m, n),
				VerifyConsistency(uint64(m), uint64(n), oldRoot, full[:n-1].root(), proof))
			mustBeInconsistent(t, fmt.Sprintf("%d -> %d, other old root", m, n),
				VerifyConsistency(uint64(m), uint64(n), full[1:m+1].root(), newRoot, proof))
			if m+1 < n {
				mustBeInconsistent(t, fmt.Sprintf("%d -> %d, proof claimed from %d", m, n, m+1),
					VerifyConsistency(uint64(m+1), uint64(n), full[:m+1].root(), newRoot, proof))
			}
		}
	}
}

func TestVerifyConsistencyEdgeCases(t *testing.T) {
	tree := leavesOf(5)
	root := tree.root()
	if err := VerifyConsistency(5, 5, root, root, nil); err != nil {
		t.Fatalf("equal trees: %v", err)
	}
	mustBeInconsistent(t, "equal sizes, other roots", VerifyConsistency(5, 5, root, leavesOf(4).root(), nil))
	mustBeInconsistent(t, "equal sizes, non-empty proof", VerifyConsistency(5, 5, root, root, [][]byte{root}))
	mustBeInconsistent(t, "shrinking", VerifyConsistency(5, 4, root, leavesOf(4).root(), nil))
	mustBeInconsistent(t, "growth without proof", VerifyConsistency(4, 5, leavesOf(4).root(), root, nil))
	if err := VerifyConsistency(0, 5, emptyTreeHash[:], root, nil); err != nil {
		t.Fatalf("from the empty tree: %v", err)
	}
	// The proof's shape must fit the sizes (RFC 9162 checks sn), not only its hashes the roots.
	four, eight := leavesOf(4), leavesOf(8)
	long := append(eight.consistency(4), eight.root())
	if err := VerifyConsistency(4, 8, four.root(), eight.root(), long); err == nil || !strings.Contains(err.Error(), "too many hashes") {
		t.Fatalf("a proof with an extra hash: %v", err)
	}
	if err := VerifyConsistency(4, 16, four.root(), eight.root(), eight.consistency(4)); err == nil || !strings.Contains(err.Error(), "too few hashes") {
		t.Fatalf("the proof 4 -> 8 claimed for 4 -> 16: %v", err)
	}
	mustBeInconsistent(t, "from the empty tree with a proof", VerifyConsistency(0, 5, emptyTreeHash[:], root, [][]byte{root}))
}

func TestParseConsistencyProof(t *testing.T) {
	if proof, err := ParseConsistencyProof(""); err != nil || proof != nil {
		t.Fatalf("empty string: %v %v", proof, err)
	}
	if proof, err := ParseConsistencyProof("[]"); err != nil || len(proof) != 0 {
		t.Fatalf("empty list: %v %v", proof, err)
	}
	for _, bad := range []string{`{"hashes": []}`, `["not base64!"]`, `["AAAA"]`, `[1]`} {
		if _, err := ParseConsistencyProof(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: want ErrInvalid, got %v", bad, err)
		}
	}
}

func cloneProof(proof [][]byte) [][]byte {
	out := make([][]byte, len(proof))
	for i, h := range proof {
		out[i] = bytes.Clone(h)
	}
	return out
}

func mustBeInconsistent(t *testing.T, what string, err error) {
	t.Helper()
	if !errors.Is(err, ErrInconsistent) {
		t.Fatalf("%s: want ErrInconsistent, got %v", what, err)
	}
}
