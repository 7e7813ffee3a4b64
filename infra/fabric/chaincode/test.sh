#!/usr/bin/env bash
# Vet and unit-test the anchors chaincode. Modules come through GOPROXY into the Go module cache,
# checked against the committed go.sum; -mod=readonly refuses to run if go.mod or go.sum is stale.
# go.mod asks for Go 1.25; an older go (>= 1.21) fetches that toolchain from the proxy, even one
# whose go.env says GOTOOLCHAIN=local (as a toolchain unpacked from the proxy's zip does).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
go="${GO:-go}"
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=readonly"
"$go" vet ./...
"$go" test -count=1 ./...
