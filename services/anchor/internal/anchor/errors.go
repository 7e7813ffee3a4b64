package anchor

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/hyperledger/fabric-protos-go-apiv2/gateway"
	"github.com/hyperledger/fabric-protos-go-apiv2/peer"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// chaincodeKinds are the error kinds of infra/fabric/chaincode/anchors/errors.go, as they appear in
// the chaincode's messages ("<kind>: <what was refused>"), and the gRPC code each one means here.
var chaincodeKinds = []struct {
	text string
	code codes.Code
}{
	{"invalid argument", codes.InvalidArgument},
	{"signature refused", codes.InvalidArgument},
	{"inconsistent with the anchored history", codes.FailedPrecondition},
	{"forbidden", codes.PermissionDenied},
	{"conflict", codes.AlreadyExists},
	{"not found", codes.NotFound},
}

// The peer's wrapping of a chaincode's error response (Fabric's gateway/apiutils.go).
var chaincodeResponse = regexp.MustCompile(`chaincode response \d+, `)

// ToStatus turns an error of a Fabric Gateway call into the gRPC status the service answers with:
// the chaincode's own refusals by their kind and message, Fabric out of reach as UNAVAILABLE, and
// anything else as INTERNAL with Fabric's message.
func ToStatus(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		// The caller gave up or its deadline passed: say so, not what Fabric was doing then.
		return status.FromContextError(ctxErr).Err()
	}
	var notCommitted *NotCommittedError
	if errors.As(err, &notCommitted) {
		return notCommitted.status()
	}
	st, _ := status.FromError(err)
	// Each endorsing peer's own message first: the status message of a wrapped gateway error
	// repeats them after its own text.
	var messages []string
	for _, detail := range st.Details() {
		if d, ok := detail.(*gateway.ErrorDetail); ok {
			messages = append(messages, d.GetMessage())
		}
	}
	messages = append(messages, st.Message())
	for _, message := range messages {
		if code, text, ok := chaincodeRefusal(message); ok {
			return status.Error(code, text)
		}
	}
	switch {
	case st.Code() == codes.Unavailable, st.Code() == codes.DeadlineExceeded, errors.Is(err, context.DeadlineExceeded):
		return status.Errorf(codes.Unavailable, "Fabric is unreachable: %s", describe(messages))
	case st.Code() == codes.FailedPrecondition:
		// The gateway found no set of live peers that satisfies the endorsement policy.
		return status.Errorf(codes.Unavailable, "Fabric cannot endorse now: %s", describe(messages))
	case st.Code() == codes.Aborted && anyUnavailable(messages):
		return status.Errorf(codes.Unavailable, "an endorsing peer is unreachable: %s", describe(messages))
	}
	return status.Errorf(codes.Internal, "Fabric: %s", describe(messages))
}

// chaincodeRefusal finds the chaincode's message in one of Fabric's and the kind it starts with.
// The earliest kind wins: a kind's words may recur later inside a quoted argument.
func chaincodeRefusal(message string) (codes.Code, string, bool) {
	loc := chaincodeResponse.FindStringIndex(message)
	if loc == nil {
		return codes.OK, "", false
	}
	text, _, _ := strings.Cut(message[loc[1]:], "\n")
	best, code := -1, codes.Unknown
	for _, kind := range chaincodeKinds {
		if i := strings.Index(text, kind.text); i >= 0 && (best < 0 || i < best) {
			best, code = i, kind.code
		}
	}
	if best < 0 {
		return codes.Internal, "chaincode: " + text, true
	}
	return code, text, true
}

// NotCommittedError is a transaction that was ordered into a block but marked invalid there.
type NotCommittedError struct {
	TransactionID string
	Code          peer.TxValidationCode
}

func (e *NotCommittedError) Error() string {
	return fmt.Sprintf("transaction %s was ordered but not committed as valid: %s", e.TransactionID, e.Code)
}

func (e *NotCommittedError) status() error {
	message := e.Error()
	switch e.Code {
	case peer.TxValidationCode_MVCC_READ_CONFLICT, peer.TxValidationCode_PHANTOM_READ_CONFLICT:
		// Another transaction changed what this one read (a concurrent anchor): retrying is right.
		return status.Error(codes.Aborted, message)
	case peer.TxValidationCode_ENDORSEMENT_POLICY_FAILURE:
		return status.Error(codes.FailedPrecondition, message)
	default:
		return status.Error(codes.Internal, message)
	}
}

func anyUnavailable(messages []string) bool {
	for _, m := range messages {
		if strings.Contains(m, "code = Unavailable") || strings.Contains(m, "connection refused") {
			return true
		}
	}
	return false
}

func describe(messages []string) string {
	var parts []string
	for _, m := range messages {
		if m != "" && !strings.HasSuffix(m, "see attached details for more info") {
			parts = append(parts, m)
		}
	}
	if len(parts) == 0 {
		return messages[len(messages)-1]
	}
	return strings.Join(parts, "; ")
}
