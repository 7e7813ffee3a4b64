package anchors

import (
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"github.com/hyperledger/fabric-contract-api-go/v2/contractapi"
)

const (
	testOrigin = "lucerna.local/audit-log"
	testKey    = testOrigin + "/key-1"
	adminMSP   = "Org1MSP"
)

// testSigner is a deterministic ML-DSA-65 key pair with its note key name.
type testSigner struct {
	name string
	pk   *mldsa65.PublicKey
	sk   *mldsa65.PrivateKey
}

func newSigner(name string, seedByte byte) testSigner {
	var seed [mldsa65.SeedSize]byte
	for i := range seed {
		seed[i] = seedByte
	}
	pk, sk := mldsa65.NewKeyFromSeed(&seed)
	return testSigner{name: name, pk: pk, sk: sk}
}

func (s testSigner) publicKeyBase64() string { return base64.StdEncoding.EncodeToString(s.pk.Bytes()) }

// line signs text and returns the C2SP signature line.
func (s testSigner) line(t *testing.T, text string) string {
	t.Helper()
	sig := make([]byte, mldsa65.SignatureSize)
	if err := mldsa65.SignTo(s.sk, []byte(text), nil, false, sig); err != nil {
		t.Fatal(err)
	}
	id := KeyID(s.name, s.pk.Bytes())
	return fmt.Sprintf("\u2014 %s %s\n", s.name, base64.StdEncoding.EncodeToString(append(id[:], sig...)))
}

func checkpointText(origin string, tree testTree) string {
	return fmt.Sprintf("%s\n%d\n%s\n", origin, len(tree), base64.StdEncoding.EncodeToString(tree.root()))
}

// signedCheckpoint is the signed note of tree's checkpoint, signed by each signer in turn.
func signedCheckpoint(t *testing.T, origin string, tree testTree, signers ...testSigner) string {
	t.Helper()
	text := checkpointText(origin, tree)
	note := text + "\n"
	for _, s := range signers {
		note += s.line(t, text)
	}
	return note
}

// fixture is a ledger with the contract and one registered key.
type fixture struct {
	t        *testing.T
	ledger   *fakeLedger
	contract *AnchorContract
	signer   testSigner
	tree     testTree
}

func newFixture(t *testing.T) *fixture {
	f := &fixture{t: t, ledger: newFakeLedger(), contract: NewAnchorContract(""), signer: newSigner(testKey, 1), tree: leavesOf(64)}
	if _, err := f.register(adminMSP, testOrigin, testKey, f.signer.publicKeyBase64()); err != nil {
		t.Fatalf("registering the test key: %v", err)
	}
	return f
}

func (f *fixture) register(msp, origin, name, pk string) (*LogKey, error) {
	ctx := f.ledger.tx(msp)
	key, err := f.contract.RegisterLogKey(ctx, origin, name, pk)
	if err == nil {
		ctx.commit()
	}
	return key, err
}

// anchor submits a note and commits it if accepted.
func (f *fixture) anchor(origin, note, proof string) (*AnchorRecord, error) {
	ctx := f.ledger.tx("Org2MSP")
	record, err := f.contract.Anchor(ctx, origin, note, proof)
	if err == nil {
		ctx.commit()
	}
	return record, err
}

// anchorSize anchors the checkpoint of the first n leaves, signed by the fixture's key.
func (f *fixture) anchorSize(n int, proof string) (*AnchorRecord, error) {
	return f.anchor(testOrigin, signedCheckpoint(f.t, testOrigin, f.tree[:n], f.signer), proof)
}

func (f *fixture) proof(from, to int) string { return proofJSON(f.t, f.tree[:to].consistency(from)) }

func (f *fixture) mustAnchor(n int, proof string) *AnchorRecord {
	f.t.Helper()
	record, err := f.anchorSize(n, proof)
	if err != nil {
		f.t.Fatalf("anchoring size %d: %v", n, err)
	}
	return record
}

// mustRefuse checks the error kind, a message fragment, and that the ledger did not change.
func (f *fixture) mustRefuse(kind error, fragment string, submit func() (*AnchorRecord, error)) {
	f.t.Helper()
	before := f.ledger.snapshot()
	record, err := submit()
	if !errors.Is(err, kind) || !strings.Contains(err.Error(), fragment) {
		f.t.Fatalf("want %v containing %q, got record %v, error %v", kind, fragment, record, err)
	}
	if !maps.EqualFunc(before, f.ledger.state, func(a, b []byte) bool { return string(a) == string(b) }) {
		f.t.Fatal("a refused transaction changed the world state")
	}
}

