package anchor

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// healthService stays open without a token: probes (kubelet, grpc_health_probe) carry none, and
// it reveals nothing but whether the service can reach Fabric.
const healthService = "/grpc.health.v1.Health/"

// TokenAuth checks the bearer token of every RPC except the health service's.
type TokenAuth struct {
	digest [sha256.Size]byte
}

// NewTokenAuth returns the check for token; nil (no check) when token is empty.
func NewTokenAuth(token string) *TokenAuth {
	if token == "" {
		return nil
	}
	// Comparing fixed-size digests keeps the comparison's time independent of the token's length too.
	return &TokenAuth{digest: sha256.Sum256([]byte(token))}
}

// Check returns an UNAUTHENTICATED status unless the metadata carries `authorization: Bearer <token>`.
func (a *TokenAuth) Check(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	values := md.Get("authorization")
	if len(values) != 1 {
		return status.Error(codes.Unauthenticated, "a bearer token is required (metadata authorization: Bearer <token>)")
	}
	scheme, token, ok := strings.Cut(values[0], " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return status.Error(codes.Unauthenticated, "the authorization metadata must be 'Bearer <token>'")
	}
	given := sha256.Sum256([]byte(token))
	if subtle.ConstantTimeCompare(given[:], a.digest[:]) != 1 {
		return status.Error(codes.Unauthenticated, "the bearer token is not valid")
	}
	return nil
}

// Unary is the server interceptor for unary RPCs.
func (a *TokenAuth) Unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if !strings.HasPrefix(info.FullMethod, healthService) {
		if err := a.Check(ctx); err != nil {
			return nil, err
		}
	}
	return handler(ctx, req)
}

// Stream is the server interceptor for streaming RPCs (only the health service's Watch today).
func (a *TokenAuth) Stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if !strings.HasPrefix(info.FullMethod, healthService) {
		if err := a.Check(ss.Context()); err != nil {
			return err
		}
	}
	return handler(srv, ss)
}
