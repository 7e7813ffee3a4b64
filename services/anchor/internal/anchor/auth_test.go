package anchor

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const token = "a-token-of-at-least-16-characters"

func withAuthorization(values ...string) context.Context {
	md := metadata.MD{}
	for _, v := range values {
		md.Append("authorization", v)
	}
	return metadata.NewIncomingContext(context.Background(), md)
}

func TestTokenAuth(t *testing.T) {
	auth := NewTokenAuth(token)
	cases := map[string]struct {
		ctx  context.Context
		want codes.Code
	}{
		"right token":          {withAuthorization("Bearer " + token), codes.OK},
		"scheme in lower case": {withAuthorization("bearer " + token), codes.OK},
		"no metadata":          {context.Background(), codes.Unauthenticated},
		"no authorization":     {withAuthorization(), codes.Unauthenticated},
		"wrong token":          {withAuthorization("Bearer " + token + "x"), codes.Unauthenticated},
		"a prefix of it":       {withAuthorization("Bearer " + token[:10]), codes.Unauthenticated},
		"another scheme":       {withAuthorization("Basic " + token), codes.Unauthenticated},
		"no scheme":            {withAuthorization(token), codes.Unauthenticated},
		"two values":           {withAuthorization("Bearer "+token, "Bearer "+token), codes.Unauthenticated},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			err := auth.Check(c.ctx)
			if status.Code(err) != c.want {
				t.Fatalf("want %s, got %v", c.want, err)
			}
		})
	}
}

func TestTokenNeverInTheRefusal(t *testing.T) {
	err := NewTokenAuth(token).Check(withAuthorization("Bearer wrong"))
	if err == nil || strings.Contains(err.Error(), token) || strings.Contains(err.Error(), "wrong") {
		t.Fatalf("the refusal repeats a token: %v", err)
	}
}

func TestNoTokenNoCheck(t *testing.T) {
	if NewTokenAuth("") != nil {
		t.Fatal("an empty token must mean no check")
	}
}

func TestHealthNeedsNoToken(t *testing.T) {
	auth := NewTokenAuth(token)
	called := 0
	handler := func(context.Context, any) (any, error) { called++; return nil, nil }
	health := &grpc.UnaryServerInfo{FullMethod: "/grpc.health.v1.Health/Check"}
	if _, err := auth.Unary(context.Background(), nil, health, handler); err != nil || called != 1 {
		t.Fatalf("health check refused: %v", err)
	}
	anchorCall := &grpc.UnaryServerInfo{FullMethod: "/lucerna.anchoring.v1.Anchors/Anchor"}
	if _, err := auth.Unary(context.Background(), nil, anchorCall, handler); status.Code(err) != codes.Unauthenticated || called != 1 {
		t.Fatalf("an Anchor call without a token reached the handler: %v", err)
	}
}
