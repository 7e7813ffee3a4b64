package anchor

import (
	"context"
	"crypto/x509"
	"fmt"
	"os"
	"time"

	"github.com/hyperledger/fabric-gateway/pkg/client"
	"github.com/hyperledger/fabric-gateway/pkg/identity"
	"github.com/hyperledger/fabric-protos-go-apiv2/common"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"
)

// Upper bounds of each step of a Gateway call, within the caller's own deadline.
const (
	evaluateTimeout = 10 * time.Second
	endorseTimeout  = 30 * time.Second
	commitTimeout   = 60 * time.Second
)

// Gateway is the Ledger on a Fabric network, through the Gateway service of one peer: it finds the
// other organisations' endorsing peers by discovery, so one connection serves every transaction.
type Gateway struct {
	conn     *grpc.ClientConn
	gateway  *client.Gateway
	contract *client.Contract
	qscc     *client.Contract
	channel  string
}

// Connect prepares the connection to the peer named in cfg as the client identity in cfg. gRPC
// connects lazily: an unreachable peer shows as UNAVAILABLE on calls, not as a failed start.
func Connect(cfg Config) (*Gateway, error) {
	rootPEM, err := os.ReadFile(cfg.PeerTLSRootCert)
	if err != nil {
		return nil, fmt.Errorf("reading the peer's TLS root certificate: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		return nil, fmt.Errorf("no PEM certificate in %s", cfg.PeerTLSRootCert)
	}
	certPEM, err := os.ReadFile(cfg.CertFile)
	if err != nil {
		return nil, fmt.Errorf("reading the client certificate: %w", err)
	}
	cert, err := identity.CertificateFromPEM(certPEM)
	if err != nil {
		return nil, fmt.Errorf("client certificate %s: %w", cfg.CertFile, err)
	}
	id, err := identity.NewX509Identity(cfg.MSPID, cert)
	if err != nil {
		return nil, fmt.Errorf("client identity: %w", err)
	}
	keyPEM, err := cfg.PrivateKeyPEM()
	if err != nil {
		return nil, err
	}
	key, err := identity.PrivateKeyFromPEM(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("client private key: %w", err)
	}
	sign, err := identity.NewPrivateKeySign(key)
	if err != nil {
		return nil, fmt.Errorf("client private key: %w", err)
	}
	conn, err := grpc.NewClient(cfg.PeerEndpoint,
		grpc.WithTransportCredentials(credentials.NewClientTLSFromCert(roots, cfg.PeerHostOverride)),
		// A peer back from a restart is used within seconds, not after gRPC's default 2-minute backoff.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 250 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second},
			MinConnectTimeout: 5 * time.Second,
		}))
	if err != nil {
		return nil, fmt.Errorf("peer endpoint %s: %w", cfg.PeerEndpoint, err)
	}
	gw, err := client.Connect(id, client.WithSign(sign), client.WithClientConnection(conn))
	if err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("connecting the Fabric Gateway: %w", err)
	}
	network := gw.GetNetwork(cfg.Channel)
	return &Gateway{
		conn: conn, gateway: gw, channel: cfg.Channel,
		contract: network.GetContract(cfg.Chaincode),
		qscc:     network.GetContract("qscc"),
	}, nil
}

// Close ends the connection to the peer.
func (g *Gateway) Close() error {
	_ = g.gateway.Close()
	return g.conn.Close()
}

// Submit endorses (by as many organisations as the endorsement policy asks), orders, and waits
// for the commit; a transaction committed as invalid is a *NotCommittedError.
func (g *Gateway) Submit(ctx context.Context, function string, args ...string) (Committed, error) {
	endorseCtx, cancel := context.WithTimeout(ctx, endorseTimeout)
	defer cancel()
	result, commit, err := g.contract.SubmitAsyncWithContext(endorseCtx, function, client.WithArguments(args...))
	if err != nil {
		return Committed{}, err
	}
	commitCtx, cancelCommit := context.WithTimeout(ctx, commitTimeout)
	defer cancelCommit()
	st, err := commit.StatusWithContext(commitCtx)
	if err != nil {
		return Committed{}, err
	}
	if !st.Successful {
		return Committed{}, &NotCommittedError{TransactionID: st.TransactionID, Code: st.Code}
	}
	return Committed{Result: result, TransactionID: st.TransactionID, BlockNumber: st.BlockNumber}, nil
}

// Evaluate runs a query of the chaincode on a peer of the gateway's organisation.
func (g *Gateway) Evaluate(ctx context.Context, function string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, evaluateTimeout)
	defer cancel()
	return g.contract.EvaluateWithContext(ctx, function, client.WithArguments(args...))
}

// BlockOf asks the peer's ledger (system chaincode qscc, GetBlockByTxID) which block holds txID.
func (g *Gateway) BlockOf(ctx context.Context, txID string) (uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, evaluateTimeout)
	defer cancel()
	raw, err := g.qscc.EvaluateWithContext(ctx, "GetBlockByTxID", client.WithArguments(g.channel, txID))
	if err != nil {
		return 0, err
	}
	var block common.Block
	if err := proto.Unmarshal(raw, &block); err != nil {
		return 0, fmt.Errorf("decoding the block of transaction %s: %w", txID, err)
	}
	if block.GetHeader() == nil {
		return 0, fmt.Errorf("the block of transaction %s has no header", txID)
	}
	return block.GetHeader().GetNumber(), nil
}

// probeOrigin is an origin nobody anchors: the health probe lists its (absent) keys.
const probeOrigin = "lucerna.local/anchor-service-health-probe"

// Probe has a read-only transaction endorsed without ordering it: it succeeds only when the peer
// answers, discovery knows peers of enough organisations for the endorsement policy, and they all
// run the chaincode; that is, when Submit could be endorsed now.
func (g *Gateway) Probe(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, evaluateTimeout)
	defer cancel()
	proposal, err := g.contract.NewProposal("LogKeys", client.WithArguments(probeOrigin))
	if err != nil {
		return err
	}
	_, err = proposal.EndorseWithContext(ctx)
	return err
}
