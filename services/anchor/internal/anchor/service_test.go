package anchor

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"lucerna.local/anchor/gen/anchoringv1"
)

// fakeLedger records the chaincode calls and answers with what the test set.
type fakeLedger struct {
	calls     [][]string
	result    []byte
	txID      string
	block     uint64
	blocks    map[string]uint64
	err       error
	blockCall []string
}

func (f *fakeLedger) Submit(_ context.Context, function string, args ...string) (Committed, error) {
	f.calls = append(f.calls, append([]string{function}, args...))
	if f.err != nil {
		return Committed{}, f.err
	}
	return Committed{Result: f.result, TransactionID: f.txID, BlockNumber: f.block}, nil
}

func (f *fakeLedger) Evaluate(_ context.Context, function string, args ...string) ([]byte, error) {
	f.calls = append(f.calls, append([]string{function}, args...))
	return f.result, f.err
}

func (f *fakeLedger) BlockOf(_ context.Context, txID string) (uint64, error) {
	f.blockCall = append(f.blockCall, txID)
	return f.blocks[txID], nil
}

func record(t *testing.T, txID string, size uint64) []byte {
	t.Helper()
	raw, err := json.Marshal(anchorRecord{
		Origin: "o", TreeSize: size, RootHash: "AAECAw==", Checkpoint: "o\n5\nAAECAw==\n\n— k sig\n",
		SignedBy: []string{"k"}, TxID: txID, Timestamp: "2026-11-21T10:00:00.123456789Z",
	})
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

func newTestService(ledger Ledger, unreachable func()) *Service {
	return NewService(ledger, "lucerna", "anchors", slog.New(slog.NewJSONHandler(io.Discard, nil)), unreachable)
}

func TestAnchorSendsTheProofAsJSONAndAnswersWhereItLanded(t *testing.T) {
	ledger := &fakeLedger{txID: "tx5", block: 12}
	ledger.result = record(t, "tx5", 5)
	svc := newTestService(ledger, nil)
	got, err := svc.Anchor(context.Background(), &anchoringv1.AnchorRequest{
		Origin: "o", Checkpoint: "note", ConsistencyProof: [][]byte{{0xff}, {0x00, 0x01}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"Anchor", "o", "note", `["/w==","AAE="]`}; !slices.Equal(ledger.calls[0], want) {
		t.Fatalf("chaincode call %q, want %q", ledger.calls[0], want)
	}
	if got.GetTransactionId() != "tx5" || got.GetBlockNumber() != 12 || got.GetTreeSize() != 5 ||
		!bytes.Equal(got.GetRootHash(), []byte{0, 1, 2, 3}) || got.GetChannel() != "lucerna" || got.GetChaincode() != "anchors" {
		t.Fatalf("answer %v", got)
	}
	if want := time.Date(2026, 11, 21, 10, 0, 0, 123456789, time.UTC); !got.GetCommittedAt().AsTime().Equal(want) {
		t.Fatalf("committed_at %v, want %v", got.GetCommittedAt().AsTime(), want)
	}
	if len(ledger.blockCall) != 0 {
		t.Fatalf("the commit's own block was looked up again: %v", ledger.blockCall)
	}
}

func TestAnchorWithoutProofSendsAnEmptyArgument(t *testing.T) {
	ledger := &fakeLedger{txID: "tx5", block: 3}
	ledger.result = record(t, "tx5", 5)
	if _, err := newTestService(ledger, nil).Anchor(context.Background(), &anchoringv1.AnchorRequest{Origin: "o", Checkpoint: "note"}); err != nil {
		t.Fatal(err)
	}
	if ledger.calls[0][3] != "" {
		t.Fatalf("proof argument %q, want empty", ledger.calls[0][3])
	}
}

func TestReAnchoringAnswersTheEarlierAnchorsBlock(t *testing.T) {
	// The chaincode answers an already anchored checkpoint with its earlier record.
	ledger := &fakeLedger{txID: "tx-new", block: 40, blocks: map[string]uint64{"tx-old": 7}}
	ledger.result = record(t, "tx-old", 5)
	got, err := newTestService(ledger, nil).Anchor(context.Background(), &anchoringv1.AnchorRequest{Origin: "o", Checkpoint: "note"})
	if err != nil {
		t.Fatal(err)
	}
	if got.GetTransactionId() != "tx-old" || got.GetBlockNumber() != 7 {
		t.Fatalf("got %s in block %d, want tx-old in block 7", got.GetTransactionId(), got.GetBlockNumber())
	}
}

func TestReadsTakeTheBlockFromTheLedger(t *testing.T) {
	ledger := &fakeLedger{blocks: map[string]uint64{"tx9": 21}}
	ledger.result = record(t, "tx9", 9)
	svc := newTestService(ledger, nil)
	latest, err := svc.Latest(context.Background(), &anchoringv1.LatestRequest{Origin: "o"})
	if err != nil {
		t.Fatal(err)
	}
	bySize, err := svc.BySize(context.Background(), &anchoringv1.BySizeRequest{Origin: "o", TreeSize: 9})
	if err != nil {
		t.Fatal(err)
	}
	if latest.GetBlockNumber() != 21 || bySize.GetBlockNumber() != 21 {
		t.Fatalf("blocks %d and %d, want 21", latest.GetBlockNumber(), bySize.GetBlockNumber())
	}
	if want := [][]string{{"Latest", "o"}, {"BySize", "o", "9"}}; !slices.EqualFunc(ledger.calls, want, slices.Equal) {
		t.Fatalf("chaincode calls %q, want %q", ledger.calls, want)
	}
	if !slices.Equal(ledger.blockCall, []string{"tx9", "tx9"}) {
		t.Fatalf("block lookups %v", ledger.blockCall)
	}
}

func TestRegisterLogKeySendsTheKeyInBase64(t *testing.T) {
	ledger := &fakeLedger{result: []byte(`{"origin":"o","keyName":"k","keyId":"0a0b0c0d","txId":"tx1"}`)}
	got, err := newTestService(ledger, nil).RegisterLogKey(context.Background(),
		&anchoringv1.RegisterLogKeyRequest{Origin: "o", KeyName: "k", PublicKey: []byte{0xfb, 0xff}})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"RegisterLogKey", "o", "k", "+/8="}; !slices.Equal(ledger.calls[0], want) {
		t.Fatalf("chaincode call %q, want %q", ledger.calls[0], want)
	}
	if got.GetKeyId() != "0a0b0c0d" || got.GetTransactionId() != "tx1" {
		t.Fatalf("answer %v", got)
	}
}

func TestUnavailableTellsTheHealthWatcher(t *testing.T) {
	told := 0
	ledger := &fakeLedger{err: status.Error(codes.Unavailable, "connection refused")}
	_, err := newTestService(ledger, func() { told++ }).Latest(context.Background(), &anchoringv1.LatestRequest{Origin: "o"})
	if status.Code(err) != codes.Unavailable || told != 1 {
		t.Fatalf("got %v, watcher told %d times", err, told)
	}
	ledger.err = status.Error(codes.Unknown, "evaluate call to endorser returned error: chaincode response 500, not found: none")
	_, err = newTestService(ledger, func() { told++ }).Latest(context.Background(), &anchoringv1.LatestRequest{Origin: "o"})
	if status.Code(err) != codes.NotFound || told != 1 {
		t.Fatalf("got %v, watcher told %d times", err, told)
	}
}
