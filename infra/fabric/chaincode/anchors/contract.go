// Package anchors is the Fabric chaincode that anchors signed checkpoints of Lucerna's audit log:
// the ledger accepts a checkpoint only if it extends the last one anchored for its origin.
package anchors

import (
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"github.com/hyperledger/fabric-contract-api-go/v2/contractapi"
)

// DefaultAdminMSP is the MSP whose members may register log keys unless configured otherwise.
const DefaultAdminMSP = "Org1MSP"

// World-state object types of the composite keys.
const (
	keyObject    = "lucerna.anchors.logkey" // [origin, key name] -> LogKey
	anchorObject = "lucerna.anchors.anchor" // [origin, zero-padded size] -> AnchorRecord
	latestObject = "lucerna.anchors.latest" // [origin] -> AnchorRecord
)

// LogKey is an ML-DSA-65 public key that a log origin signs its checkpoints with.
type LogKey struct {
	Origin       string `json:"origin"`
	KeyName      string `json:"keyName"`
	PublicKey    string `json:"publicKey"`
	KeyID        string `json:"keyId"`
	RegisteredBy string `json:"registeredBy"`
	TxID         string `json:"txId"`
	Timestamp    string `json:"timestamp"`
}

// AnchorRecord is a checkpoint as anchored on the ledger.
type AnchorRecord struct {
	Origin     string   `json:"origin"`
	TreeSize   uint64   `json:"treeSize"`
	RootHash   string   `json:"rootHash"`
	Checkpoint string   `json:"checkpoint"`
	SignedBy   []string `json:"signedBy"`
	TxID       string   `json:"txId"`
	Timestamp  string   `json:"timestamp"`
}

// AnchorContract is the "anchors" contract.
type AnchorContract struct {
	contractapi.Contract
	// AdminMSP is the MSP ID whose clients may register log keys; every endorsing peer must agree on it.
	AdminMSP string
}

// NewAnchorContract returns the contract named "anchors" with adminMSP (DefaultAdminMSP when empty).
func NewAnchorContract(adminMSP string) *AnchorContract {
	if adminMSP == "" {
		adminMSP = DefaultAdminMSP
	}
	c := &AnchorContract{AdminMSP: adminMSP}
	c.Name = "anchors"
	c.Info.Title = "Lucerna audit checkpoint anchors"
	c.Info.Version = "1.0.0"
	return c
}

// RegisterLogKey records an ML-DSA-65 public key of a log origin; only the admin MSP may call it.
func (c *AnchorContract) RegisterLogKey(
	ctx contractapi.TransactionContextInterface, origin, keyName, publicKeyBase64 string,
) (*LogKey, error) {
	mspID, err := ctx.GetClientIdentity().GetMSPID()
	if err != nil {
		return nil, fmt.Errorf("reading the caller's MSP ID: %w", err)
	}
	if mspID != c.AdminMSP {
		return nil, kindf(ErrForbidden, "only members of %s may register log keys, not %s", c.AdminMSP, mspID)
	}
	if err := validateOrigin(origin); err != nil {
		return nil, err
	}
	if !ValidKeyName(keyName) {
		return nil, invalidf("key name %q is empty or contains whitespace or '+'", keyName)
	}
	publicKey, err := base64.StdEncoding.Strict().DecodeString(publicKeyBase64)
	if err != nil || len(publicKey) != mldsa65.PublicKeySize {
		return nil, invalidf("public key must be the base64 of a %d-byte ML-DSA-65 public key", mldsa65.PublicKeySize)
	}
	// Re-encoded because the decoder skips line breaks: one key, one stored spelling.
	canonical := base64.StdEncoding.EncodeToString(publicKey)
	stub := ctx.GetStub()
	stateKey, err := stub.CreateCompositeKey(keyObject, []string{origin, keyName})
	if err != nil {
		return nil, invalidf("key name: %v", err)
	}
	existing, err := getJSON[LogKey](ctx, stateKey)
	if err != nil {
		return nil, err
	}
	if existing != nil {
		if existing.PublicKey != canonical {
			return nil, kindf(ErrConflict, "key %q of origin %q is already registered with another public key; keys are never replaced", keyName, origin)
		}
		return existing, nil
	}
	id := KeyID(keyName, publicKey)
	timestamp, err := txTimestamp(ctx)
	if err != nil {
		return nil, err
	}
	key := &LogKey{
		Origin: origin, KeyName: keyName, PublicKey: canonical, KeyID: hex.EncodeToString(id[:]),
		RegisteredBy: mspID, TxID: stub.GetTxID(), Timestamp: timestamp,
	}
	if err := putJSON(ctx, stateKey, key); err != nil {
		return nil, err
	}
	return key, nil
}

