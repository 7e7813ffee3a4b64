package anchors

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
)

// MaxNoteBytes bounds a submitted note; a Lucerna checkpoint with a few ML-DSA-65 signatures is ~5 KiB each.
const MaxNoteBytes = 64 << 10

// signatureAlgorithm is the identifier that follows signature type 0xFF in the key ID hash.
const signatureAlgorithm = "ML-DSA-65"

// signatureTypeOther is the C2SP note signature type reserved for algorithms without an assigned byte.
const signatureTypeOther = 0xFF

// Checkpoint is the body of a C2SP tlog-checkpoint note: origin, tree size and root hash.
type Checkpoint struct {
	Origin   string
	TreeSize uint64
	RootHash []byte
}

// NoteSignature is one signature line of a signed note.
type NoteSignature struct {
	KeyName   string
	KeyID     [4]byte
	Signature []byte
}

// SignedNote is a parsed C2SP signed note: the signed text and its signature lines.
type SignedNote struct {
	Text       string
	Signatures []NoteSignature
}

// KeyID computes the C2SP note key ID of an ML-DSA-65 public key:
// SHA-256(key name || 0x0A || 0xFF || "ML-DSA-65" || public key)[:4].
func KeyID(keyName string, publicKey []byte) [4]byte {
	h := sha256.New()
	h.Write([]byte(keyName))
	h.Write([]byte{'\n', signatureTypeOther})
	h.Write([]byte(signatureAlgorithm))
	h.Write(publicKey)
	var id [4]byte
	copy(id[:], h.Sum(nil))
	return id
}

// ValidKeyName reports whether name is a C2SP note key name: non-empty, no whitespace, no '+'.
func ValidKeyName(name string) bool {
	if name == "" || !utf8.ValidString(name) {
		return false
	}
	for _, r := range name {
		if unicode.IsSpace(r) || r == '+' || unicode.IsControl(r) {
			return false
		}
	}
	return true
}

// ParseSignedNote splits a C2SP signed note into its text and signature lines.
func ParseSignedNote(note string) (*SignedNote, error) {
	if len(note) > MaxNoteBytes {
		return nil, invalidf("signed note is %d bytes, more than the %d allowed", len(note), MaxNoteBytes)
	}
	if !utf8.ValidString(note) {
		return nil, invalidf("signed note is not valid UTF-8")
	}
	for _, r := range note {
		if r != '\n' && (r < 0x20 || r == 0x7F) {
			return nil, invalidf("signed note contains control character %U", r)
		}
	}
	// The signature block follows the last blank line; the text keeps its own final newline.
	split := strings.LastIndex(note, "\n\n")
	if split < 0 {
		return nil, invalidf("signed note has no blank line before its signatures")
	}
	text, block := note[:split+1], note[split+2:]
	if !strings.HasSuffix(block, "\n") {
		return nil, invalidf("signed note does not end with a newline")
	}
	lines := strings.Split(strings.TrimSuffix(block, "\n"), "\n")
	parsed := &SignedNote{Text: text}
	for i, line := range lines {
		sig, err := parseSignatureLine(line)
		if err != nil {
			return nil, invalidf("signature line %d: %v", i+1, err)
		}
		parsed.Signatures = append(parsed.Signatures, sig)
	}
	return parsed, nil
}

func parseSignatureLine(line string) (NoteSignature, error) {
	rest, ok := strings.CutPrefix(line, "\u2014 ")
	if !ok {
		return NoteSignature{}, errors.New("does not start with an em dash (U+2014) and a space")
	}
	name, encoded, ok := strings.Cut(rest, " ")
	if !ok || !ValidKeyName(name) {
		return NoteSignature{}, errors.New("expected '<key name> <base64 signature>'")
	}
	raw, err := base64.StdEncoding.Strict().DecodeString(encoded)
	if err != nil {
		return NoteSignature{}, fmt.Errorf("signature of key %q is not valid base64: %v", name, err)
	}
	if len(raw) < 5 {
		return NoteSignature{}, fmt.Errorf("signature of key %q is shorter than a key ID and a signature", name)
	}
	sig := NoteSignature{KeyName: name, Signature: raw[4:]}
	copy(sig.KeyID[:], raw[:4])
	return sig, nil
}

// ParseCheckpoint reads the three lines of a tlog-checkpoint note text (Lucerna uses no extension lines).
func ParseCheckpoint(text string) (*Checkpoint, error) {
	lines := strings.Split(strings.TrimSuffix(text, "\n"), "\n")
	if !strings.HasSuffix(text, "\n") || len(lines) < 3 {
		return nil, invalidf("checkpoint must be three lines: origin, tree size, base64 root hash")
	}
	if len(lines) > 3 {
		return nil, invalidf("checkpoint has %d extension lines; Lucerna checkpoints carry none", len(lines)-3)
	}
	origin, sizeText, rootText := lines[0], lines[1], lines[2]
	if origin == "" {
		return nil, invalidf("checkpoint origin line is empty")
	}
	size, err := parseTreeSize(sizeText)
	if err != nil {
		return nil, err
	}
	root, err := base64.StdEncoding.Strict().DecodeString(rootText)
	if err != nil || len(root) != sha256.Size {
		return nil, invalidf("checkpoint root hash %q is not the base64 of %d bytes", rootText, sha256.Size)
	}
	if size == 0 && !bytes.Equal(root, emptyTreeHash[:]) {
		return nil, invalidf("checkpoint of the empty tree must have root SHA-256(\"\")")
	}
	return &Checkpoint{Origin: origin, TreeSize: size, RootHash: root}, nil
}

func parseTreeSize(text string) (uint64, error) {
	// Decimal digits only, without a sign or leading zeros, so one size has one spelling.
	if text == "" || strings.TrimLeft(text, "0123456789") != "" || (len(text) > 1 && text[0] == '0') {
		return 0, invalidf("checkpoint tree size %q is not a decimal number", text)
	}
	size, err := strconv.ParseUint(text, 10, 64)
	if err != nil {
		return 0, invalidf("checkpoint tree size %q does not fit in 64 bits", text)
	}
	return size, nil
}

// VerifyMLDSA65 checks a pure ML-DSA-65 signature (FIPS 204, empty context) over msg.
func VerifyMLDSA65(publicKey, msg, sig []byte) bool {
	var pk mldsa65.PublicKey
	if pk.UnmarshalBinary(publicKey) != nil || len(sig) != mldsa65.SignatureSize {
		return false
	}
	return mldsa65.Verify(&pk, msg, nil, sig)
}
