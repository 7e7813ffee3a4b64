// Command lucerna-anchor serves lucerna.anchoring.v1.Anchors: the audit service's checkpoints are
// anchored on Hyperledger Fabric through the Fabric Gateway. Configuration: LUCERNA_ANCHOR_*
// environment variables (services/anchor/README.md). Logs are JSON lines on stderr.
//
// `lucerna-anchor health [-addr host:port]` asks a running service (plaintext gRPC) whether it can
// anchor now: exit status 0 when its health service reports lucerna.anchoring.v1.Anchors SERVING,
// 1 when it answers otherwise (Fabric cannot endorse), 2 when it does not answer.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"lucerna.local/anchor/internal/anchor"
)

// How long in-flight calls (a commit wait may take seconds) may finish after SIGTERM.
const stopGrace = 20 * time.Second

// How often the health service re-checks that Fabric can endorse: often while it cannot.
const (
	probeFast = time.Second
	probeSlow = 10 * time.Second
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "health" {
		os.Exit(checkHealth(os.Args[2:]))
	}
	cfg, err := anchor.ConfigFromEnv(os.Getenv)
	if err != nil {
		slog.New(slog.NewJSONHandler(os.Stderr, nil)).Error("configuration refused", "error", err.Error())
		os.Exit(2)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: cfg.LogLevel}))
	if err := run(cfg, log); err != nil {
		log.Error("stopped", "error", err.Error())
		os.Exit(1)
	}
}

func run(cfg anchor.Config, log *slog.Logger) error {
	gateway, err := anchor.Connect(cfg)
	if err != nil {
		return err
	}
	defer gateway.Close()
	healthSrv := health.NewServer()
	fabricHealth := anchor.NewFabricHealth(healthSrv, gateway.Probe, log)
	svc := anchor.NewService(gateway, cfg.Channel, cfg.Chaincode, log, fabricHealth.Unreachable)
	server, err := anchor.NewGRPCServer(cfg, svc, healthSrv, log)
	if err != nil {
		return fmt.Errorf("TLS of the gRPC server: %w", err)
	}
	listener, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go fabricHealth.Watch(ctx, probeFast, probeSlow)
	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()
	log.Info("serving", "listen", listener.Addr().String(), "peer", cfg.PeerEndpoint, "msp_id", cfg.MSPID,
		"channel", cfg.Channel, "chaincode", cfg.Chaincode, "token_required", cfg.Token != "", "tls", cfg.TLSCertFile != "")
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	log.Info("stopping: finishing calls in flight")
	healthSrv.Shutdown()
	stopped := make(chan struct{})
	go func() { server.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(stopGrace):
		log.Warn("calls still in flight after the grace period: stopping now")
		server.Stop()
	}
	log.Info("stopped")
	return nil
}

// checkHealth is the `health` subcommand, for launchers and exec probes that have no gRPC client.
func checkHealth(args []string) int {
	flags := flag.NewFlagSet("health", flag.ContinueOnError)
	addr := flags.String("addr", envOr("LUCERNA_ANCHOR_LISTEN", anchor.DefaultListen), "the service's host:port")
	timeout := flags.Duration("timeout", 2*time.Second, "how long to wait for the answer")
	if err := flags.Parse(args); err != nil {
		return 2
	}
	conn, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: anchor.ServiceName})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	fmt.Println(resp.GetStatus())
	if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		return 1
	}
	return 0
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}