// LogKeys lists the keys registered for an origin, ordered by key name.
func (c *AnchorContract) LogKeys(ctx contractapi.TransactionContextInterface, origin string) ([]*LogKey, error) {
	if err := validateOrigin(origin); err != nil {
		return nil, err
	}
	iter, err := ctx.GetStub().GetStateByPartialCompositeKey(keyObject, []string{origin})
	if err != nil {
		return nil, fmt.Errorf("listing keys of origin %q: %w", origin, err)
	}
	defer iter.Close()
	keys := []*LogKey{}
	for iter.HasNext() {
		kv, err := iter.Next()
		if err != nil {
			return nil, fmt.Errorf("listing keys of origin %q: %w", origin, err)
		}
		var key LogKey
		if err := json.Unmarshal(kv.Value, &key); err != nil {
			return nil, fmt.Errorf("decoding key %q: %w", kv.Key, err)
		}
		keys = append(keys, &key)
	}
	return keys, nil
}

// Anchor records a signed checkpoint of origin if it extends the last anchored one.
// consistencyProofJSON is a JSON array of base64 hashes (RFC 9162 §2.1.4) from the last anchored
// checkpoint; it may be empty for the first anchor of an origin or a re-anchor of the same checkpoint.
func (c *AnchorContract) Anchor(
	ctx contractapi.TransactionContextInterface, origin, checkpointNote, consistencyProofJSON string,
) (*AnchorRecord, error) {
	if err := validateOrigin(origin); err != nil {
		return nil, err
	}
	note, err := ParseSignedNote(checkpointNote)
	if err != nil {
		return nil, err
	}
	checkpoint, err := ParseCheckpoint(note.Text)
	if err != nil {
		return nil, err
	}
	if checkpoint.Origin != origin {
		return nil, invalidf("checkpoint is for origin %q, not %q", checkpoint.Origin, origin)
	}
	signedBy, err := c.verifySignatures(ctx, origin, note)
	if err != nil {
		return nil, err
	}
	proof, err := ParseConsistencyProof(consistencyProofJSON)
	if err != nil {
		return nil, err
	}

	sizeKey, err := anchorKey(ctx, origin, checkpoint.TreeSize)
	if err != nil {
		return nil, err
	}
	atSize, err := getJSON[AnchorRecord](ctx, sizeKey)
	if err != nil {
		return nil, err
	}
	if atSize != nil {
		if atSize.RootHash == base64.StdEncoding.EncodeToString(checkpoint.RootHash) {
			return atSize, nil
		}
		return nil, inconsistentf("origin %q already anchored tree size %d with root %s; the ledger refuses a rewritten history",
			origin, checkpoint.TreeSize, atSize.RootHash)
	}
	latestKey, err := ctx.GetStub().CreateCompositeKey(latestObject, []string{origin})
	if err != nil {
		return nil, invalidf("origin: %v", err)
	}
	latest, err := getJSON[AnchorRecord](ctx, latestKey)
	if err != nil {
		return nil, err
	}
	if latest != nil {
		if checkpoint.TreeSize < latest.TreeSize {
			return nil, inconsistentf("tree size %d is smaller than the last anchored size %d of origin %q; the ledger refuses a rewritten history",
				checkpoint.TreeSize, latest.TreeSize, origin)
		}
		latestRoot, err := base64.StdEncoding.DecodeString(latest.RootHash)
		if err != nil {
			return nil, fmt.Errorf("decoding the anchored root of origin %q: %w", origin, err)
		}
		if err := VerifyConsistency(latest.TreeSize, checkpoint.TreeSize, latestRoot, checkpoint.RootHash, proof); err != nil {
			return nil, fmt.Errorf("checkpoint of size %d does not extend the anchored checkpoint of size %d: %w",
				checkpoint.TreeSize, latest.TreeSize, err)
		}
	}

	timestamp, err := txTimestamp(ctx)
	if err != nil {
		return nil, err
	}
	record := &AnchorRecord{
		Origin: origin, TreeSize: checkpoint.TreeSize, RootHash: base64.StdEncoding.EncodeToString(checkpoint.RootHash),
		Checkpoint: checkpointNote, SignedBy: signedBy, TxID: ctx.GetStub().GetTxID(), Timestamp: timestamp,
	}
	if err := putJSON(ctx, sizeKey, record); err != nil {
		return nil, err
	}
	if err := putJSON(ctx, latestKey, record); err != nil {
		return nil, err
	}
	return record, nil
}

