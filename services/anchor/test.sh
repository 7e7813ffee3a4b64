#!/usr/bin/env bash
# gofmt, vet and unit-test the anchor service, and check that gen/ matches protos/ (generate.sh --check).
# Modules come through GOPROXY into the Go module cache, checked against the committed go.sum;
# -mod=readonly refuses to run if go.mod or go.sum is stale. Like infra/fabric/chaincode/test.sh, an
# older go (>= 1.21) fetches the Go 1.25 toolchain that go.mod asks for from the proxy.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
go="${GO:-go}"
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=readonly"
unformatted="$("$("$go" env GOROOT)/bin/gofmt" -l .)"
[ -z "$unformatted" ] || { echo "not gofmt-formatted: $unformatted" >&2; exit 1; }
"$go" vet ./...
"$go" test -count=1 ./...
GOFLAGS= "$here/generate.sh" --check
