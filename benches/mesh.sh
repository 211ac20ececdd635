#!/usr/bin/env bash
# Ebb on both sides of a connection, as in a service mesh: an app's requests go through a
# client-side Ebb whose cluster spreads them over server pods, each a server-side Ebb in front of
# its own origin (examples/origin.rs). Two measurements, chosen by MODE:
#
# MODE=drain — does the app see an error when a server pod drains? Per run (fresh processes): the
#   server Ebbs A and B (inbound fixed listeners; drain: announce 1s, timeout 20s), then a client
#   Ebb (outbound fixed listeners h1 and h2 aimed at the service VIPs 127.0.0.1:9 and :10, never
#   dialled; clusters web_h1 and web_h2 whose endpoints are A's and B's listeners, every policy at
#   its default: P2C, retries, outlier ejection, limits, budget). The load generator never
#   retries: wrk -t1 -c50 (HTTP/1.1 keep-alive) or h2load -t1 -c10 -m10 (h2c) for $LOAD s against
#   the client Ebb; $DRAIN_AT s in, SIGTERM to server Ebb A; the script times SIGTERM → A's exit.
#   When the load ends it records what the app saw:
#
#     errors — every request the app did not get a 2xx/3xx answer to:
#              wrk: non-2xx/3xx + socket errors of every kind (connect, read, write, timeout);
#              h2load: failed (streams closed without a 2xx/3xx answer, including those a dying
#              connection abandoned; its `errored` are a subset of these, so not added twice) +
#              started − done beyond c×m. With -D, h2load stops with every connection's streams
#              still open (started − done = c×m = 100 against the origin directly, nothing wrong):
#              those are not errors; more not done than that would be.
#              Unlike drain.sh there is nothing to excuse: the app only ever talks to the client
#              Ebb, which neither drains nor closes a listener, so a refused connect or a stream
#              above a GOAWAY's last stream id is an error like any other. The target is 0.
#     retries — the client Ebb's ebb_cluster_retries_total{cluster="web_PROTO"} by reason,
#              scraped before the load and after it (unprocessed and refused_stream: resends of
#              requests the upstream never saw; connect_failure, reset, status: real retries).
#
#   The client Ebb is started per run, not per protocol: A and B are new processes on new ports in
#   every run, and a client kept across runs would carry the previous run's draining marks,
#   outlier state and pooled connections into the next.
#
# MODE=throughput — what the cluster stack costs on the outbound path. Client Ebbs (workers: 1),
#   all up at once, measured in interleaved rounds (order rotated each round, as proxy.sh):
#     passthrough — outbound fixed listeners whose targets are the origin itself: no cluster
#                   names them, so the passthrough policy serves them (one endpoint: the target);
#     cluster     — listeners aimed at the VIPs; clusters with ONE endpoint, the same origin
#                   (P2C, retries, limits, outlier ejection at their defaults);
#     cluster-2ep — the same with TWO endpoints, two origins (for information: the origin's work
#                   is then spread over two processes, so it is not the same comparison).
#   wrk -t1 -c50 -d$DURATION --latency (HTTP/1.1) and h2load -t1 -c10 -m10 -D $DURATION (h2c), as
#   proxy.sh. Reported: medians over rounds of req/s, p50, p99 and the client Ebb's CPU µs per
#   request, and the median (min–max) of the per-round ratios to passthrough.
#
# Env: MODE (default "drain throughput"); drain: REPS (default 10), LOAD (s, default 6), DRAIN_AT
# (s, default 2), PROTOS (default "h1 h2"), BODY_BYTES (response size, default 16384, as
# drain.sh), CLIENT_LOG (the client Ebb's log filter, default info; "info,ebb=debug" shows each
# request's failure); throughput: ROUNDS (default 3), DURATION (s, default 10). SKIP_BUILD=1,
# BENCH_NETNS=0, KEEP_WORK=1 as in proxy.sh. Smoke run: REPS=1 LOAD=3 DURATION=2 ROUNDS=1.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

