#!/usr/bin/env bash
# Installs what the integration tests need on a fresh Debian 12 machine: the Debian servers and
# tools (RabbitMQ, Orthanc + DICOMweb, DCMTK, a JDK, Maven), FerretDB built from the Go module
# proxy, Elasticsearch's integ-test zip from Maven Central, the FHIR peer (fhir-peer/, a HAPI FHIR
# server built with Maven), the Hyperledger Fabric binaries built from the Go module proxy, and uv.
#
# Idempotent and quick on repeat: every step checks before it acts, and slow results are cached
# outside the repository in ${LUCERNA_CACHE:-$HOME/.cache/lucerna}, keyed by version.
#
# Usage: install.sh [apt|ferretdb|elasticsearch|fhir-peer|fabric|uv]...   (no argument: all of them)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
. "$here/versions.env"

cache="${LUCERNA_CACHE:-$HOME/.cache/lucerna}"
server_user="${LUCERNA_SERVER_USER:-lucerna}"
apt_packages=(
    rabbitmq-server orthanc orthanc-dicomweb dcmtk
    openjdk-17-jdk-headless maven unzip curl ca-certificates
    wrk  # the HTTP load generator of the FHIR benchmark
)
package_services=(rabbitmq-server orthanc)

scratch=()
cleanup() { [ "${#scratch[@]}" -eq 0 ] || rm -rf "${scratch[@]}"; }
trap cleanup EXIT

log() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" -eq 0 ]; }

as_root() {
    if is_root; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "root is needed for: $*"
    fi
}

# Sets $scratch_dir to a new temporary folder removed at exit. (Not a $(...) helper: a subshell
# could not register the folder for cleanup.)
new_scratch_dir() {
    scratch_dir="$(mktemp -d "${1:-${TMPDIR:-/tmp}}/.lucerna-install.XXXXXX")"
    scratch+=("$scratch_dir")
}

# ---- Debian packages -------------------------------------------------------------------------

install_apt() {
    local pkg missing=()
    for pkg in "${apt_packages[@]}"; do
        if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]; then
            missing+=("$pkg")
        fi
    done
    [ "${#missing[@]}" -eq 0 ] && return 0

    log "apt: installing ${missing[*]}"
    # The tests start their own broker and PACS on other ports; keep the packages' services from
    # starting at install time (policy-rc.d is honoured by invoke-rc.d and deb-systemd-invoke).
    local own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    local rc=0
    # A third-party source that cannot be reached fails the update without hurting Debian's own.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q ||
        log "warning: apt-get update reported errors; installing anyway"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" || rc=$?
    if [ -n "$own_policy" ]; then
        as_root rm -f /usr/sbin/policy-rc.d
    fi
    [ "$rc" -eq 0 ] || die "apt-get failed (exit $rc)"
    stop_package_services
}

stop_package_services() {
    local svc
    for svc in "${package_services[@]}"; do
        if [ -d /run/systemd/system ]; then
            as_root systemctl disable --now "$svc" >/dev/null 2>&1 || true
        elif [ -x "/etc/init.d/$svc" ] && "/etc/init.d/$svc" status >/dev/null 2>&1; then
            as_root "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
        fi
    done
}

# ---- Go (to build FerretDB and Fabric) -------------------------------------------------------

go_is_recent() {
    local version
    version="$(GOTOOLCHAIN=local "$1" env GOVERSION 2>/dev/null)" || return 1
    version="${version#go}"
    [ "$(printf '%s\n' 1.24 "$version" | sort -V | head -n1)" = 1.24 ]
}

