package anchor

import (
	"context"
	"log/slog"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"lucerna.local/anchor/gen/anchoringv1"
)

// ServiceName is the name the health service reports the Anchors service's readiness under.
const ServiceName = "lucerna.anchoring.v1.Anchors"

// NewGRPCServer returns the gRPC server with the Anchors service, the health service, the token
// check (when cfg has a token) and one log line per call.
func NewGRPCServer(cfg Config, svc *Service, healthSrv *health.Server, log *slog.Logger) (*grpc.Server, error) {
	unary := []grpc.UnaryServerInterceptor{logCalls(log)}
	var stream []grpc.StreamServerInterceptor
	if auth := NewTokenAuth(cfg.Token); auth != nil {
		unary = append(unary, auth.Unary)
		stream = append(stream, auth.Stream)
	}
	options := []grpc.ServerOption{grpc.ChainUnaryInterceptor(unary...), grpc.ChainStreamInterceptor(stream...)}
	if cfg.TLSCertFile != "" {
		creds, err := credentials.NewServerTLSFromFile(cfg.TLSCertFile, cfg.TLSKeyFile)
		if err != nil {
			return nil, err
		}
		options = append(options, grpc.Creds(creds))
	}
	server := grpc.NewServer(options...)
	anchoringv1.RegisterAnchorsServer(server, svc)
	healthpb.RegisterHealthServer(server, healthSrv)
	return server, nil
}

// logCalls writes one JSON line per call: method, gRPC code, duration and, on failure, the message.
// Requests and metadata are not logged (the token travels in the metadata).
func logCalls(log *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		began := time.Now()
		resp, err := handler(ctx, req)
		st := status.Convert(err)
		level := slog.LevelInfo
		if info.FullMethod == healthpb.Health_Check_FullMethodName {
			level = slog.LevelDebug
		}
		attrs := []any{"method", info.FullMethod, "code", st.Code().String(), "ms", time.Since(began).Milliseconds()}
		if err != nil {
			attrs = append(attrs, "error", st.Message())
		}
		log.Log(ctx, level, "call", attrs...)
		return resp, err
	}
}

// FabricHealth keeps the health service's status of ServiceName in step with whether Fabric
// would endorse a transaction now.
type FabricHealth struct {
	server *health.Server
	probe  func(context.Context) error
	log    *slog.Logger
	kick   chan struct{}
}

// NewFabricHealth returns the watcher of probe, reporting on server (NOT_SERVING until a probe passes).
func NewFabricHealth(server *health.Server, probe func(context.Context) error, log *slog.Logger) *FabricHealth {
	server.SetServingStatus(ServiceName, healthpb.HealthCheckResponse_NOT_SERVING)
	return &FabricHealth{server: server, probe: probe, log: log, kick: make(chan struct{}, 1)}
}

// Unreachable reports NOT_SERVING at once, as a call just found Fabric out of reach, and has the
// watcher probe again now rather than at its next round.
func (h *FabricHealth) Unreachable() {
	h.server.SetServingStatus(ServiceName, healthpb.HealthCheckResponse_NOT_SERVING)
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// Watch probes until ctx ends: every fast interval while Fabric cannot endorse, every slow one
// once it can, and at once after Unreachable.
func (h *FabricHealth) Watch(ctx context.Context, fast, slow time.Duration) {
	last := healthpb.HealthCheckResponse_UNKNOWN
	for {
		next, wait := healthpb.HealthCheckResponse_SERVING, slow
		if err := h.probe(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			next, wait = healthpb.HealthCheckResponse_NOT_SERVING, fast
			if last != next {
				h.log.Warn("Fabric cannot endorse", "error", ToStatus(ctx, err).Error())
			}
		} else if last != next {
			h.log.Info("Fabric endorses")
		}
		h.server.SetServingStatus(ServiceName, next)
		last = next
		select {
		case <-ctx.Done():
			return
		case <-h.kick:
		case <-time.After(wait):
		}
	}
}