MODE=${MODE:-drain throughput}
REPS=${REPS:-10}
LOAD=${LOAD:-6}
DRAIN_AT=${DRAIN_AT:-2}
PROTOS=${PROTOS:-h1 h2}
CLIENT_LOG=${CLIENT_LOG:-info}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
EXIT_LIMIT=30 # s after SIGTERM; a server Ebb still running then is killed and reported as such
H1_CONNS=50
H2_CONNS=10
H2_STREAMS=10
# The addresses the app "dials" for the service: matched against the clusters, never dialled.
VIP_H1=127.0.0.1:9
VIP_H2=127.0.0.1:10

for m in $MODE; do
  case $m in drain | throughput) ;; *) die "unknown MODE $m (drain, throughput)" ;; esac
done
for p in $PROTOS; do
  case $p in h1 | h2) ;; *) die "unknown protocol $p (h1, h2)" ;; esac
done

[ -n "${SKIP_TOOLS:-}" ] || ensure_tools
build
enter_netns "$@"
setup
HZ=$(getconf CLK_TCK)

# client_yaml H1_TARGET H2_TARGET [H1_ENDPOINTS H2_ENDPOINTS]: a client-side Ebb's config, outbound
# listeners h1 and h2 aimed at the targets; with endpoints (space-separated), clusters web_h1 and
# web_h2 whose addresses are those targets. Without, the targets are dialled (passthrough).
client_yaml() {
  cat <<EOF
inbound: { enabled: false }
outbound: { enabled: false }
admin: { bind: 127.0.0.1:0 }
telemetry: { bind: 127.0.0.1:0 }
health: { bind: 127.0.0.1:0 }
workers: 1
log: { level: "$CLIENT_LOG" }
drain: { announce: 1s, timeout: 20s }
listeners:
  - { name: h1, bind: 127.0.0.1:0, target: $1, direction: outbound }
  - { name: h2, bind: 127.0.0.1:0, target: $2, direction: outbound }
EOF
  [ -n "${3:-}" ] || return 0
  echo "clusters:"
  local name vip eps e
  for name in web_h1 web_h2; do
    if [ $name = web_h1 ]; then vip=$1 eps=$3; else vip=$2 eps=$4; fi
    printf '  - name: %s\n    addresses: [%s]\n    endpoints:\n' "$name" "$vip"
    for e in $eps; do echo "      - { addr: $e }"; done
  done
}

# One load of $2 seconds: load_start PROTO SECONDS ADDR OUT starts it in the background (sets LPID).
load_start() {
  case $1 in
  h1) wrk -t1 -c$H1_CONNS -d"$2s" --latency "http://$3/" >"$4" 2>&1 & ;;
  h2) h2load -t1 -c$H2_CONNS -m$H2_STREAMS -D "$2" --log-file "$4.log" "http://$3/" >"$4" 2>&1 & ;;
  esac
  LPID=$!
}

