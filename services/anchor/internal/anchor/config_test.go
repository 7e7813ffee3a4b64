package anchor

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func env(values map[string]string) func(string) string {
	return func(name string) string { return values[name] }
}

func minimal() map[string]string {
	return map[string]string{
		"LUCERNA_ANCHOR_PEER_ENDPOINT":      "127.0.0.1:7051",
		"LUCERNA_ANCHOR_PEER_TLS_ROOT_CERT": "/crypto/tlsca.pem",
		"LUCERNA_ANCHOR_MSP_ID":             "Org1MSP",
		"LUCERNA_ANCHOR_CERT":               "/crypto/cert.pem",
		"LUCERNA_ANCHOR_KEY":                "/crypto/key.pem",
	}
}

func TestConfigDefaults(t *testing.T) {
	cfg, err := ConfigFromEnv(env(minimal()))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != DefaultListen || cfg.Channel != "lucerna" || cfg.Chaincode != "anchors" || cfg.Token != "" {
		t.Fatalf("defaults: %+v", cfg)
	}
	if cfg.PeerEndpoint != "127.0.0.1:7051" || cfg.MSPID != "Org1MSP" || cfg.KeyFile != "/crypto/key.pem" {
		t.Fatalf("settings not read: %+v", cfg)
	}
}

func TestConfigNamesEveryMissingSetting(t *testing.T) {
	_, err := ConfigFromEnv(env(map[string]string{}))
	if err == nil {
		t.Fatal("an empty environment was accepted")
	}
	for _, name := range []string{"PEER_ENDPOINT", "PEER_TLS_ROOT_CERT", "MSP_ID", "LUCERNA_ANCHOR_CERT ", "LUCERNA_ANCHOR_KEY and LUCERNA_ANCHOR_KEYSTORE"} {
		if !strings.Contains(err.Error()+" ", name) {
			t.Errorf("error does not name %s: %v", name, err)
		}
	}
}

func TestConfigRefusesUnsafeOrMalformedSettings(t *testing.T) {
	cases := map[string]struct {
		set  map[string]string
		want string
	}{
		"no token off loopback": {map[string]string{"LUCERNA_ANCHOR_LISTEN": "0.0.0.0:8095"}, "LUCERNA_ANCHOR_TOKEN is required"},
		"short token":           {map[string]string{"LUCERNA_ANCHOR_TOKEN": "short"}, "at least 16 characters"},
		"key and keystore":      {map[string]string{"LUCERNA_ANCHOR_KEYSTORE": "/crypto/keystore"}, "exactly one of"},
		"listen without port":   {map[string]string{"LUCERNA_ANCHOR_LISTEN": "127.0.0.1"}, "LUCERNA_ANCHOR_LISTEN"},
		"peer without port":     {map[string]string{"LUCERNA_ANCHOR_PEER_ENDPOINT": "peer0"}, "LUCERNA_ANCHOR_PEER_ENDPOINT"},
		"TLS cert without key":  {map[string]string{"LUCERNA_ANCHOR_TLS_CERT": "/tls/cert.pem"}, "go together"},
		"unknown log level":     {map[string]string{"LUCERNA_ANCHOR_LOG_LEVEL": "chatty"}, "LUCERNA_ANCHOR_LOG_LEVEL"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			values := minimal()
			for k, v := range c.set {
				values[k] = v
			}
			_, err := ConfigFromEnv(env(values))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("want an error containing %q, got %v", c.want, err)
			}
		})
	}
}

func TestConfigAcceptsATokenOffLoopback(t *testing.T) {
	values := minimal()
	values["LUCERNA_ANCHOR_LISTEN"] = "0.0.0.0:8095"
	values["LUCERNA_ANCHOR_TOKEN"] = "0123456789abcdef-token"
	cfg, err := ConfigFromEnv(env(values))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Token != "0123456789abcdef-token" || cfg.Listen != "0.0.0.0:8095" {
		t.Fatalf("%+v", cfg)
	}
}

func TestPrivateKeyFromTheKeystore(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "priv_sk"), []byte("PEM"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := Config{KeystoreDir: dir}.PrivateKeyPEM()
	if err != nil || string(got) != "PEM" {
		t.Fatalf("got %q, %v", got, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "other_sk"), []byte("PEM"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := (Config{KeystoreDir: dir}).PrivateKeyPEM(); err == nil || !strings.Contains(err.Error(), "exactly one key file, not 2") {
		t.Fatalf("two keys in the keystore: %v", err)
	}
}