func (f *fixture) latest() *AnchorRecord {
	f.t.Helper()
	record, err := f.contract.Latest(f.ledger.tx("Org2MSP"), testOrigin)
	if err != nil {
		f.t.Fatalf("Latest: %v", err)
	}
	return record
}

func TestContractMetadataIsAccepted(t *testing.T) {
	// contractapi reflects the exported methods at start; an unsupported signature fails here, not on the peer.
	if _, err := contractapi.NewChaincode(NewAnchorContract("")); err != nil {
		t.Fatal(err)
	}
}

func TestFirstAnchor(t *testing.T) {
	f := newFixture(t)
	note := signedCheckpoint(t, testOrigin, f.tree[:7], f.signer)
	record, err := f.anchor(testOrigin, note, "")
	if err != nil {
		t.Fatal(err)
	}
	want := AnchorRecord{
		Origin: testOrigin, TreeSize: 7, RootHash: base64.StdEncoding.EncodeToString(f.tree[:7].root()),
		Checkpoint: note, SignedBy: []string{testKey}, TxID: "tx-0002", Timestamp: "2026-11-21T12:00:02Z",
	}
	if !recordEqual(*record, want) {
		t.Fatalf("record %+v, want %+v", *record, want)
	}
	if got := f.latest(); !recordEqual(*got, want) {
		t.Fatalf("Latest %+v", *got)
	}
	bySize, err := f.contract.BySize(f.ledger.tx("Org2MSP"), testOrigin, 7)
	if err != nil || !recordEqual(*bySize, want) {
		t.Fatalf("BySize: %+v %v", bySize, err)
	}
}

func TestConsistentGrowth(t *testing.T) {
	f := newFixture(t)
	f.mustAnchor(3, "")
	previous := 3
	for _, n := range []int{4, 7, 8, 13, 16, 17, 64} {
		record := f.mustAnchor(n, f.proof(previous, n))
		if record.TreeSize != uint64(n) || f.latest().TreeSize != uint64(n) {
			t.Fatalf("after anchoring %d: record %d, latest %d", n, record.TreeSize, f.latest().TreeSize)
		}
		previous = n
	}
	for _, n := range []int{3, 4, 7, 8, 13, 16, 17, 64} {
		record, err := f.contract.BySize(f.ledger.tx("Org2MSP"), testOrigin, uint64(n))
		if err != nil || record.RootHash != base64.StdEncoding.EncodeToString(f.tree[:n].root()) {
			t.Fatalf("BySize(%d): %+v %v", n, record, err)
		}
	}
	if _, err := f.contract.BySize(f.ledger.tx("Org2MSP"), testOrigin, 5); !errors.Is(err, ErrNotFound) {
		t.Fatalf("BySize of a size never anchored: %v", err)
	}
}

func TestGrowthFromTheEmptyTree(t *testing.T) {
	f := newFixture(t)
	f.mustAnchor(0, "")
	f.mustAnchor(5, "")
}

func TestReAnchorIsIdempotent(t *testing.T) {
	f := newFixture(t)
	first := f.mustAnchor(7, "")
	// A retry of the same checkpoint returns the record the first transaction wrote.
	again := f.mustAnchor(7, "")
	if !recordEqual(*again, *first) {
		t.Fatalf("re-anchor returned %+v, want the existing %+v", *again, *first)
	}
	f.mustAnchor(13, f.proof(7, 13))
	// An already anchored older checkpoint, retried late, still returns its record.
	if late := f.mustAnchor(7, ""); !recordEqual(*late, *first) {
		t.Fatalf("late retry returned %+v", *late)
	}
	if f.latest().TreeSize != 13 {
		t.Fatal("a retried older checkpoint moved the latest anchor back")
	}
}

func TestSmallerSizeRefused(t *testing.T) {
	f := newFixture(t)
	f.mustAnchor(13, "")
	f.mustRefuse(ErrInconsistent, "tree size 12 is smaller than the last anchored size 13", func() (*AnchorRecord, error) {
		return f.anchorSize(12, "")
	})
}

