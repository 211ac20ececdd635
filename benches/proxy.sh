#!/usr/bin/env bash
# Throughput comparison: Ebb against Envoy, HAProxy and NGINX, each with one worker thread, in
# front of the same origin (examples/origin.rs), against the origin reached directly.
#
#   HTTP/1.1 keep-alive: wrk -t1 -c50 -d$DURATION --latency
#   h2c (prior knowledge): h2load -t1 -c10 -m10 -D $DURATION (latencies from its --log-file)
#
# Targets run interleaved (direct, ebb, envoy, haproxy, nginx; rotated each round) so drift on a
# shared machine hits all of them alike, for $ROUNDS rounds. Reported per target: medians over
# rounds of req/s, p50, p99, of the per-round ratios to the direct run of the same round, of the
# proxy's CPU time per request (user+system, from /proc: the number least disturbed by other load
# on the machine), and each proxy's peak RSS (VmHWM) over the whole run.
#
# Env: DURATION (s, default 10), ROUNDS (default 3), PROXIES (default "ebb envoy haproxy nginx"),
# SKIP_BUILD=1 (use the existing release binaries), BENCH_NETNS=0 (no private network
# namespace), KEEP_WORK=1 (keep the raw outputs). Quick smoke run: DURATION=2 ROUNDS=1.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
PROXIES=${PROXIES:-ebb envoy haproxy nginx}
H1_CONNS=50
H2_CONNS=10
H2_STREAMS=10

[ -n "${SKIP_TOOLS:-}" ] || ensure_tools
build
enter_netns "$@"
setup
HZ=$(getconf CLK_TCK)
RESULTS=$WORK/results.txt
: >"$RESULTS"