# load_counts PROTO OUT: "ok errors detail" from a finished load's output (see the header).
load_counts() {
  local out=$2
  if [ "$1" = h1 ]; then
    local n rd wr cn to bad
    read -r rd wr cn to bad <<<"$(awk '/Socket errors:/ {gsub(",", ""); c = $4; r = $6; w = $8; t = $10}
      /Non-2xx or 3xx responses:/ {n = $5} END {print r + 0, w + 0, c + 0, t + 0, n + 0}' "$out")"
    n=$(awk '/ requests in / {print $1}' "$out")
    [ -n "$n" ] || {
      echo "? ? no report: $(tail -c 200 "$out" | tr '\n|' '  ')"
      return
    }
    echo "$((n - bad)) $((rd + wr + cn + to + bad)) non-2xx $bad, read $rd, write $wr, connect $cn, timeout $to"
  else
    local started ndone succ failed errored s5
    read -r _ started ndone succ failed errored <<<"$(sed -n \
      's/^requests: \([0-9]*\) total, \([0-9]*\) started, \([0-9]*\) done, \([0-9]*\) succeeded, \([0-9]*\) failed, \([0-9]*\) errored.*/\1 \2 \3 \4 \5 \6/p' "$out")"
    [ -n "${succ:-}" ] || {
      echo "? ? no report: $(tail -c 200 "$out" | tr '\n|' '  ')"
      return
    }
    s5=$(sed -n 's/^status codes: .* \([0-9]*\) 5xx$/\1/p' "$out")
    local extra=$((started - ndone - H2_CONNS * H2_STREAMS))
    [ "$extra" -gt 0 ] || extra=0
    echo "$succ $((failed + extra)) failed $failed (errored $errored, 5xx ${s5:-?}), started−done $((started - ndone))"
  fi
}

# ===================================== MODE=drain ================================================

# retries_of TELEMETRY CLUSTER: "reason count" per line, sorted by reason.
retries_of() {
  metric_samples "$1" ebb_cluster_retries_total "cluster=\"$2\"" |
    sed -n 's/.*reason="\([^"]*\)".* \([0-9.e+]*\)$/\1 \2/p' | sort
}

# The value of the one sample of NAME whose labels contain MATCH (0 if none).
metric_value() {
  metric_samples "$1" "$2" "$3" | awk '{s += $NF} END {printf "%.0f", s}'
}

# run_drain PROTO REP: one drain of server Ebb A under load; appends a line to $RUNS.
run_drain() {
  local proto=$1 rep=$2 a_pid a_log a_h1 a_h2 a_ep b_pid b_ep c_pid c_log c_tel addr
  start_ebb "$A_H1" "$A_H2" # pod A: its server Ebb in front of its origin
  a_pid=$P_PID a_log=$P_LOG a_h1=$P_H1 a_h2=$P_H2
  start_ebb "$B_H1" "$B_H2" # pod B
  b_pid=$P_PID
  if [ "$proto" = h1 ]; then a_ep=$a_h1 b_ep=$P_H1; else a_ep=$a_h2 b_ep=$P_H2; fi
  start_ebb_yaml client < <(client_yaml $VIP_H1 $VIP_H2 "$a_h1 $P_H1" "$a_h2 $P_H2")
  c_pid=$P_PID c_log=$P_LOG c_tel=$P_TELEMETRY
  addr=$(ebb_addr "$c_log" "$proto")
  [ -n "$addr" ] || die "no listener $proto in $c_log"
  local cluster=web_$proto out=$WORK/drain.$proto.$rep r0 r1
  r0=$(retries_of "$c_tel" "$cluster")

  local t0 t1 tpid rc=0
  load_start "$proto" "$LOAD" "$addr" "$out"
  sleep "$DRAIN_AT"
  t0=$EPOCHREALTIME
  kill -TERM "$a_pid"
  (
    sleep $EXIT_LIMIT
    kill -KILL "$a_pid" 2>/dev/null
  ) &
  tpid=$!
  wait "$a_pid" || rc=$?
  t1=$EPOCHREALTIME
  untrack "$a_pid"
  kill "$tpid" 2>/dev/null || true
  wait "$tpid" 2>/dev/null || true
  wait "$LPID" || true
  local exit_ms
  exit_ms=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", (b - a) * 1000}')
  [ "$rc" -ne 137 ] || exit_ms=">${EXIT_LIMIT}000 (killed)"

  # What the client Ebb did: retries by reason (after − before), first attempts, attempts per
  # endpoint, and the 5xx it answered itself.
  r1=$(retries_of "$c_tel" "$cluster")
  local retries total reqs att_a att_b c5xx
  retries=$(join -a2 -e0 -o '0,1.2,2.2' <(echo "$r0") <(echo "$r1") 2>/dev/null |
    awk '$1 != "" && $3 - $2 > 0 {printf "%s%s %d", (n++ ? ", " : ""), $1, $3 - $2} END {if (!n) printf "none"}')
  total=$(join -a2 -e0 -o '0,1.2,2.2' <(echo "$r0") <(echo "$r1") 2>/dev/null |
    awk '$1 != "" {s += $3 - $2} END {print s + 0}')
  reqs=$(metric_value "$c_tel" ebb_cluster_requests_total "cluster=\"$cluster\"")
  att_a=$(metric_value "$c_tel" ebb_endpoint_requests_total "endpoint=\"$a_ep\"")
  att_b=$(metric_value "$c_tel" ebb_endpoint_requests_total "endpoint=\"$b_ep\"")
  c5xx=$(metric_samples "$c_tel" ebb_requests_total 'status_class="5xx"' |
    awk '/direction="outbound"/ {s += $NF} END {printf "%.0f", s}')

  local ok errors detail
  read -r ok errors detail <<<"$(load_counts "$proto" "$out")"
  rm -f "$out.log"
  local note="" d
  d=$(grep -m1 '"message":"Drained"' "$a_log" || true)
  [ -z "$d" ] || note="A: drained in $(json_num elapsed_ms "$d") ms, closed gracefully \
$(json_num closed_gracefully "$d"), forced $(json_num forced "$d"), requests completed \
$(json_num requests_completed "$d")"

  # B and the client go too (SIGTERM: each drains its 1 s announce, with nothing left to drain).
  kill -TERM "$b_pid" "$c_pid" 2>/dev/null || true
  stop_pid "$b_pid"
  stop_pid "$c_pid"
  [ -z "${KEEP_WORK:-}" ] || cp "$c_log" "$WORK/client.$proto.$rep.log"

  echo "$proto|$rep|$ok|$errors|$detail|$exit_ms|$rc|$retries|$total|$reqs|$att_a|$att_b|$c5xx|$note" >>"$RUNS"
  log "drain $proto #$rep: ok $ok, errors $errors ($detail), A exit ${exit_ms} ms (rc $rc), retries $total ($retries), first attempts $reqs, attempts A $att_a B $att_b, client 5xx $c5xx; $note"
}

