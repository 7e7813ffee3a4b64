// Command chaincode runs the "anchors" contract: as a chaincode-as-a-service server when
// CHAINCODE_SERVER_ADDRESS is set (the peer dials it), else launched by the peer.
package main

import (
	"errors"
	"fmt"
	"log"
	"os"
	"strconv"

	"github.com/hyperledger/fabric-chaincode-go/v2/shim"
	"github.com/hyperledger/fabric-contract-api-go/v2/contractapi"

	"lucerna.local/fabric/chaincode/anchors"
)

func main() {
	if err := run(); err != nil {
		log.Fatalf("anchors chaincode: %v", err)
	}
}

func run() error {
	contract := anchors.NewAnchorContract(os.Getenv("ANCHORS_ADMIN_MSP"))
	cc, err := contractapi.NewChaincode(contract)
	if err != nil {
		return fmt.Errorf("creating the chaincode: %w", err)
	}
	address := os.Getenv("CHAINCODE_SERVER_ADDRESS")
	if address == "" {
		return cc.Start()
	}
	server, err := chaincodeServer(address, cc)
	if err != nil {
		return err
	}
	log.Printf("anchors chaincode %s serving on %s (admin MSP %s)", server.CCID, address, contract.AdminMSP)
	return server.Start()
}

// chaincodeServer reads the chaincode-as-a-service settings: CHAINCODE_ID (the package ID from
// `peer lifecycle chaincode calculatepackageid`) and, unless CHAINCODE_TLS_DISABLED is true,
// CHAINCODE_TLS_KEY, CHAINCODE_TLS_CERT and optionally CHAINCODE_CLIENT_CA_CERT (PEM files).
func chaincodeServer(address string, cc shim.Chaincode) (*shim.ChaincodeServer, error) {
	ccid := os.Getenv("CHAINCODE_ID")
	if ccid == "" {
		return nil, errors.New("CHAINCODE_SERVER_ADDRESS is set but CHAINCODE_ID is not")
	}
	tlsDisabled, err := strconv.ParseBool(envOr("CHAINCODE_TLS_DISABLED", "true"))
	if err != nil {
		return nil, fmt.Errorf("CHAINCODE_TLS_DISABLED: %w", err)
	}
	tls := shim.TLSProperties{Disabled: tlsDisabled}
	if !tlsDisabled {
		if tls.Key, err = readEnvFile("CHAINCODE_TLS_KEY", true); err != nil {
			return nil, err
		}
		if tls.Cert, err = readEnvFile("CHAINCODE_TLS_CERT", true); err != nil {
			return nil, err
		}
		if tls.ClientCACerts, err = readEnvFile("CHAINCODE_CLIENT_CA_CERT", false); err != nil {
			return nil, err
		}
	}
	return &shim.ChaincodeServer{CCID: ccid, Address: address, CC: cc, TLSProps: tls}, nil
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func readEnvFile(name string, required bool) ([]byte, error) {
	path := os.Getenv(name)
	if path == "" {
		if required {
			return nil, fmt.Errorf("%s must name a PEM file when TLS is enabled", name)
		}
		return nil, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return data, nil
}
