#!/usr/bin/env bash
# Idle connections: memory per idle HTTP/1.1 and HTTP/2 client connection (N of each, default
# 10 000), and how long a drain takes to close N idle HTTP/1.1 connections once its close phase
# begins (the target: within drain.idle_close_window + 100 ms).
#
# Ebb runs as in proxy.sh (one worker, fixed listeners to the origin), with max_connections raised
# to fit N. examples/idle_conns.rs opens the connections, one request each, then leaves them idle.
# RSS is Ebb's VmRSS after the connections settle, minus before, in a fresh Ebb per protocol; per
# connection includes the upstream connection Ebb keeps for each HTTP/1.1 client.
#
# Env: HTTP1_IDLE (default 1h), SETTLE (s, default 2), CONNS (default 10000; with a hard descriptor limit of 20 000, as on the benchmark machine, use
# 9000: Ebb needs two per idle HTTP/1.1 connection), SKIP_BUILD=1, BENCH_NETNS=0.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

CONNS=${CONNS:-10000}
# The idle timeout of the HTTP/1.1 clients (long, so none is closed while measured), and how long the
# connections sit before RSS is read: past a quarter of HTTP1_IDLE plus upstream.idle_timeout (4 s), an
# idle client's upstream connection has gone back to the pool and been closed.
HTTP1_IDLE=${HTTP1_IDLE:-1h}
SETTLE=${SETTLE:-2}
IDLE_BIN=$ROOT/target/release/examples/idle_conns
if [ -z "${SKIP_BUILD:-}" ]; then
  build
  (cd "$ROOT" && cargo build --release --example idle_conns)
fi
enter_netns "$@"
setup
# As many descriptors as the hard limit allows (an HTTP/1.1 client connection costs Ebb two: it keeps
# an upstream connection for each).
ulimit -n "$(ulimit -Hn)"

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
start_origin origin
for proto in h2 h1; do
  # A fresh Ebb per protocol: memory the first protocol's connections freed would otherwise be
  # reused by the second's, and its RSS growth would understate them.
  EBB_EXTRA_YAML="downstream: { http1_idle_timeout: $HTTP1_IDLE }" start_ebb "$O_H1" "$O_H2"
  before=$(rss_kib "$P_PID")
  if [ "$proto" = h1 ]; then addr=$P_H1; else addr=$P_H2; fi
  exec 3> >("$IDLE_BIN" --addr "$addr" --proto "$proto" --conns "$CONNS" >"$WORK/idle.$proto" 2>&1)
  # Tracked, so that a failure below cannot leave cleanup waiting on it (it exits when fd 3 closes).
  track $!
  for _ in $(seq 600); do
    grep -q '^open' "$WORK/idle.$proto" 2>/dev/null && break
    sleep 0.1
  done
  sleep "$SETTLE"
  after=$(rss_kib "$P_PID")
  opened=$(sed -n 's/^open //p' "$WORK/idle.$proto")
  [ -n "$opened" ] || die "idle_conns opened nothing: $(tail -3 "$WORK/idle.$proto")"
  echo "$proto: $opened idle connections: Ebb RSS $before -> $after KiB: $(((after - before) * 1024 / opened)) bytes per connection"
  if [ "$proto" = h1 ]; then
    # Drain with these connections open: time from the close phase to the last one closed.
    curl -s -X POST "http://$P_ADMIN/drain" >/dev/null
    for _ in $(seq 400); do
      phase=$(curl -s "http://$P_ADMIN/drain" | sed -n 's/.*"phase":"\([a-z]*\)".*/\1/p' | head -1)
      [ "$phase" = drained ] && break
      sleep 0.05
    done
    curl -s "http://$P_ADMIN/drain" >"$WORK/report.json"
    python3 - "$WORK/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
at = {p["phase"]: p["at_ms"] for p in r["phases"]}
print(f"h1 drain: closing at {at.get('closing')} ms, drained at {at.get('drained')} ms: "
      f"{at.get('drained', 0) - at.get('closing', 0)} ms to close {r['at_start']['connections']} connections "
      f"(idle closes {r['idle_closes']}, forced {r['forced_closes']})")
PY
  fi
  exec 3>&-
  stop_pid "$P_PID" 10
done
