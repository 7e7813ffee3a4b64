#!/usr/bin/env bash
# Regenerates gen/anchoringv1 from protos/lucerna/anchoring/v1/anchoring.proto with pinned plugins.
# protoc itself is grpcio-tools' (the workspace's, through uv), the same that `make protos` uses for
# Python; protoc-gen-go and protoc-gen-go-grpc come from the Go module proxy into a cache folder.
# `generate.sh --check` regenerates into a scratch folder and fails if the committed code differs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
protoc_gen_go_version=v1.36.11      # keep in step with google.golang.org/protobuf in go.mod
protoc_gen_go_grpc_version=v1.6.1
tools="${LUCERNA_CACHE:-$HOME/.cache/lucerna}/anchor-protoc-plugins/go-$protoc_gen_go_version-grpc-$protoc_gen_go_grpc_version"
go="${GO:-go}"
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"

if [ ! -x "$tools/protoc-gen-go" ] || [ ! -x "$tools/protoc-gen-go-grpc" ]; then
    mkdir -p "$tools"
    GOBIN="$tools" GOFLAGS= "$go" install "google.golang.org/protobuf/cmd/protoc-gen-go@$protoc_gen_go_version"
    GOBIN="$tools" GOFLAGS= "$go" install "google.golang.org/grpc/cmd/protoc-gen-go-grpc@$protoc_gen_go_grpc_version"
fi

out="$here/gen/anchoringv1"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
target="$out"
[ "${1:-}" = "--check" ] && target="$scratch/check"
# module= strips the go_package's module path, so the files land in $scratch/gen/anchoringv1.
(cd "$repo" && PATH="$tools:$PATH" uv run --quiet python -m grpc_tools.protoc -I protos \
    --go_out="$scratch" --go_opt=module=lucerna.local/anchor \
    --go-grpc_out="$scratch" --go-grpc_opt=module=lucerna.local/anchor \
    protos/lucerna/anchoring/v1/anchoring.proto)
mkdir -p "$target"
cp "$scratch/gen/anchoringv1/"*.go "$target/"
if [ "$target" != "$out" ]; then
    if ! diff -r "$out" "$target" >/dev/null; then
        echo "services/anchor/gen/anchoringv1 is stale: run services/anchor/generate.sh" >&2
        diff -r "$out" "$target" >&2 || true
        exit 1
    fi
fi