func TestSameSizeOtherRootRefused(t *testing.T) {
	f := newFixture(t)
	f.mustAnchor(8, "")
	rewritten := slices.Clone(f.tree[:8])
	rewritten[3] = []byte("a rewritten entry")
	f.mustRefuse(ErrInconsistent, "already anchored tree size 8 with root", func() (*AnchorRecord, error) {
		return f.anchor(testOrigin, signedCheckpoint(t, testOrigin, rewritten, f.signer), "")
	})
}

func TestBadProofRefused(t *testing.T) {
	f := newFixture(t)
	f.mustAnchor(7, "")
	proof := f.tree[:13].consistency(7)
	proof[1][5] ^= 0x40
	f.mustRefuse(ErrInconsistent, "does not extend the anchored checkpoint of size 7", func() (*AnchorRecord, error) {
		return f.anchorSize(13, proofJSON(t, proof))
	})
	f.mustRefuse(ErrInconsistent, "a consistency proof from size 7 to 13 is required", func() (*AnchorRecord, error) {
		return f.anchorSize(13, "")
	})
	f.mustRefuse(ErrInconsistent, "does not extend", func() (*AnchorRecord, error) {
		return f.anchorSize(13, f.proof(6, 13))
	})
	// A history rewritten below the anchored size: the new tree is well formed, its proof honest.
	rewritten := slices.Clone(f.tree[:13])
	rewritten[2] = []byte("a rewritten entry")
	f.mustRefuse(ErrInconsistent, "does not lead to the anchored root of size 7", func() (*AnchorRecord, error) {
		return f.anchor(testOrigin, signedCheckpoint(t, testOrigin, rewritten, f.signer), proofJSON(t, rewritten.consistency(7)))
	})
	f.mustRefuse(ErrInvalid, "JSON array", func() (*AnchorRecord, error) {
		return f.anchorSize(13, "not json")
	})
}

func TestForgedSignatureRefused(t *testing.T) {
	f := newFixture(t)
	note := signedCheckpoint(t, testOrigin, f.tree[:7], f.signer)
	forged := flipSignatureByte(t, note, 0)
	f.mustRefuse(ErrSignature, "does not verify", func() (*AnchorRecord, error) { return f.anchor(testOrigin, forged, "") })

	// The signature of size 7 under a text claiming size 8.
	altered := strings.Replace(note, "\n7\n", "\n8\n", 1)
	f.mustRefuse(ErrSignature, "does not verify", func() (*AnchorRecord, error) { return f.anchor(testOrigin, altered, "") })

	// A valid signature does not excuse a forged one by another registered key.
	second := newSigner(testOrigin+"/key-2", 2)
	if _, err := f.register(adminMSP, testOrigin, second.name, second.publicKeyBase64()); err != nil {
		t.Fatal(err)
	}
	forgedSecond := strings.Replace(signedCheckpoint(t, testOrigin, f.tree[:6], second), "\n6\n", "\n7\n", 1)
	mixed := note + forgedSecond[strings.Index(forgedSecond, "\n\n")+2:]
	f.mustRefuse(ErrSignature, testOrigin+"/key-2", func() (*AnchorRecord, error) { return f.anchor(testOrigin, mixed, "") })
}

func TestUnknownKeyRefused(t *testing.T) {
	f := newFixture(t)
	stranger := newSigner(testKey, 9) // the registered name, another key: another key ID
	f.mustRefuse(ErrSignature, "no signature by a key registered for origin", func() (*AnchorRecord, error) {
		return f.anchor(testOrigin, signedCheckpoint(t, testOrigin, f.tree[:7], stranger), "")
	})
	other := newSigner("elsewhere/key-1", 3)
	f.mustRefuse(ErrSignature, "elsewhere/key-1+", func() (*AnchorRecord, error) {
		return f.anchor(testOrigin, signedCheckpoint(t, testOrigin, f.tree[:7], other), "")
	})
	// A key registered for another origin does not sign for this one.
	if _, err := f.register(adminMSP, "elsewhere", other.name, other.publicKeyBase64()); err != nil {
		t.Fatal(err)
	}
	f.mustRefuse(ErrSignature, "no signature by a key registered", func() (*AnchorRecord, error) {
		return f.anchor(testOrigin, signedCheckpoint(t, testOrigin, f.tree[:7], other), "")
	})
	// Unknown signatures beside a registered one (a witness, say) are ignored.
	record, err := f.anchor(testOrigin, signedCheckpoint(t, testOrigin, f.tree[:7], stranger, f.signer), "")
	if err != nil || !slices.Equal(record.SignedBy, []string{testKey}) {
		t.Fatalf("note with an extra unknown signature: %+v %v", record, err)
	}
}