# The number in field NAME of the JSON line LINE: json_num NAME LINE.
json_num() { sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p" <<<"$2"; }

drain_mode() {
  RUNS=$WORK/runs.txt
  : >"$RUNS"
  BODY_FLAGS=(--body-bytes "${BODY_BYTES:-16384}")
  log "drain: pods A and B (origin + server Ebb each), ${BODY_BYTES:-16384}-byte responses, REPS=$REPS, PROTOS=$PROTOS"
  start_origin origin-a "${BODY_FLAGS[@]}"
  A_H1=$O_H1 A_H2=$O_H2 A_ORIGIN=$O_PID
  start_origin origin-b "${BODY_FLAGS[@]}"
  B_H1=$O_H1 B_H2=$O_H2 B_ORIGIN=$O_PID

  # Restarts a dead origin; returns 1 if either had died.
  origins_ok() {
    local ok=0
    revive_origin origin-a "$A_ORIGIN" "${BODY_FLAGS[@]}" || ok=1
    A_ORIGIN=$O_PID
    revive_origin origin-b "$B_ORIGIN" "${BODY_FLAGS[@]}" || ok=1
    B_ORIGIN=$O_PID
    return $ok
  }

  local rep proto attempt lines
  for rep in $(seq "$REPS"); do
    for proto in $PROTOS; do
      # A run during which an origin died (killed from outside) measures nothing: drop it and
      # run it again.
      for attempt in 1 2 3; do
        origins_ok || true
        lines=$(wc -l <"$RUNS")
        run_drain "$proto" "$rep"
        if origins_ok; then break; fi
        log "warning: an origin died during that run; discarding it (attempt $attempt)"
        head -n "$lines" "$RUNS" >"$RUNS.tmp" && mv "$RUNS.tmp" "$RUNS"
      done
    done
  done

  local label='function label(p) { return p == "h1" ? "HTTP/1.1 (wrk)" : "h2c (h2load)" }'
  echo
  echo "## Two-sided drain through clusters: ${REPS} repetitions, SIGTERM to a server Ebb ${DRAIN_AT}s into ${LOAD}s of load"
  echo
  echo "Machine: $(nproc) cores, shared; $(date -u +%Y-%m-%d). Load (never retries): wrk -t1 -c$H1_CONNS (HTTP/1.1"
  echo "keep-alive), h2load -t1 -c$H2_CONNS -m$H2_STREAMS (h2c), through a client Ebb (cluster of two server Ebbs, every"
  echo "policy at its default) to two origins (${BODY_BYTES:-16384}-byte responses). Server Ebb A drains"
  echo "(announce 1s, timeout 20s); errors are every request the app did not get a 2xx/3xx answer to."
  echo
  echo "### Summary"
  echo
  echo "| proto | runs | runs with 0 errors | errors (total) | errors (each run) | requests ok (total) | retries by reason (total) | A: SIGTERM → exit ms |"
  echo "|---|---:|---:|---:|---|---:|---|---|"
  for proto in $PROTOS; do
    awk -F'|' -v p="$proto" "$label"'
      $1 == p { n++; if ($4 == "0") z++; e += $4; ok += $3; each = each (n > 1 ? ", " : "") $4
        ms = $6 + 0; if (n == 1 || ms < lo) lo = ms; if (n == 1 || ms > hi) hi = ms
        k = split($8, parts, ", ")
        for (i = 1; i <= k; i++) if (parts[i] != "none") { split(parts[i], rv, " "); r[rv[1]] += rv[2] } }
      END { if (!n) exit
        rs = ""; for (x in r) rs = rs (rs == "" ? "" : ", ") x " " r[x]; if (rs == "") rs = "none"
        printf "| %s | %d | %d | %d | %s | %d | %s | %d–%d |\n", label(p), n, z, e, each, ok, rs, lo, hi }' "$RUNS"
  done
  echo
  echo "### Every run"
  echo
  echo "| proto | # | ok | errors | app's counters | A exit ms | A exit code | retries | first attempts | attempts to A / B | client Ebb 5xx | A's drain report |"
  echo "|---|---:|---:|---:|---|---:|---:|---|---:|---|---:|---|"
  sort -t'|' -k1,1 -k2,2n "$RUNS" | awk -F'|' "$label"'{printf "| %s | %s | %s | %s | %s | %s | %s | %s (%s) | %s | %s / %s | %s | %s |\n",
    label($1), $2, $3, $4, $5, $6, $7, $9, $8, $10, $11, $12, $13, $14}'
}

