package anchor

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"log/slog"
	"strconv"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"lucerna.local/anchor/gen/anchoringv1"
)

// Ledger is what the service needs of Fabric: the Gateway implements it, unit tests use a fake.
type Ledger interface {
	// Submit has a chaincode transaction endorsed, ordered and committed, and waits for its commit.
	Submit(ctx context.Context, function string, args ...string) (Committed, error)
	// Evaluate runs a chaincode query on a peer; nothing is ordered.
	Evaluate(ctx context.Context, function string, args ...string) ([]byte, error)
	// BlockOf reads from the ledger the number of the block that holds a transaction.
	BlockOf(ctx context.Context, txID string) (uint64, error)
}

// Committed is a transaction committed as valid: the chaincode's result and where it landed.
type Committed struct {
	Result        []byte
	TransactionID string
	BlockNumber   uint64
}

// logKey and anchorRecord are the chaincode's JSON answers (anchors.LogKey, anchors.AnchorRecord).
type logKey struct {
	Origin  string `json:"origin"`
	KeyName string `json:"keyName"`
	KeyID   string `json:"keyId"`
	TxID    string `json:"txId"`
}

type anchorRecord struct {
	Origin     string   `json:"origin"`
	TreeSize   uint64   `json:"treeSize"`
	RootHash   string   `json:"rootHash"`
	Checkpoint string   `json:"checkpoint"`
	SignedBy   []string `json:"signedBy"`
	TxID       string   `json:"txId"`
	Timestamp  string   `json:"timestamp"`
}

// Service implements lucerna.anchoring.v1.Anchors over a Ledger.
type Service struct {
	anchoringv1.UnimplementedAnchorsServer
	ledger    Ledger
	channel   string
	chaincode string
	log       *slog.Logger
	// unreachable is told when a call finds Fabric out of reach (the health watcher re-probes).
	unreachable func()
}

// NewService returns the Anchors service for the chaincode on the channel, reached through ledger;
// unreachable (may be nil) is called whenever a call answers UNAVAILABLE.
func NewService(ledger Ledger, channel, chaincode string, log *slog.Logger, unreachable func()) *Service {
	if unreachable == nil {
		unreachable = func() {}
	}
	return &Service{ledger: ledger, channel: channel, chaincode: chaincode, log: log, unreachable: unreachable}
}

// fail maps a Ledger error to the call's answer.
func (s *Service) fail(ctx context.Context, err error) error {
	mapped := ToStatus(ctx, err)
	if status.Code(mapped) == codes.Unavailable {
		s.unreachable()
	}
	return mapped
}

// RegisterLogKey registers an origin's ML-DSA-65 public key (the chaincode checks the caller's MSP).
func (s *Service) RegisterLogKey(ctx context.Context, req *anchoringv1.RegisterLogKeyRequest) (*anchoringv1.RegisteredLogKey, error) {
	committed, err := s.ledger.Submit(ctx, "RegisterLogKey",
		req.GetOrigin(), req.GetKeyName(), base64.StdEncoding.EncodeToString(req.GetPublicKey()))
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	var key logKey
	if err := json.Unmarshal(committed.Result, &key); err != nil {
		return nil, status.Errorf(codes.Internal, "the chaincode's RegisterLogKey answer does not decode: %v", err)
	}
	s.log.InfoContext(ctx, "log key registered", "origin", key.Origin, "key_name", key.KeyName, "key_id", key.KeyID,
		"transaction_id", key.TxID)
	// The registering transaction: an earlier one when the same key was registered before.
	return &anchoringv1.RegisteredLogKey{Origin: key.Origin, KeyName: key.KeyName, KeyId: key.KeyID, TransactionId: key.TxID}, nil
}

// Anchor puts a signed checkpoint on the ledger and answers once its transaction committed as valid.
func (s *Service) Anchor(ctx context.Context, req *anchoringv1.AnchorRequest) (*anchoringv1.Anchored, error) {
	proof := ""
	if len(req.GetConsistencyProof()) > 0 {
		hashes := make([]string, len(req.GetConsistencyProof()))
		for i, h := range req.GetConsistencyProof() {
			hashes[i] = base64.StdEncoding.EncodeToString(h)
		}
		encoded, err := json.Marshal(hashes)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "encoding the consistency proof: %v", err)
		}
		proof = string(encoded)
	}
	committed, err := s.ledger.Submit(ctx, "Anchor", req.GetOrigin(), req.GetCheckpoint(), proof)
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	record, err := decodeRecord(committed.Result)
	if err != nil {
		return nil, err
	}
	block := committed.BlockNumber
	if record.TxID != committed.TransactionID {
		// The same checkpoint was anchored before: the chaincode answered with that earlier anchor.
		if block, err = s.ledger.BlockOf(ctx, record.TxID); err != nil {
			return nil, s.fail(ctx, err)
		}
	}
	s.log.InfoContext(ctx, "checkpoint anchored", "origin", record.Origin, "tree_size", record.TreeSize,
		"transaction_id", record.TxID, "block_number", block)
	return s.anchored(record, block)
}

// Latest reads the last checkpoint anchored for an origin, and its block, from the ledger.
func (s *Service) Latest(ctx context.Context, req *anchoringv1.LatestRequest) (*anchoringv1.Anchored, error) {
	return s.read(ctx, "Latest", req.GetOrigin())
}

// BySize reads the checkpoint anchored for an origin at a tree size, and its block, from the ledger.
func (s *Service) BySize(ctx context.Context, req *anchoringv1.BySizeRequest) (*anchoringv1.Anchored, error) {
	return s.read(ctx, "BySize", req.GetOrigin(), strconv.FormatUint(req.GetTreeSize(), 10))
}

func (s *Service) read(ctx context.Context, function string, args ...string) (*anchoringv1.Anchored, error) {
	result, err := s.ledger.Evaluate(ctx, function, args...)
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	record, err := decodeRecord(result)
	if err != nil {
		return nil, err
	}
	// The record names its transaction; the block comes from the ledger itself, not from us.
	block, err := s.ledger.BlockOf(ctx, record.TxID)
	if err != nil {
		return nil, s.fail(ctx, err)
	}
	return s.anchored(record, block)
}

func decodeRecord(raw []byte) (*anchorRecord, error) {
	var record anchorRecord
	if err := json.Unmarshal(raw, &record); err != nil {
		return nil, status.Errorf(codes.Internal, "the chaincode's anchor record does not decode: %v", err)
	}
	return &record, nil
}

func (s *Service) anchored(record *anchorRecord, block uint64) (*anchoringv1.Anchored, error) {
	root, err := base64.StdEncoding.DecodeString(record.RootHash)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "the anchored root hash of transaction %s is not base64: %v", record.TxID, err)
	}
	committedAt, err := time.Parse(time.RFC3339Nano, record.Timestamp)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "the anchor timestamp of transaction %s does not parse: %v", record.TxID, err)
	}
	return &anchoringv1.Anchored{
		Origin:        record.Origin,
		TreeSize:      record.TreeSize,
		RootHash:      root,
		Checkpoint:    record.Checkpoint,
		SignedBy:      record.SignedBy,
		TransactionId: record.TxID,
		BlockNumber:   block,
		CommittedAt:   timestamppb.New(committedAt),
		Channel:       s.channel,
		Chaincode:     s.chaincode,
	}, nil
}
