#!/usr/bin/env bash
# Config push latency and memory of the reference control plane.
#
# Starts `ebb control-plane` on a mesh file, connects N sidecar clients (examples/plane_bench.rs: raw
# StreamResources streams that ACK everything), then for ROUNDS rounds rewrites the file and measures
# the time from the write to every client having ACKed the new version. The plane polls its file
# every 100 ms (a stat), so a push waits up to that long before it starts; the spread within a round is what
# the streams cost. Also reads the plane's RSS before and after the clients connect: memory per
# connected sidecar.
#
# Env: SIDECARS (default "10 100"), ROUNDS (default 10), SKIP_BUILD=1.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

SIDECARS=${SIDECARS:-10 100}
ROUNDS=${ROUNDS:-10}
if [ -z "${SKIP_BUILD:-}" ]; then
  log "building (release)"
  (cd "$ROOT" && cargo build --release --locked --bin ebb --example plane_bench)
fi
BENCH_BIN=$ROOT/target/release/examples/plane_bench
WORK=$(mktemp -d)
trap 'kill "${PLANE:-}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

for n in $SIDECARS; do
  mesh=$WORK/mesh-$n.yaml
  printf 'clusters: []\n' >"$mesh"
  "$EBB_BIN" control-plane --config "$mesh" --listen 127.0.0.1:0 --log-format json --log-level info \
    >"$WORK/plane-$n.log" 2>&1 &
  PLANE=$!
  addr=""
  for _ in $(seq 100); do
    addr=$(sed -n 's/.*"addr":"\([0-9.:]*\)".*"listener":"control-plane".*/\1/p; s/.*"listener":"control-plane".*"addr":"\([0-9.:]*\)".*/\1/p' "$WORK/plane-$n.log" | head -1)
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || die "control plane did not start: $(cat "$WORK/plane-$n.log")"
  idle=$(rss_kib "$PLANE")
  "$BENCH_BIN" --plane "http://$addr" --mesh "$mesh" --sidecars "$n" --rounds "$ROUNDS" >"$WORK/bench-$n.out" &
  bench=$!
  for _ in $(seq 300); do
    grep -q '^connected' "$WORK/bench-$n.out" 2>/dev/null && break
    sleep 0.1
  done
  loaded=$(rss_kib "$PLANE")
  wait "$bench"
  cat "$WORK/bench-$n.out"
  per=$(((loaded - idle) / n))
  echo "plane RSS: idle ${idle} KiB, with $n sidecars ${loaded} KiB: $per KiB per sidecar"
  kill "$PLANE" 2>/dev/null || true
  wait "$PLANE" 2>/dev/null || true
done