# =================================== MODE=throughput =============================================

# measure ROUND TARGET PROTO ADDR PID: one load run (as proxy.sh); appends
# "round target proto rps p50_ms p99_ms errors cpu_us_per_req" to $RESULTS.
measure() {
  local round=$1 target=$2 proto=$3 addr=$4 pid=$5
  local out=$WORK/$target.$proto.$round c0 c1 rps p50 p99 errs ok cpu
  c0=$(cpu_ticks "$pid")
  if [ "$proto" = h1 ]; then
    wrk -t1 -c$H1_CONNS -d"${DURATION}s" --latency "http://$addr/" >"$out"
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
    p50=$(wrk_ms "$(awk '$1 == "50%" {print $2}' "$out")")
    p99=$(wrk_ms "$(awk '$1 == "99%" {print $2}' "$out")")
  else
    h2load -t1 -c$H2_CONNS -m$H2_STREAMS -D "$DURATION" --log-file "$out.log" "http://$addr/" >"$out"
    rps=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$out")
    p50=$(h2load_pct_ms "$out.log" 50)
    p99=$(h2load_pct_ms "$out.log" 99)
  fi
  read -r ok errs _ <<<"$(load_counts "$proto" "$out")"
  rm -f "$out.log"
  c1=$(cpu_ticks "$pid")
  cpu=$(awk -v c=$((c1 - c0)) -v hz="$HZ" -v n="$ok" 'BEGIN {printf "%.1f", n ? c / hz * 1e6 / n : 0}')
  echo "$round $target $proto $rps $p50 $p99 $errs $cpu" >>"$RESULTS"
  log "round $round $target $proto: $rps req/s, p50 ${p50}ms, p99 ${p99}ms, errors $errs, cpu ${cpu}us/req"
}

