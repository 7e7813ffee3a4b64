// Package anchor is the anchor service: a gRPC front (lucerna.anchoring.v1.Anchors) over the
// "anchors" chaincode, reached through the Fabric Gateway of one peer.
package anchor

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
)

// DefaultListen is where the service listens unless LUCERNA_ANCHOR_LISTEN says otherwise.
const DefaultListen = "127.0.0.1:8095"

// MinTokenLength keeps guessable tokens out: a random token of 16 characters is the least we accept.
const MinTokenLength = 16

// Config is the service's configuration, read from LUCERNA_ANCHOR_* environment variables.
type Config struct {
	Listen           string // LUCERNA_ANCHOR_LISTEN: host:port of the gRPC server
	TLSCertFile      string // LUCERNA_ANCHOR_TLS_CERT: the server's own TLS certificate (PEM), optional
	TLSKeyFile       string // LUCERNA_ANCHOR_TLS_KEY: its private key (PEM), with TLSCertFile
	Token            string // LUCERNA_ANCHOR_TOKEN: bearer token every RPC must carry, when set
	PeerEndpoint     string // LUCERNA_ANCHOR_PEER_ENDPOINT: host:port of the peer whose Gateway we use
	PeerTLSRootCert  string // LUCERNA_ANCHOR_PEER_TLS_ROOT_CERT: CA that signed the peer's TLS certificate
	PeerHostOverride string // LUCERNA_ANCHOR_PEER_HOST_OVERRIDE: name to expect in the peer's certificate
	MSPID            string // LUCERNA_ANCHOR_MSP_ID: the client identity's MSP
	CertFile         string // LUCERNA_ANCHOR_CERT: the client identity's X.509 certificate (PEM)
	KeyFile          string // LUCERNA_ANCHOR_KEY: its private key (PEM), or
	KeystoreDir      string // LUCERNA_ANCHOR_KEYSTORE: an MSP keystore folder holding that one key
	Channel          string // LUCERNA_ANCHOR_CHANNEL (default "lucerna")
	Chaincode        string // LUCERNA_ANCHOR_CHAINCODE (default "anchors")
	LogLevel         slog.Level
}

// ConfigFromEnv reads the configuration from getenv (os.Getenv in production) and checks it,
// naming every missing or wrong setting at once.
func ConfigFromEnv(getenv func(string) string) (Config, error) {
	get := func(name, fallback string) string {
		if v := strings.TrimSpace(getenv("LUCERNA_ANCHOR_" + name)); v != "" {
			return v
		}
		return fallback
	}
	cfg := Config{
		Listen:           get("LISTEN", DefaultListen),
		TLSCertFile:      get("TLS_CERT", ""),
		TLSKeyFile:       get("TLS_KEY", ""),
		Token:            getenv("LUCERNA_ANCHOR_TOKEN"), // as given: a token is compared byte for byte
		PeerEndpoint:     get("PEER_ENDPOINT", ""),
		PeerTLSRootCert:  get("PEER_TLS_ROOT_CERT", ""),
		PeerHostOverride: get("PEER_HOST_OVERRIDE", ""),
		MSPID:            get("MSP_ID", ""),
		CertFile:         get("CERT", ""),
		KeyFile:          get("KEY", ""),
		KeystoreDir:      get("KEYSTORE", ""),
		Channel:          get("CHANNEL", "lucerna"),
		Chaincode:        get("CHAINCODE", "anchors"),
	}
	var problems []error
	if err := cfg.LogLevel.UnmarshalText([]byte(get("LOG_LEVEL", "INFO"))); err != nil {
		problems = append(problems, fmt.Errorf("LUCERNA_ANCHOR_LOG_LEVEL: %w", err))
	}
	for name, value := range map[string]string{
		"PEER_ENDPOINT": cfg.PeerEndpoint, "PEER_TLS_ROOT_CERT": cfg.PeerTLSRootCert,
		"MSP_ID": cfg.MSPID, "CERT": cfg.CertFile,
	} {
		if value == "" {
			problems = append(problems, fmt.Errorf("LUCERNA_ANCHOR_%s is required", name))
		}
	}
	if (cfg.KeyFile == "") == (cfg.KeystoreDir == "") {
		problems = append(problems, errors.New("exactly one of LUCERNA_ANCHOR_KEY and LUCERNA_ANCHOR_KEYSTORE is required"))
	}
	if (cfg.TLSCertFile == "") != (cfg.TLSKeyFile == "") {
		problems = append(problems, errors.New("LUCERNA_ANCHOR_TLS_CERT and LUCERNA_ANCHOR_TLS_KEY go together"))
	}
	if cfg.PeerEndpoint != "" {
		if _, _, err := net.SplitHostPort(cfg.PeerEndpoint); err != nil {
			problems = append(problems, fmt.Errorf("LUCERNA_ANCHOR_PEER_ENDPOINT %q is not host:port: %w", cfg.PeerEndpoint, err))
		}
	}
	host, _, err := net.SplitHostPort(cfg.Listen)
	if err != nil {
		problems = append(problems, fmt.Errorf("LUCERNA_ANCHOR_LISTEN %q is not host:port: %w", cfg.Listen, err))
	} else if cfg.Token == "" && !isLoopback(host) {
		// Refuse to start unsafe: anyone who reaches the port could write to the ledger as our identity.
		problems = append(problems, fmt.Errorf("LUCERNA_ANCHOR_TOKEN is required when listening on %q, which is not loopback", cfg.Listen))
	}
	if cfg.Token != "" && len(cfg.Token) < MinTokenLength {
		problems = append(problems, fmt.Errorf("LUCERNA_ANCHOR_TOKEN must be at least %d characters", MinTokenLength))
	}
	if len(problems) > 0 {
		return Config{}, errors.Join(problems...)
	}
	return cfg, nil
}

// PrivateKeyPEM reads the client identity's private key: KeyFile, or the only file in KeystoreDir
// (cryptogen and fabric-ca name it after a hash, so a fixed name cannot be configured in advance).
func (c Config) PrivateKeyPEM() ([]byte, error) {
	path := c.KeyFile
	if path == "" {
		entries, err := os.ReadDir(c.KeystoreDir)
		if err != nil {
			return nil, fmt.Errorf("LUCERNA_ANCHOR_KEYSTORE: %w", err)
		}
		var files []string
		for _, e := range entries {
			if e.Type().IsRegular() {
				files = append(files, e.Name())
			}
		}
		if len(files) != 1 {
			return nil, fmt.Errorf("LUCERNA_ANCHOR_KEYSTORE %s must hold exactly one key file, not %d", c.KeystoreDir, len(files))
		}
		path = filepath.Join(c.KeystoreDir, files[0])
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the client private key: %w", err)
	}
	return data, nil
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