func TestMalformedNotesRefused(t *testing.T) {
	f := newFixture(t)
	good := signedCheckpoint(t, testOrigin, f.tree[:7], f.signer)
	sig := f.signer.line(t, checkpointText(testOrigin, f.tree[:7]))
	root := base64.StdEncoding.EncodeToString(f.tree[:7].root())
	cases := map[string]struct{ origin, note, fragment string }{
		"other origin":    {"other.origin", good, `checkpoint is for origin "lucerna.local/audit-log", not "other.origin"`},
		"no signatures":   {testOrigin, checkpointText(testOrigin, f.tree[:7]), "no blank line"},
		"extension line":  {testOrigin, testOrigin + "\n7\n" + root + "\nextra\n\n" + sig, "extension lines"},
		"leading zero":    {testOrigin, testOrigin + "\n07\n" + root + "\n\n" + sig, `tree size "07"`},
		"negative size":   {testOrigin, testOrigin + "\n-7\n" + root + "\n\n" + sig, `tree size "-7"`},
		"short root":      {testOrigin, testOrigin + "\n7\nAAAA\n\n" + sig, "root hash"},
		"bad dash":        {testOrigin, checkpointText(testOrigin, f.tree[:7]) + "\n- " + sig[len("\u2014 "):], "em dash"},
		"no final line":   {testOrigin, strings.TrimSuffix(good, "\n"), "does not end with a newline"},
		"control char":    {testOrigin, "\x01" + good, "control character"},
		"empty tree root": {testOrigin, testOrigin + "\n0\n" + root + "\n\n" + sig, "empty tree"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			sub := *f
			sub.t = t
			sub.mustRefuse(ErrInvalid, c.fragment, func() (*AnchorRecord, error) { return f.anchor(c.origin, c.note, "") })
		})
	}
}

func TestRegisterLogKey(t *testing.T) {
	f := newFixture(t)
	key, err := f.register(adminMSP, testOrigin, testKey, f.signer.publicKeyBase64())
	if err != nil || key.TxID != "tx-0001" {
		t.Fatalf("registering the same key again should return the first registration: %+v %v", key, err)
	}
	id := KeyID(testKey, f.signer.pk.Bytes())
	if key.KeyID != hex.EncodeToString(id[:]) || key.RegisteredBy != adminMSP {
		t.Fatalf("key record %+v", key)
	}
	other := newSigner(testKey, 5)
	f.mustRefuseRegistration(ErrConflict, "already registered with another public key", adminMSP, testOrigin, testKey, other.publicKeyBase64())
	f.mustRefuseRegistration(ErrForbidden, "only members of Org1MSP may register log keys, not Org2MSP", "Org2MSP", testOrigin, "x/key-2", other.publicKeyBase64())
	f.mustRefuseRegistration(ErrInvalid, "1952-byte ML-DSA-65 public key", adminMSP, testOrigin, "x/key-2", base64.StdEncoding.EncodeToString(make([]byte, 1312)))
	f.mustRefuseRegistration(ErrInvalid, "whitespace", adminMSP, testOrigin, "key 2", other.publicKeyBase64())
	f.mustRefuseRegistration(ErrInvalid, "non-empty single line", adminMSP, "", "x/key-2", other.publicKeyBase64())

	keys, err := f.contract.LogKeys(f.ledger.tx("Org2MSP"), testOrigin)
	if err != nil || len(keys) != 1 || keys[0].KeyName != testKey {
		t.Fatalf("LogKeys: %+v %v", keys, err)
	}

	// The admin MSP is configurable.
	custom := NewAnchorContract("AuditMSP")
	ctx := f.ledger.tx(adminMSP)
	if _, err := custom.RegisterLogKey(ctx, testOrigin, "x/key-3", other.publicKeyBase64()); !errors.Is(err, ErrForbidden) {
		t.Fatalf("Org1MSP registered with the admin MSP set to AuditMSP: %v", err)
	}
	if _, err := custom.RegisterLogKey(f.ledger.tx("AuditMSP"), testOrigin, "x/key-3", other.publicKeyBase64()); err != nil {
		t.Fatal(err)
	}
}

