package anchors

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/hyperledger/fabric-contract-api-go/v2/contractapi"
	"github.com/hyperledger/fabric-protos-go-apiv2/msp"
	"google.golang.org/protobuf/proto"
)

// serializedIdentity is what a peer hands the chaincode as the creator: an MSP ID and a PEM certificate.
func serializedIdentity(t *testing.T, mspID string) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	template := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "client@" + mspID},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := proto.Marshal(&msp.SerializedIdentity{
		Mspid: mspID, IdBytes: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
	})
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// TestThroughContractAPI dispatches transactions as the peer does: string arguments in, the
// client identity from the creator, JSON out, checked against the contract's metadata schema.
func TestThroughContractAPI(t *testing.T) {
	cc, err := contractapi.NewChaincode(NewAnchorContract(""))
	if err != nil {
		t.Fatal(err)
	}
	ledger := newFakeLedger()
	invoke := func(mspID string, args ...string) (int32, string) {
		ctx := ledger.tx(mspID)
		ctx.stub.args = args
		ctx.stub.creator = serializedIdentity(t, mspID)
		response := cc.Invoke(ctx.stub)
		if response.Status == 200 {
			ctx.commit()
			return response.Status, string(response.Payload)
		}
		return response.Status, response.Message
	}
	signer := newSigner(testKey, 1)
	tree := leavesOf(16)

	if status, msg := invoke("Org2MSP", "anchors:RegisterLogKey", testOrigin, testKey, signer.publicKeyBase64()); status != 500 ||
		!strings.Contains(msg, "only members of Org1MSP") {
		t.Fatalf("registration by Org2MSP: %d %s", status, msg)
	}
	if status, msg := invoke("Org1MSP", "anchors:RegisterLogKey", testOrigin, testKey, signer.publicKeyBase64()); status != 200 {
		t.Fatalf("registration: %d %s", status, msg)
	}
	if status, msg := invoke("Org2MSP", "Anchor", testOrigin, signedCheckpoint(t, testOrigin, tree[:5], signer), ""); status != 200 {
		t.Fatalf("first anchor: %d %s", status, msg)
	}
	grown := signedCheckpoint(t, testOrigin, tree[:11], signer)
	if status, msg := invoke("Org2MSP", "Anchor", testOrigin, grown, proofJSON(t, tree[:11].consistency(5))); status != 200 {
		t.Fatalf("growth: %d %s", status, msg)
	}
	if status, msg := invoke("Org2MSP", "Anchor", testOrigin, signedCheckpoint(t, testOrigin, tree[:9], signer), ""); status != 500 ||
		!strings.Contains(msg, "smaller than the last anchored size 11") {
		t.Fatalf("shrinking: %d %s", status, msg)
	}

	status, payload := invoke("Org2MSP", "anchors:BySize", testOrigin, "11")
	var record AnchorRecord
	if status != 200 || json.Unmarshal([]byte(payload), &record) != nil || record.Checkpoint != grown || record.TxID != "tx-0004" {
		t.Fatalf("BySize: %d %s", status, payload)
	}
	status, payload = invoke("Org2MSP", "Latest", testOrigin)
	if status != 200 || json.Unmarshal([]byte(payload), &record) != nil || record.TreeSize != 11 {
		t.Fatalf("Latest: %d %s", status, payload)
	}
	var keys []LogKey
	status, payload = invoke("Org2MSP", "LogKeys", testOrigin)
	if status != 200 || json.Unmarshal([]byte(payload), &keys) != nil || len(keys) != 1 || keys[0].RegisteredBy != "Org1MSP" {
		t.Fatalf("LogKeys: %d %s", status, payload)
	}
	if status, msg := invoke("Org2MSP", "BySize", testOrigin, "-1"); status != 500 {
		t.Fatalf("BySize with a negative size: %d %s", status, msg)
	}
}