# Sets $go_bin to a Go >= 1.24, fetching the toolchain module from the Go proxy if none exists.
find_go() {
    local candidate
    for candidate in "$(command -v go || true)" /usr/local/go/bin/go \
        "$cache/go-$GO_TOOLCHAIN_VERSION/bin/go"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && go_is_recent "$candidate"; then
            go_bin="$candidate"
            return 0
        fi
    done

    local arch
    case "$(uname -m)" in
        x86_64) arch=amd64 ;;
        aarch64 | arm64) arch=arm64 ;;
        *) die "no Go toolchain for $(uname -m)" ;;
    esac
    local mod="v0.0.1-go$GO_TOOLCHAIN_VERSION.linux-$arch" work dest="$cache/go-$GO_TOOLCHAIN_VERSION"
    new_scratch_dir
    work="$scratch_dir"
    log "go: fetching toolchain go$GO_TOOLCHAIN_VERSION from the Go module proxy"
    curl -fsSL --retry 3 -o "$work/go.zip" "https://proxy.golang.org/golang.org/toolchain/@v/$mod.zip"
    unzip -q "$work/go.zip" -d "$work/unpacked"
    # Module zips carry no file modes.
    chmod -R u+w,a+rX "$work/unpacked"
    chmod a+x "$work/unpacked/golang.org/toolchain@$mod/bin/"* \
        "$work/unpacked/golang.org/toolchain@$mod/pkg/tool/"*/*
    mkdir -p "$cache"
    rm -rf "$dest"
    mv "$work/unpacked/golang.org/toolchain@$mod" "$dest"
    go_is_recent "$dest/bin/go" || die "the fetched Go toolchain does not run"
    go_bin="$dest/bin/go"
}

# ---- FerretDB --------------------------------------------------------------------------------

ferretdb_ok() {
    [ -x "$1" ] && "$1" --version 2>/dev/null | grep -qx "version: $FERRETDB_VERSION"
}

install_ferretdb() {
    local dir="$cache/ferretdb-$FERRETDB_VERSION-$FERRETDB_PATCHES"
    ferretdb_ok "$dir/ferretdb" && return 0

    local go work
    find_go
    go="$go_bin"
    new_scratch_dir
    work="$scratch_dir"
    log "ferretdb: building $FERRETDB_VERSION with $go (a few minutes on a cold machine)"
    # `go install ...@v1.24.2` is refused by the proxy (403 on the module's version list), so build
    # the command as a dependency of the small pinned module in infra/local/ferretdb.
    cp "$here/ferretdb/go.mod" "$here/ferretdb/go.sum" "$here/ferretdb/tools.go" "$work/"
    (cd "$work" && GOTOOLCHAIN=local "$go" mod vendor)
    # FerretDB's version package panics at start unless build/version/version.txt names the
    # release; the module zip leaves that generated file out, so supply it in the vendored copy.
    printf '%s\n' "$FERRETDB_VERSION" >"$work/vendor/github.com/FerretDB/FerretDB/build/version/version.txt"
    # Its SQLite handler looks documents up by `_ferretdb_sjson->'$._id'` but indexes
    # `_ferretdb_sjson->"_id"`, so SQLite never uses the _id index and every lookup, update and
    # delete by _id scans the collection (1 ms at 100 documents, 46 ms at 20,000). Make the lookup
    # the indexed expression (infra/local/ferretdb/README.md).
    local metadata="$work/vendor/github.com/FerretDB/FerretDB/internal/backends/sqlite/metadata/metadata.go"
    grep -q "IDColumn = DefaultColumn + \"->'\$._id'\"" "$metadata" || die "ferretdb: the _id patch no longer applies"
    sed -i "s|IDColumn = DefaultColumn + \"->'\$._id'\"|IDColumn = DefaultColumn + \`->\"_id\"\`|" "$metadata"
    mkdir -p "$dir"
    (cd "$work" && CGO_ENABLED=0 GOTOOLCHAIN=local "$go" build -mod=vendor -trimpath \
        -o "$dir/ferretdb.partial" github.com/FerretDB/FerretDB/cmd/ferretdb)
    mv -f "$dir/ferretdb.partial" "$dir/ferretdb"
    ferretdb_ok "$dir/ferretdb" || die "the FerretDB binary built in $dir does not report $FERRETDB_VERSION"
}

# ---- Elasticsearch ---------------------------------------------------------------------------

# Elasticsearch refuses to run as root, so under root it runs as $server_user, which must be able
# to read its tree: put the tree outside root's home (keep in step with servers.py).
es_home() {
    if [ -n "${LUCERNA_ES_HOME:-}" ]; then
        printf '%s\n' "$LUCERNA_ES_HOME"
    elif is_root; then
        printf '%s\n' "/opt/lucerna/elasticsearch-$ELASTICSEARCH_VERSION"
    else
        printf '%s\n' "$cache/elasticsearch-$ELASTICSEARCH_VERSION"
    fi
}

install_elasticsearch() {
    local zip="$cache/dl/elasticsearch-$ELASTICSEARCH_VERSION.zip" home work
    home="$(es_home)"
    if [ ! -x "$home/bin/elasticsearch" ]; then
        if [ ! -s "$zip" ]; then
            new_scratch_dir
            work="$scratch_dir"
            log "elasticsearch: downloading the $ELASTICSEARCH_VERSION integ-test zip from Maven Central"
            mvn -B -q -Dstyle.color=never org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy \
                "-Dartifact=org.elasticsearch.distribution.integ-test-zip:elasticsearch:$ELASTICSEARCH_VERSION:zip" \
                "-DoutputDirectory=$work"
            mkdir -p "$cache/dl"
            mv -f "$work/elasticsearch-$ELASTICSEARCH_VERSION.zip" "$zip"
        fi
        log "elasticsearch: unpacking into $home"
        mkdir -p "$(dirname "$home")"
        # Unpack beside the destination, so that the final move is a rename.
        new_scratch_dir "$(dirname "$home")"
        work="$scratch_dir"
        unzip -q "$zip" -d "$work"
        chmod -R a+rX "$work/elasticsearch-$ELASTICSEARCH_VERSION"
        rm -rf "$home"
        mv "$work/elasticsearch-$ELASTICSEARCH_VERSION" "$home"
    fi
    ensure_server_user
}

ensure_server_user() {
    is_root || return 0
    id -u "$server_user" >/dev/null 2>&1 && return 0
    log "creating the unprivileged system user '$server_user' to run Elasticsearch"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin "$server_user"
}

# ---- FHIR peer -------------------------------------------------------------------------------

# The hash of the peer's sources: a jar built from other sources is rebuilt (servers.py computes the
# same hash to refuse a stale jar: keep the two in step).
fhir_peer_source_hash() {
    (cd "$here/fhir-peer" && find pom.xml src -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) |
        sha256sum | cut -d' ' -f1
}

install_fhir_peer() {
    local dir="$cache/fhir-peer-$FHIR_PEER_VERSION" hash work
    hash="$(fhir_peer_source_hash)"
    if [ -s "$dir/fhir-peer.jar" ] && [ "$(cat "$dir/source.sha256" 2>/dev/null)" = "$hash" ]; then
        return 0
    fi
    new_scratch_dir
    work="$scratch_dir"
    log "fhir-peer: building on HAPI FHIR $FHIR_PEER_VERSION with Maven (about a minute on a cold machine)"
    # Built in a copy, so that the repository gets no target/ folder.
    cp -r "$here/fhir-peer/pom.xml" "$here/fhir-peer/src" "$work/"
    (cd "$work" && mvn -B -q -Dstyle.color=never "-Dhapi.version=$FHIR_PEER_VERSION" package)
    mkdir -p "$dir"
    mv -f "$work/target/fhir-peer.jar" "$dir/fhir-peer.jar"
    printf '%s\n' "$hash" >"$dir/source.sha256"
}

# ---- Hyperledger Fabric ----------------------------------------------------------------------

fabric_ok() {
    local name
    for name in peer orderer osnadmin configtxgen cryptogen; do
        [ -x "$1/bin/$name" ] || return 1
    done
    [ -f "$1/sampleconfig/core.yaml" ] && [ -f "$1/sampleconfig/orderer.yaml" ] || return 1
    "$1/bin/peer" version 2>/dev/null | grep -q "Version: $FABRIC_VERSION\$"
}

install_fabric() {
    local dir="$cache/fabric-$FABRIC_VERSION" go work module_dir
    fabric_ok "$dir" && return 0

    grep -qx "require github.com/hyperledger/fabric $FABRIC_MODULE_VERSION" "$here/fabric/go.mod" ||
        die "fabric: infra/local/fabric/go.mod does not require FABRIC_MODULE_VERSION=$FABRIC_MODULE_VERSION"
    find_go
    go="$go_bin"
    new_scratch_dir
    work="$scratch_dir"
    log "fabric: building $FABRIC_VERSION ($FABRIC_COMMIT) with $go (about 2 minutes of 2 cores, cold)"
    # Fabric's module path has no /v2, so the proxy knows its releases only as pseudo-versions of
    # the release commits, and refuses `go install ...@version` (it reads the module's version
    # list, which it does not serve). Build the commands as dependencies of a pinned module whose
    # go.sum holds the hashes, as for FerretDB.
    cp "$here/fabric/go.mod" "$here/fabric/go.sum" "$here/fabric/tools.go" "$work/"
    mkdir -p "$work/out/bin"
    (cd "$work" && GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0 "$go" build -trimpath \
        -ldflags "-X github.com/hyperledger/fabric/common/metadata.Version=$FABRIC_VERSION -X github.com/hyperledger/fabric/common/metadata.CommitSHA=${FABRIC_COMMIT:0:12}" \
        -o "$work/out/bin/" github.com/hyperledger/fabric/cmd/peer github.com/hyperledger/fabric/cmd/orderer \
        github.com/hyperledger/fabric/cmd/osnadmin github.com/hyperledger/fabric/cmd/configtxgen \
        github.com/hyperledger/fabric/cmd/cryptogen)
    # The nodes' default configuration (core.yaml, orderer.yaml) comes with the module's source.
    module_dir="$(cd "$work" && GOTOOLCHAIN=local GOFLAGS=-mod=readonly "$go" list -m -f '{{.Dir}}' github.com/hyperledger/fabric)"
    [ -f "$module_dir/sampleconfig/core.yaml" ] || die "fabric: no sampleconfig in $module_dir"
    cp -r "$module_dir/sampleconfig" "$work/out/sampleconfig"
    chmod -R u+w "$work/out/sampleconfig"
    mkdir -p "$cache"
    rm -rf "$dir"
    mv "$work/out" "$dir"
    fabric_ok "$dir" || die "the Fabric binaries built in $dir do not report version $FABRIC_VERSION"
}

# ---- uv --------------------------------------------------------------------------------------

install_uv() {
    if command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1; then
        return 0
    fi
    log "uv: installing $UV_VERSION"
    python3 -m pip install -q "uv==$UV_VERSION"
    if command -v pyenv >/dev/null 2>&1; then
        pyenv rehash
    fi
}

# ---- main ------------------------------------------------------------------------------------

main() {
    local steps=("$@") step
    if [ "${#steps[@]}" -eq 0 ]; then
        steps=(apt ferretdb elasticsearch fhir-peer fabric uv)
    fi
    for step in "${steps[@]}"; do
        case "$step" in
            apt) install_apt ;;
            ferretdb) install_ferretdb ;;
            elasticsearch) install_elasticsearch ;;
            fhir-peer) install_fhir_peer ;;
            fabric) install_fabric ;;
            uv) install_uv ;;
            *) die "unknown step '$step' (apt, ferretdb, elasticsearch, fhir-peer, fabric, uv)" ;;
        esac
    done
}

main "$@"
