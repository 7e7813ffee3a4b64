//go:build tools

// Package tools pins the FerretDB command that infra/local/install.sh builds for the test suite.
package tools

import (
	_ "github.com/FerretDB/FerretDB/cmd/ferretdb"
)