# measure ROUND TARGET PROTO ADDR PID: one load run; appends
# "round target proto rps p50_ms p99_ms errors cpu_us_per_req" to $RESULTS.
measure() {
  local round=$1 target=$2 proto=$3 addr=$4 pid=$5
  local out=$WORK/$target.$proto.$round c0=0 c1=0 rps p50 p99 errs ok cpu=nan
  [ -z "$pid" ] || c0=$(cpu_ticks "$pid")
  if [ "$proto" = h1 ]; then
    wrk -t1 -c$H1_CONNS -d"${DURATION}s" --latency "http://$addr/" >"$out"
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
    p50=$(wrk_ms "$(awk '$1 == "50%" {print $2}' "$out")")
    p99=$(wrk_ms "$(awk '$1 == "99%" {print $2}' "$out")")
    ok=$(awk '/ requests in / {print $1}' "$out")
    # Socket errors (connect/read/write/timeout) and non-2xx/3xx answers; none expected.
    errs=$(awk '/Socket errors:/ {gsub(",", ""); e += $4 + $6 + $8 + $10}
      /Non-2xx or 3xx responses:/ {e += $5} END {print e + 0}' "$out")
  else
    h2load -t1 -c$H2_CONNS -m$H2_STREAMS -D "$DURATION" --log-file "$out.log" "http://$addr/" >"$out"
    rps=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$out")
    p50=$(h2load_pct_ms "$out.log" 50)
    p99=$(h2load_pct_ms "$out.log" 99)
    ok=$(sed -n 's/.* done, \([0-9]*\) succeeded.*/\1/p' "$out")
    errs=$(sed -n 's/.* succeeded, \([0-9]*\) failed.*/\1/p' "$out")
    rm -f "$out.log"
  fi
  if [ -n "$pid" ]; then
    c1=$(cpu_ticks "$pid")
    cpu=$(awk -v c=$((c1 - c0)) -v hz="$HZ" -v n="$ok" 'BEGIN {printf "%.1f", n ? c / hz * 1e6 / n : 0}')
  fi
  echo "$round $target $proto $rps $p50 $p99 $errs $cpu" >>"$RESULTS"
  log "round $round $target $proto: $rps req/s, p50 ${p50}ms, p99 ${p99}ms, errors $errs, cpu ${cpu}us/req"
}

log "origin + proxies (DURATION=${DURATION}s, ROUNDS=$ROUNDS, PROXIES=$PROXIES)"
start_origin origin
ORIGIN_PID=$O_PID
declare -A H1 H2 PID IDLE_RSS
H1[direct]=$O_H1 H2[direct]=$O_H2 PID[direct]=
for p in $PROXIES; do
  "start_$p" "$O_H1" "$O_H2"
  H1[$p]=$P_H1 H2[$p]=$P_H2 PID[$p]=$P_PID
  IDLE_RSS[$p]=$(awk '/^VmRSS:/ {print $2}' "/proc/$P_PID/status")
done

read -ra targets <<<"direct $PROXIES"
for round in $(seq "$ROUNDS"); do
  log "round $round/$ROUNDS (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
  # Rotate the order each round so no target always runs first (or right after another).
  n=${#targets[@]}
  shift_by=$(((round - 1) % n))
  order=("${targets[@]:shift_by}" "${targets[@]:0:shift_by}")
  for proto in h1 h2; do
    for t in "${order[@]}"; do
      if [ "$proto" = h1 ]; then addr=${H1[$t]}; else addr=${H2[$t]}; fi
      # On a shared machine a process can be killed from outside: a measurement during which
      # the origin or the proxy died is dropped and taken again (the origin is restarted on
      # its ports; a dead proxy ends the benchmark, as its peak RSS would be lost).
      for attempt in 1 2 3; do
        revive_origin origin "$ORIGIN_PID" || true
        ORIGIN_PID=$O_PID
        lines=$(wc -l <"$RESULTS")
        measure "$round" "$t" "$proto" "$addr" "${PID[$t]}"
        [ -z "${PID[$t]}" ] || running "${PID[$t]}" || die "$t (pid ${PID[$t]}) died during the run"
        if revive_origin origin "$ORIGIN_PID"; then break; fi
        ORIGIN_PID=$O_PID
        log "warning: the origin died during that run; discarding it (attempt $attempt)"
        head -n "$lines" "$RESULTS" >"$RESULTS.tmp" && mv "$RESULTS.tmp" "$RESULTS"
      done
    done
  done
done

declare -A PEAK SPLIT
for p in $PROXIES; do
  PEAK[$p]=$(peak_rss_kib "${PID[$p]}")
  SPLIT[$p]=$(rss_split_kib "${PID[$p]}")
done

# --- report --------------------------------------------------------------------------------------

# Per-round ratios to the direct run of the same round and protocol.
awk '{key = $1 " " $3} $2 == "direct" {rps[key] = $4; p99[key] = $6} {row[NR] = $0; k[NR] = key}
  END {for (i = 1; i <= NR; i++) {split(row[i], f, " ");
    printf "%s %.4f %.4f\n", row[i], f[4] / rps[k[i]], f[6] / p99[k[i]]}}' "$RESULTS" >"$WORK/ratios.txt"

col() { # col TARGET PROTO FIELD: that field's values over all rounds
  awk -v t="$1" -v p="$2" -v f="$3" '$2 == t && $3 == p {print $f}' "$WORK/ratios.txt"
}

echo
echo "## Throughput: ${ROUNDS} rounds of ${DURATION}s, medians over rounds"
echo
echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), shared;"
echo "$(date -u +%Y-%m-%d). Load: wrk -t1 -c$H1_CONNS (HTTP/1.1 keep-alive); h2load -t1 -c$H2_CONNS -m$H2_STREAMS (h2c)."
echo "Every proxy runs one worker thread. Ratios are medians of per-round ratios to the direct run."
for proto in h1 h2; do
  echo
  if [ "$proto" = h1 ]; then echo "### HTTP/1.1 (wrk)"; else echo "### h2c (h2load)"; fi
  echo
  echo "| target | upstream | req/s | req/s vs direct | p50 ms | p99 ms | p99 vs direct | proxy CPU µs/req | errors | RSS idle MiB | peak RSS MiB |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for t in "${targets[@]}"; do
    # shellcheck disable=SC2046
    {
      rps=$(median $(col "$t" "$proto" 4))
      p50=$(median $(col "$t" "$proto" 5))
      p99=$(median $(col "$t" "$proto" 6))
      errs=$(col "$t" "$proto" 7 | awk '{s += $1} END {print s + 0}')
      cpu=$(median $(col "$t" "$proto" 8))
      r=$(median $(col "$t" "$proto" 9))
      r99=$(median $(col "$t" "$proto" 10))
    }
    if [ "$t" = direct ]; then
      idle=- peak=- cpu=-
    else
      idle=$(awk -v k="${IDLE_RSS[$t]}" 'BEGIN {printf "%.1f", k / 1024}')
      peak=$(awk -v k="${PEAK[$t]}" 'BEGIN {printf "%.1f", k / 1024}')
    fi
    printf '| %s | %s | %.0f | %.2f | %.2f | %.2f | %.2f | %s | %s | %s | %s |\n' \
      "$t" "$(upstream_mapping "$t")" "$rps" "$r" "$p50" "$p99" "$r99" "$cpu" "$errs" "$idle" "$peak"
  done
done
echo
echo "Peak RSS is VmHWM over the whole run (both protocols); NGINX's is master + worker."
echo
echo "Resident memory at the end of the run, split: anonymous (heap, stacks: the proxy's own) and"
echo "file-backed (its binary's and libraries' pages, shared with every process mapping them):"
echo
echo "| proxy | anonymous MiB | file-backed MiB |"
echo "|---|---:|---:|"
for p in $PROXIES; do
  read -r anon file <<<"${SPLIT[$p]}"
  awk -v p="$p" -v a="$anon" -v f="$file" 'BEGIN {printf "| %s | %.1f | %.1f |\n", p, a / 1024, f / 1024}'
done
echo
echo "<details><summary>Per-round results</summary>"
echo
echo "| round | target | proto | req/s | p50 ms | p99 ms | errors | CPU µs/req | req/s vs direct | p99 vs direct |"
echo "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"
awk '{printf "| %s | %s | %s | %.0f | %.2f | %.2f | %s | %s | %.2f | %.2f |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10}' \
  "$WORK/ratios.txt"
echo
echo "</details>"