func (f *fixture) mustRefuseRegistration(kind error, fragment, msp, origin, name, pk string) {
	f.t.Helper()
	before := f.ledger.snapshot()
	_, err := f.register(msp, origin, name, pk)
	if !errors.Is(err, kind) || !strings.Contains(err.Error(), fragment) {
		f.t.Fatalf("want %v containing %q, got %v", kind, fragment, err)
	}
	if len(before) != len(f.ledger.state) {
		f.t.Fatal("a refused registration changed the world state")
	}
}

// katVector is a checkpoint signed on the Python side with pqcrypto (testdata/gen_kat.py).
type katVector struct {
	Origin    string   `json:"origin"`
	KeyName   string   `json:"keyName"`
	PublicKey string   `json:"publicKey"`
	KeyID     string   `json:"keyId"`
	Leaves    []string `json:"leaves"`
	TreeSize  uint64   `json:"treeSize"`
	RootHash  string   `json:"rootHash"`
	Note      string   `json:"note"`
}

// TestPqcryptoKnownAnswer shows circl's ML-DSA-65 (FIPS 204) verifies pqcrypto's signatures, and
// that both sides agree on the key ID, the note format and the Merkle tree hash.
func TestPqcryptoKnownAnswer(t *testing.T) {
	raw, err := os.ReadFile("../testdata/kat_pqcrypto.json")
	if err != nil {
		t.Fatal(err)
	}
	var kat katVector
	if err := json.Unmarshal(raw, &kat); err != nil {
		t.Fatal(err)
	}
	pk, _ := base64.StdEncoding.DecodeString(kat.PublicKey)
	if id := KeyID(kat.KeyName, pk); hex.EncodeToString(id[:]) != kat.KeyID {
		t.Fatalf("key ID %x, pqcrypto side computed %s", id, kat.KeyID)
	}
	tree := make(testTree, len(kat.Leaves))
	for i, leaf := range kat.Leaves {
		tree[i] = []byte(leaf)
	}
	if got := base64.StdEncoding.EncodeToString(tree.root()); got != kat.RootHash {
		t.Fatalf("Merkle root %s, Python side computed %s", got, kat.RootHash)
	}
	note, err := ParseSignedNote(kat.Note)
	if err != nil || len(note.Signatures) != 1 {
		t.Fatalf("parsing the note: %v", err)
	}
	if !VerifyMLDSA65(pk, []byte(note.Text), note.Signatures[0].Signature) {
		t.Fatal("circl does not verify pqcrypto's ML-DSA-65 signature")
	}

	f := &fixture{t: t, ledger: newFakeLedger(), contract: NewAnchorContract("")}
	if _, err := f.register(adminMSP, kat.Origin, kat.KeyName, kat.PublicKey); err != nil {
		t.Fatal(err)
	}
	f.mustRefuse(ErrSignature, "does not verify", func() (*AnchorRecord, error) {
		return f.anchor(kat.Origin, flipSignatureByte(t, kat.Note, 0), "")
	})
	record, err := f.anchor(kat.Origin, kat.Note, "")
	if err != nil || record.TreeSize != kat.TreeSize || record.RootHash != kat.RootHash {
		t.Fatalf("anchoring the pqcrypto-signed checkpoint: %+v %v", record, err)
	}
}

// flipSignatureByte flips one bit inside the ML-DSA signature of the note's i-th signature line.
func flipSignatureByte(t *testing.T, note string, i int) string {
	t.Helper()
	text, block, _ := strings.Cut(note, "\n\n")
	lines := strings.Split(strings.TrimSuffix(block, "\n"), "\n")
	name, encoded, _ := strings.Cut(strings.TrimPrefix(lines[i], "\u2014 "), " ")
	raw, err := base64.StdEncoding.DecodeString(encoded)
	if err != nil {
		t.Fatal(err)
	}
	raw[4+100] ^= 0x01
	lines[i] = "\u2014 " + name + " " + base64.StdEncoding.EncodeToString(raw)
	return text + "\n\n" + strings.Join(lines, "\n") + "\n"
}

func recordEqual(a, b AnchorRecord) bool {
	return a.Origin == b.Origin && a.TreeSize == b.TreeSize && a.RootHash == b.RootHash && a.Checkpoint == b.Checkpoint &&
		slices.Equal(a.SignedBy, b.SignedBy) && a.TxID == b.TxID && a.Timestamp == b.Timestamp
}