throughput_mode() {
  RESULTS=$WORK/results.txt
  : >"$RESULTS"
  log "throughput: origins + client Ebbs passthrough, cluster, cluster-2ep (DURATION=${DURATION}s, ROUNDS=$ROUNDS)"
  start_origin origin-1
  local o1_h1=$O_H1 o1_h2=$O_H2
  O1_PID=$O_PID
  start_origin origin-2
  local o2_h1=$O_H1 o2_h2=$O_H2
  O2_PID=$O_PID
  declare -A H1 H2 PID IDLE_RSS
  local t
  for t in passthrough cluster cluster-2ep; do
    case $t in
    passthrough) start_ebb_yaml "$t" < <(client_yaml "$o1_h1" "$o1_h2") ;;
    cluster) start_ebb_yaml "$t" < <(client_yaml $VIP_H1 $VIP_H2 "$o1_h1" "$o1_h2") ;;
    cluster-2ep) start_ebb_yaml "$t" < <(client_yaml $VIP_H1 $VIP_H2 "$o1_h1 $o2_h1" "$o1_h2 $o2_h2") ;;
    esac
    H1[$t]=$(ebb_addr "$P_LOG" h1) H2[$t]=$(ebb_addr "$P_LOG" h2) PID[$t]=$P_PID
    IDLE_RSS[$t]=$(awk '/^VmRSS:/ {print $2}' "/proc/$P_PID/status")
  done

  local targets=(passthrough cluster cluster-2ep) round n shift_by order proto addr attempt lines
  for round in $(seq "$ROUNDS"); do
    log "round $round/$ROUNDS (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    n=${#targets[@]}
    shift_by=$(((round - 1) % n))
    order=("${targets[@]:shift_by}" "${targets[@]:0:shift_by}")
    for proto in h1 h2; do
      for t in "${order[@]}"; do
        if [ "$proto" = h1 ]; then addr=${H1[$t]}; else addr=${H2[$t]}; fi
        # As proxy.sh: a measurement during which an origin died is dropped and taken again.
        for attempt in 1 2 3; do
          revive_origin origin-1 "$O1_PID" || true
          O1_PID=$O_PID
          revive_origin origin-2 "$O2_PID" || true
          O2_PID=$O_PID
          lines=$(wc -l <"$RESULTS")
          measure "$round" "$t" "$proto" "$addr" "${PID[$t]}"
          running "${PID[$t]}" || die "$t (pid ${PID[$t]}) died during the run"
          local died=
          revive_origin origin-1 "$O1_PID" || died=1
          O1_PID=$O_PID
          revive_origin origin-2 "$O2_PID" || died=1
          O2_PID=$O_PID
          [ -n "$died" ] || break
          log "warning: an origin died during that run; discarding it (attempt $attempt)"
          head -n "$lines" "$RESULTS" >"$RESULTS.tmp" && mv "$RESULTS.tmp" "$RESULTS"
        done
      done
    done
  done
  declare -A PEAK
  for t in "${targets[@]}"; do PEAK[$t]=$(peak_rss_kib "${PID[$t]}"); done

  # Per-round ratios to the passthrough run of the same round and protocol.
  awk '{key = $1 " " $3} $2 == "passthrough" {rps[key] = $4; p99[key] = $6; cpu[key] = $8}
    {row[NR] = $0; k[NR] = key}
    END {for (i = 1; i <= NR; i++) {split(row[i], f, " ");
      printf "%s %.4f %.4f %.4f\n", row[i], f[4] / rps[k[i]], f[6] / p99[k[i]], f[8] / cpu[k[i]]}}' \
    "$RESULTS" >"$WORK/ratios.txt"

  col() { # col TARGET PROTO FIELD: that field's values over all rounds
    awk -v t="$1" -v p="$2" -v f="$3" '$2 == t && $3 == p {print $f}' "$WORK/ratios.txt"
  }
  spread() { # median (min–max) of the arguments, two decimals
    local m
    m=$(median "$@")
    printf '%s\n' "$@" | sort -g | awk -v m="$m" 'NR == 1 {lo = $1} {hi = $1}
      END {printf "%.2f (%.2f–%.2f)", m, lo, hi}'
  }

  echo
  echo "## Cluster stack cost on the outbound path: ${ROUNDS} rounds of ${DURATION}s, medians over rounds"
  echo
  echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), shared;"
  echo "$(date -u +%Y-%m-%d). Load: wrk -t1 -c$H1_CONNS (HTTP/1.1 keep-alive); h2load -t1 -c$H2_CONNS -m$H2_STREAMS (h2c)."
  echo "A client Ebb (workers: 1) per config; ratios are the median (min–max) of per-round ratios to passthrough."
  local rps p50 p99 errs cpu rr r99 rcpu idle peak
  for proto in h1 h2; do
    echo
    if [ "$proto" = h1 ]; then echo "### HTTP/1.1 (wrk)"; else echo "### h2c (h2load)"; fi
    echo
    echo "| config | req/s | req/s vs passthrough | p50 ms | p99 ms | p99 vs passthrough | Ebb CPU µs/req | CPU vs passthrough | errors | RSS idle MiB | peak RSS MiB |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for t in "${targets[@]}"; do
      # shellcheck disable=SC2046
      {
        rps=$(median $(col "$t" "$proto" 4))
        p50=$(median $(col "$t" "$proto" 5))
        p99=$(median $(col "$t" "$proto" 6))
        errs=$(col "$t" "$proto" 7 | awk '{s += $1} END {print s + 0}')
        cpu=$(median $(col "$t" "$proto" 8))
        rr=$(spread $(col "$t" "$proto" 9))
        r99=$(spread $(col "$t" "$proto" 10))
        rcpu=$(spread $(col "$t" "$proto" 11))
      }
      idle=$(awk -v k="${IDLE_RSS[$t]}" 'BEGIN {printf "%.1f", k / 1024}')
      peak=$(awk -v k="${PEAK[$t]}" 'BEGIN {printf "%.1f", k / 1024}')
      printf '| %s | %.0f | %s | %.2f | %.2f | %s | %s | %s | %s | %s | %s |\n' \
        "$t" "$rps" "$rr" "$p50" "$p99" "$r99" "$cpu" "$rcpu" "$errs" "$idle" "$peak"
    done
  done
  echo
  echo "Peak RSS is VmHWM over the whole run (both protocols)."
  echo
  echo "<details><summary>Per-round results</summary>"
  echo
  echo "| round | config | proto | req/s | p50 ms | p99 ms | errors | CPU µs/req | req/s vs passthrough | p99 vs passthrough | CPU vs passthrough |"
  echo "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  awk '{printf "| %s | %s | %s | %.0f | %.2f | %.2f | %s | %s | %.2f | %.2f | %.2f |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11}' \
    "$WORK/ratios.txt"
  echo
  echo "</details>"
}

for m in $MODE; do
  case $m in
  drain) drain_mode ;;
  throughput) throughput_mode ;;
  esac
done
