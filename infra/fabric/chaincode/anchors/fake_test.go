package anchors

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/hyperledger/fabric-chaincode-go/v2/pkg/cid"
	"github.com/hyperledger/fabric-chaincode-go/v2/shim"
	"github.com/hyperledger/fabric-contract-api-go/v2/contractapi"
	"github.com/hyperledger/fabric-protos-go-apiv2/ledger/queryresult"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// fakeLedger is an in-memory world state; each transaction's writes commit only if it succeeds,
// and a transaction reads committed state only, as on a Fabric peer.
type fakeLedger struct {
	state map[string][]byte
	txs   int
}

func newFakeLedger() *fakeLedger { return &fakeLedger{state: map[string][]byte{}} }

// tx opens a transaction submitted by a client of mspID.
func (l *fakeLedger) tx(mspID string) *fakeContext {
	l.txs++
	stub := &fakeStub{
		ledger: l,
		txID:   fmt.Sprintf("tx-%04d", l.txs),
		time:   time.Date(2026, 11, 21, 12, 0, l.txs, 0, time.UTC),
		writes: map[string][]byte{},
	}
	return &fakeContext{stub: stub, identity: &fakeIdentity{mspID: mspID}}
}

// snapshot copies the committed state, to show a refused transaction changed nothing.
func (l *fakeLedger) snapshot() map[string][]byte { return maps.Clone(l.state) }

// fakeContext implements contractapi.TransactionContextInterface.
type fakeContext struct {
	stub     *fakeStub
	identity *fakeIdentity
}

func (c *fakeContext) GetStub() shim.ChaincodeStubInterface  { return c.stub }
func (c *fakeContext) GetClientIdentity() cid.ClientIdentity { return c.identity }

// commit applies the transaction's writes, as the peer does once it is valid.
func (c *fakeContext) commit() {
	maps.Copy(c.stub.ledger.state, c.stub.writes)
}

var _ contractapi.TransactionContextInterface = (*fakeContext)(nil)

// fakeIdentity implements the part of cid.ClientIdentity the contract uses; the rest panics.
type fakeIdentity struct {
	cid.ClientIdentity
	mspID string
}

func (i *fakeIdentity) GetMSPID() (string, error) { return i.mspID, nil }

// fakeStub implements the part of shim.ChaincodeStubInterface the contract uses; the rest panics.
type fakeStub struct {
	shim.ChaincodeStubInterface
	ledger  *fakeLedger
	txID    string
	time    time.Time
	writes  map[string][]byte
	args    []string // function name, then parameters, for dispatch through contractapi
	creator []byte   // serialized msp.SerializedIdentity, for dispatch through contractapi
}

func (s *fakeStub) GetFunctionAndParameters() (string, []string) { return s.args[0], s.args[1:] }

func (s *fakeStub) GetCreator() ([]byte, error) { return s.creator, nil }

func (s *fakeStub) GetTxID() string { return s.txID }

func (s *fakeStub) GetTxTimestamp() (*timestamppb.Timestamp, error) {
	return timestamppb.New(s.time), nil
}

func (s *fakeStub) CreateCompositeKey(objectType string, attributes []string) (string, error) {
	return shim.CreateCompositeKey(objectType, attributes)
}

func (s *fakeStub) GetState(key string) ([]byte, error) { return s.ledger.state[key], nil }

func (s *fakeStub) PutState(key string, value []byte) error {
	if key == "" || value == nil {
		return fmt.Errorf("fake stub: empty key or nil value")
	}
	s.writes[key] = slices.Clone(value)
	return nil
}

func (s *fakeStub) GetStateByPartialCompositeKey(objectType string, keys []string) (shim.StateQueryIteratorInterface, error) {
	prefix, err := shim.CreateCompositeKey(objectType, keys)
	if err != nil {
		return nil, err
	}
	it := &fakeIterator{}
	for _, k := range slices.Sorted(maps.Keys(s.ledger.state)) {
		if strings.HasPrefix(k, prefix) {
			it.kvs = append(it.kvs, &queryresult.KV{Key: k, Value: s.ledger.state[k]})
		}
	}
	return it, nil
}

type fakeIterator struct {
	kvs []*queryresult.KV
}

func (it *fakeIterator) HasNext() bool { return len(it.kvs) > 0 }
func (it *fakeIterator) Close() error  { return nil }

func (it *fakeIterator) Next() (*queryresult.KV, error) {
	if len(it.kvs) == 0 {
		return nil, fmt.Errorf("fake iterator: no more results")
	}
	kv := it.kvs[0]
	it.kvs = it.kvs[1:]
	return kv, nil
}