// Latest returns the last checkpoint anchored for origin.
func (c *AnchorContract) Latest(ctx contractapi.TransactionContextInterface, origin string) (*AnchorRecord, error) {
	if err := validateOrigin(origin); err != nil {
		return nil, err
	}
	latestKey, err := ctx.GetStub().CreateCompositeKey(latestObject, []string{origin})
	if err != nil {
		return nil, invalidf("origin: %v", err)
	}
	record, err := getJSON[AnchorRecord](ctx, latestKey)
	if err != nil {
		return nil, err
	}
	if record == nil {
		return nil, kindf(ErrNotFound, "no checkpoint anchored for origin %q", origin)
	}
	return record, nil
}

// BySize returns the checkpoint of origin anchored with the given tree size.
func (c *AnchorContract) BySize(ctx contractapi.TransactionContextInterface, origin string, size uint64) (*AnchorRecord, error) {
	if err := validateOrigin(origin); err != nil {
		return nil, err
	}
	sizeKey, err := anchorKey(ctx, origin, size)
	if err != nil {
		return nil, err
	}
	record, err := getJSON[AnchorRecord](ctx, sizeKey)
	if err != nil {
		return nil, err
	}
	if record == nil {
		return nil, kindf(ErrNotFound, "no checkpoint of size %d anchored for origin %q", size, origin)
	}
	return record, nil
}

// verifySignatures returns the registered keys whose signature on the note verifies. Signatures by
// keys not registered for origin are skipped (C2SP notes may carry others, e.g. witnesses); a
// failing signature by a registered key refuses the note, and so does having no verified one.
func (c *AnchorContract) verifySignatures(
	ctx contractapi.TransactionContextInterface, origin string, note *SignedNote,
) ([]string, error) {
	signedBy := []string{}
	var seen []string
	for _, sig := range note.Signatures {
		seen = append(seen, fmt.Sprintf("%s+%x", sig.KeyName, sig.KeyID))
		stateKey, err := ctx.GetStub().CreateCompositeKey(keyObject, []string{origin, sig.KeyName})
		if err != nil {
			continue // a name that cannot be a state key was never registered
		}
		key, err := getJSON[LogKey](ctx, stateKey)
		if err != nil {
			return nil, err
		}
		if key == nil || key.KeyID != hex.EncodeToString(sig.KeyID[:]) {
			continue
		}
		publicKey, err := base64.StdEncoding.DecodeString(key.PublicKey)
		if err != nil {
			return nil, fmt.Errorf("decoding registered key %q: %w", key.KeyName, err)
		}
		if !VerifyMLDSA65(publicKey, []byte(note.Text), sig.Signature) {
			return nil, kindf(ErrSignature, "the ML-DSA-65 signature of registered key %q (id %s) does not verify", key.KeyName, key.KeyID)
		}
		if !slices.Contains(signedBy, key.KeyName) {
			signedBy = append(signedBy, key.KeyName)
		}
	}
	if len(signedBy) == 0 {
		return nil, kindf(ErrSignature, "no signature by a key registered for origin %q (signatures from: %s)",
			origin, strings.Join(seen, ", "))
	}
	return signedBy, nil
}

func validateOrigin(origin string) error {
	if origin == "" || !utf8.ValidString(origin) || strings.ContainsAny(origin, "\n\x00") {
		return invalidf("origin %q must be a non-empty single line", origin)
	}
	return nil
}

// anchorKey pads the size to 20 digits so a range over an origin's anchors runs in size order.
func anchorKey(ctx contractapi.TransactionContextInterface, origin string, size uint64) (string, error) {
	key, err := ctx.GetStub().CreateCompositeKey(anchorObject, []string{origin, fmt.Sprintf("%020d", size)})
	if err != nil {
		return "", invalidf("origin: %v", err)
	}
	return key, nil
}

// txTimestamp is the proposal's timestamp: the same on every endorser, unlike the local clock.
func txTimestamp(ctx contractapi.TransactionContextInterface) (string, error) {
	ts, err := ctx.GetStub().GetTxTimestamp()
	if err != nil {
		return "", fmt.Errorf("reading the transaction timestamp: %w", err)
	}
	return ts.AsTime().UTC().Format(time.RFC3339Nano), nil
}

func getJSON[T any](ctx contractapi.TransactionContextInterface, key string) (*T, error) {
	raw, err := ctx.GetStub().GetState(key)
	if err != nil {
		return nil, fmt.Errorf("reading world state: %w", err)
	}
	if raw == nil {
		return nil, nil
	}
	var value T
	if err := json.Unmarshal(raw, &value); err != nil {
		return nil, fmt.Errorf("decoding world state: %w", err)
	}
	return &value, nil
}

func putJSON(ctx contractapi.TransactionContextInterface, key string, value any) error {
	raw, err := json.Marshal(value)
	if err != nil {
		return fmt.Errorf("encoding world state: %w", err)
	}
	if err := ctx.GetStub().PutState(key, raw); err != nil {
		return fmt.Errorf("writing world state: %w", err)
	}
	return nil
}
