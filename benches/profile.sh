#!/usr/bin/env bash
# Where Ebb spends its CPU under the proxy.sh load: samples the ebb process with `perf record`
# while wrk (HTTP/1.1) and then h2load (h2c) run through it, and prints the hottest symbols
# (self time) of each. The release profile keeps debug info (debug = 1), so symbols resolve.
#
# Env: SECONDS_PER_PROTO (default 6), TOP (symbols shown, default 30), PERF_FREQ (default 1999),
# PERF_CALLGRAPH (default -g; "--call-graph dwarf,16384" resolves callers in the release build, which
# has no frame pointers; then read the kept perf.data with `perf report -G`), SKIP_BUILD=1,
# BENCH_NETNS=0, KEEP_WORK=1 (keep the perf.data files).
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

SECS=${SECONDS_PER_PROTO:-6}
TOP=${TOP:-30}

if [ -z "${SKIP_TOOLS:-}" ]; then
  ensure_tools
  command -v perf >/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
  }
fi
build
enter_netns "$@"
setup

start_origin origin
start_ebb "$O_H1" "$O_H2"
for proto in h1 h2; do
  # The load runs a second longer than the sampling, so perf sees steady state only.
  if [ "$proto" = h1 ]; then
    wrk -t1 -c50 -d"$((SECS + 2))s" "http://$P_H1/" >"$WORK/load.$proto" &
  else
    h2load -t1 -c10 -m10 -D "$((SECS + 2))" "http://$P_H2/" >"$WORK/load.$proto" &
  fi
  load=$!
  sleep 1
  perf record -q -F ${PERF_FREQ:-1999} ${PERF_CALLGRAPH:--g} -p "$P_PID" -o "$WORK/perf.$proto.data" -- sleep "$SECS" 2>/dev/null
  wait "$load"
  echo
  if [ "$proto" = h1 ]; then echo "### HTTP/1.1 (wrk -t1 -c50)"; else echo "### h2c (h2load -t1 -c10 -m10)"; fi
  echo
  grep -E 'Requests/sec|^finished' "$WORK/load.$proto" | sed 's/^/    /'
  echo
  echo '```text'
  perf report -i "$WORK/perf.$proto.data" --no-children --sort dso,sym --stdio -g none \
    --percent-limit 0.7 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n "$TOP"
  echo '```'
done
