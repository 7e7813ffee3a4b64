package anchor

import (
	"context"
	"fmt"
	"testing"

	"github.com/hyperledger/fabric-protos-go-apiv2/gateway"
	"github.com/hyperledger/fabric-protos-go-apiv2/peer"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// endorseError is shaped like the Fabric Gateway's answer to a refused endorsement: ABORTED, and
// one detail per peer carrying the peer's wrapping of the chaincode's message.
func endorseError(messages ...string) error {
	st := status.New(codes.Aborted, "failed to endorse transaction, see attached details for more info")
	for i, m := range messages {
		detailed, err := st.WithDetails(&gateway.ErrorDetail{Address: fmt.Sprintf("peer%d:7051", i), MspId: "Org1MSP", Message: m})
		if err != nil {
			panic(err)
		}
		st = detailed
	}
	// The client library wraps the status in its own error types, as this does.
	return fmt.Errorf("endorse error: %w", st.Err())
}

func TestChaincodeRefusalsKeepTheirMessage(t *testing.T) {
	cases := map[string]struct {
		err         error
		code        codes.Code
		wantMessage string
	}{
		"forged signature": {
			endorseError("chaincode response 500, signature refused: the ML-DSA-65 signature of registered key \"k\" (id 0a0b) does not verify"),
			codes.InvalidArgument, "signature refused: the ML-DSA-65 signature of registered key \"k\" (id 0a0b) does not verify",
		},
		"wrong consistency proof": {
			endorseError("chaincode response 500, checkpoint of size 16 does not extend the anchored checkpoint of size 13: inconsistent with the anchored history: root mismatch"),
			codes.FailedPrecondition, "checkpoint of size 16 does not extend the anchored checkpoint of size 13: inconsistent with the anchored history: root mismatch",
		},
		"not the admin MSP": {
			endorseError("chaincode response 500, forbidden: only members of Org1MSP may register log keys, not Org2MSP"),
			codes.PermissionDenied, "forbidden: only members of Org1MSP may register log keys, not Org2MSP",
		},
		"key replaced": {
			endorseError("chaincode response 500, conflict: key \"k\" of origin \"o\" is already registered with another public key; keys are never replaced"),
			codes.AlreadyExists, "conflict: key \"k\" of origin \"o\" is already registered with another public key; keys are never replaced",
		},
		"query of a missing anchor": {
			status.Error(codes.Unknown, "evaluate call to endorser returned error: chaincode response 500, not found: no checkpoint of size 7 anchored for origin \"o\""),
			codes.NotFound, "not found: no checkpoint of size 7 anchored for origin \"o\"",
		},
		"a kind's words inside an argument": {
			endorseError("chaincode response 500, invalid argument: checkpoint is for origin \"not found\", not \"o\""),
			codes.InvalidArgument, "invalid argument: checkpoint is for origin \"not found\", not \"o\"",
		},
		"an error of no known kind": {
			endorseError("chaincode response 500, Error managing parameter param1. Conversion error"),
			codes.Internal, "chaincode: Error managing parameter param1. Conversion error",
		},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			got := status.Convert(ToStatus(context.Background(), c.err))
			if got.Code() != c.code || got.Message() != c.wantMessage {
				t.Fatalf("want %s %q, got %s %q", c.code, c.wantMessage, got.Code(), got.Message())
			}
		})
	}
}

func TestFabricOutOfReachIsUnavailable(t *testing.T) {
	cases := map[string]error{
		"gateway peer down": status.Error(codes.Unavailable, `connection error: desc = "transport: Error while dialing: dial tcp 127.0.0.1:7051: connect: connection refused"`),
		"no endorsement plan": status.Error(codes.FailedPrecondition,
			"no combination of peers can be derived which satisfy the endorsement policy: no peer combination can satisfy the endorsement policy"),
		"an endorser down":     endorseError("rpc error: code = Unavailable desc = connection error"),
		"orderer down":         fmt.Errorf("submit error: %w", status.Error(codes.Unavailable, "no orderers could successfully process transaction")),
		"our own step timeout": fmt.Errorf("endorse error: %w", context.DeadlineExceeded),
	}
	for name, err := range cases {
		t.Run(name, func(t *testing.T) {
			if got := status.Code(ToStatus(context.Background(), err)); got != codes.Unavailable {
				t.Fatalf("want UNAVAILABLE, got %s", got)
			}
		})
	}
}

func TestTheCallersOwnEndWins(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if got := status.Code(ToStatus(ctx, status.Error(codes.Unavailable, "peer down"))); got != codes.Canceled {
		t.Fatalf("want CANCELLED, got %s", got)
	}
}

func TestTransactionsNotCommittedAsValid(t *testing.T) {
	cases := map[peer.TxValidationCode]codes.Code{
		peer.TxValidationCode_MVCC_READ_CONFLICT:         codes.Aborted,
		peer.TxValidationCode_PHANTOM_READ_CONFLICT:      codes.Aborted,
		peer.TxValidationCode_ENDORSEMENT_POLICY_FAILURE: codes.FailedPrecondition,
		peer.TxValidationCode_BAD_PAYLOAD:                codes.Internal,
	}
	for validation, want := range cases {
		err := ToStatus(context.Background(), &NotCommittedError{TransactionID: "tx1", Code: validation})
		st := status.Convert(err)
		if st.Code() != want || st.Message() != fmt.Sprintf("transaction tx1 was ordered but not committed as valid: %s", validation) {
			t.Errorf("%s: got %s %q", validation, st.Code(), st.Message())
		}
	}
}
