package anchor

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func servingStatus(t *testing.T, srv *health.Server) healthpb.HealthCheckResponse_ServingStatus {
	t.Helper()
	resp, err := srv.Check(context.Background(), &healthpb.HealthCheckRequest{Service: ServiceName})
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetStatus()
}

func eventually(t *testing.T, srv *health.Server, want healthpb.HealthCheckResponse_ServingStatus) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for servingStatus(t, srv) != want {
		if time.Now().After(deadline) {
			t.Fatalf("health stayed %s, want %s", servingStatus(t, srv), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestHealthFollowsTheProbeAndReprobesWhenACallFindsFabricGone(t *testing.T) {
	var down atomic.Bool
	probes := atomic.Int32{}
	probe := func(context.Context) error {
		probes.Add(1)
		if down.Load() {
			return errors.New("connection refused")
		}
		return nil
	}
	srv := health.NewServer()
	h := NewFabricHealth(srv, probe, slog.New(slog.NewJSONHandler(io.Discard, nil)))
	if got := servingStatus(t, srv); got != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("before any probe: %s", got)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// A slow interval of an hour: only Unreachable can make the watcher probe again in this test.
	go h.Watch(ctx, 10*time.Millisecond, time.Hour)
	eventually(t, srv, healthpb.HealthCheckResponse_SERVING)

	down.Store(true)
	h.Unreachable()
	if got := servingStatus(t, srv); got != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("right after Unreachable: %s", got)
	}
	before := probes.Load()
	down.Store(false)
	eventually(t, srv, healthpb.HealthCheckResponse_SERVING)
	if probes.Load() <= before {
		t.Fatal("SERVING again without a new probe")
	}
}
