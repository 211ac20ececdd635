#!/usr/bin/env bash
# Drain under load: how many requests does a proxy break when it is told to shut down, and how
# long does it take to exit? Ebb against Envoy, HAProxy and NGINX, each started fresh per run.
#
# One run: start the proxy; start the load (wrk -t1 -c50 HTTP/1.1 keep-alive, h2load -t1 -c10
# -m10 h2c, or h2churn: 10 h2c connections × 10 streams that reconnect after every GOAWAY) for
# $LOAD s; $DRAIN_AT s in, trigger the proxy's graceful shutdown; time trigger → process exit; when
# the load ends, classify what the client saw:
#
#   broken  — a request the client wrote that never got a complete response:
#             wrk: read errors (EOF/reset before a full response) + timeouts + non-2xx/3xx, plus
#             any write/connect errors beyond the refused connects below;
#             h2load: failed (streams closed without a 2xx/3xx response: reset, refused by
#             GOAWAY, non-2xx; `errored` is the subset that ended in an error) less those never
#             sent (see below), + streams started but never done (abandoned when the connection
#             died under them);
#             h2churn (examples/h2churn.rs): streams the server accepted (at or below the final
#             GOAWAY's last stream id, not reset with REFUSED_STREAM) that did not end with
#             :status 200 and END_STREAM: reset, non-200, or the connection closed under them.
#             Its streams above the last stream id or refused with REFUSED_STREAM ("refused
#             streams", in the client's counters) were never processed and are not broken.
#   refused — connection attempts refused after the listeners closed (the kernel answered the
#             SYN with RST). Counted exactly from the network namespace's own TCP counter
#             (/proc/net/snmp Tcp AttemptFails), as wrk reports them mixed into "write" errors
#             (a refused non-blocking connect surfaces on its first write). They never carried a
#             request. h2load never reconnects an HTTP/2 connection, so it has none; h2churn
#             reconnects until the load ends, so it has them once the listeners close.
#
# Triggers: Ebb SIGTERM (drain: announce 1s, timeout 20s); Envoy POST /drain_listeners?graceful
# (--drain-time-s 1, --drain-strategy immediate), wait the drain time, POST /quitquitquit — and,
# as "envoy-wait", the same but polling until no downstream connection is left (≤20 s) before
# /quitquitquit; HAProxy SIGUSR1 (soft-stop), with and without `option idle-close-on-response`;
# NGINX SIGQUIT (graceful shutdown). Two origins: fast, and slow (50–200 ms per response).
#
# Env: REPS (default 3), LOAD (s, default 6), DRAIN_AT (s, default 2), VARIANTS (default
# "ebb envoy envoy-wait haproxy haproxy-idle-close nginx"), PROTOS ("h1 h2 h2churn"), ORIGINS
# ("fast slow"), BODY_BYTES (response size, default 16384), SKIP_BUILD=1, BENCH_NETNS=0,
# KEEP_WORK=1 (as in proxy.sh).
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

REPS=${REPS:-3}
LOAD=${LOAD:-6}
DRAIN_AT=${DRAIN_AT:-2}
VARIANTS=${VARIANTS:-ebb envoy envoy-wait haproxy haproxy-idle-close nginx}
PROTOS=${PROTOS:-h1 h2 h2churn}
ORIGINS=${ORIGINS:-fast slow}
EXIT_LIMIT=30 # s after the trigger; a proxy still running then is killed and reported as such

[ -n "${SKIP_TOOLS:-}" ] || ensure_tools
build
enter_netns "$@"
setup
[ -n "${BENCH_IN_NETNS:-}" ] ||
  log "warning: not in a private network namespace: 'refused' also counts other processes' connects"
RUNS=$WORK/runs.txt
: >"$RUNS"

# Value of one Tcp counter from /proc/net/snmp (header line names the columns).
tcp_counter() {
  awk -v name="$1" '$1 == "Tcp:" { if (!hdr) { for (i = 2; i <= NF; i++) col[$i] = i; hdr = 1 }
    else print $col[name] }' /proc/net/snmp
}

# The number in field NAME of the JSON line LINE: json_num NAME LINE.
json_num() { sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p" <<<"$2"; }

start_variant() {
  case $1 in
  ebb) start_ebb "$2" "$3" ;;
  envoy | envoy-wait) start_envoy "$2" "$3" ;;
  haproxy) IDLE_CLOSE=0 start_haproxy "$2" "$3" ;;
  haproxy-idle-close) IDLE_CLOSE=1 start_haproxy "$2" "$3" ;;
  nginx) start_nginx "$2" "$3" ;;
  *) die "unknown variant $1" ;;
  esac
}

# Envoy's open downstream connections on both listeners.
envoy_active() {
  curl -s "http://$1/stats?filter=^http\.h[12]\.downstream_cx_active$" |
    awk -F': ' '{s += $2} END {print s + 0}'
}

# Runs in the background so that trigger → exit is timed by the main shell's `wait`.
trigger() {
  local variant=$1 pid=$2 admin=$3
  case $variant in
  ebb) kill -TERM "$pid" ;;
  envoy | envoy-wait)
    curl -s -o /dev/null -X POST "http://$admin/drain_listeners?graceful"
    sleep 1 # --drain-time-s
    if [ "$variant" = envoy-wait ]; then
      for _ in $(seq 400); do
        [ "$(envoy_active "$admin")" -gt 0 ] || break
        sleep 0.05
      done
    fi
    curl -s -o /dev/null -X POST "http://$admin/quitquitquit" || true
    ;;
  haproxy*) kill -USR1 "$pid" ;;
  nginx) kill -QUIT "$pid" ;;
  esac
}

# run VARIANT PROTO ORIGIN REP: one drain under load; appends a line to $RUNS.
run() {
  local variant=$1 proto=$2 origin=$3 rep=$4 up1 up2
  if [ "$origin" = fast ]; then up1=$FAST_H1 up2=$FAST_H2; else up1=$SLOW_H1 up2=$SLOW_H2; fi
  start_variant "$variant" "$up1" "$up2"
  local pid=$P_PID admin=$P_ADMIN plog=$P_LOG addr out=$WORK/$variant.$proto.$origin.$rep
  if [ "$proto" = h1 ]; then addr=$P_H1; else addr=$P_H2; fi
  local a0 a1 lpid tpid wpid t0 t1 rc=0
  a0=$(tcp_counter AttemptFails)
  case $proto in
  h1) wrk -t1 -c50 -d"${LOAD}s" --latency "http://$addr/" >"$out" 2>&1 & ;;
  h2) h2load -t1 -c10 -m10 -D "$LOAD" --log-file "$out.log" "http://$addr/" >"$out" 2>&1 & ;;
  h2churn) "$CHURN_BIN" --addr "$addr" --conns 10 --streams 10 --duration "${LOAD}s" >"$out" 2>"$out.err" & ;;
  *) die "unknown protocol $proto" ;;
  esac
  lpid=$!
  sleep "$DRAIN_AT"
  t0=$EPOCHREALTIME
  trigger "$variant" "$pid" "$admin" &
  tpid=$!
  (
    sleep $EXIT_LIMIT
    kill -KILL "$pid" 2>/dev/null
  ) &
  wpid=$!
  wait "$pid" || rc=$?
  t1=$EPOCHREALTIME
  untrack "$pid"
  kill "$wpid" 2>/dev/null || true
  wait "$wpid" 2>/dev/null || true
  wait "$tpid" || true
  wait "$lpid" || true
  a1=$(tcp_counter AttemptFails)
  local refused=$((a1 - a0)) exit_ms
  exit_ms=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", (b - a) * 1000}')
  [ "$rc" -ne 137 ] || exit_ms=">${EXIT_LIMIT}000 (killed)"

  local ok broken detail
  if [ "$proto" = h1 ]; then
    local rd wr cn to bad
    read -r rd wr cn to bad <<<"$(awk '/Socket errors:/ {gsub(",", ""); c = $4; r = $6; w = $8; t = $10}
      /Non-2xx or 3xx responses:/ {n = $5} END {print r + 0, w + 0, c + 0, t + 0, n + 0}' "$out")"
    ok=$(awk '/ requests in / {print $1}' "$out")
    local extra=$((wr + cn - refused))
    [ "$extra" -gt 0 ] || extra=0
    broken=$((rd + to + bad + extra))
    detail="read $rd, write $wr, connect $cn, timeout $to, non-2xx $bad"
  elif [ "$proto" = h2churn ]; then
    local streams_refused conns goaways cerr sample
    read -r ok streams_refused broken conns goaways cerr <<<"$(churn_counts "$out")"
    detail="refused streams $streams_refused, connections $conns (GOAWAY $goaways), connect errors $cerr"
    [ "$ok" != "?" ] || detail="no report: $(tail -c 300 "$out.err" 2>/dev/null | tr '\n|' '  ')"
    sample=$(churn_sample "$out")
    [ -z "$sample" ] || log "$variant $proto $origin #$rep: first broken sample: $sample"
  else
    local started ndone succ failed errored
    read -r _ started ndone succ failed errored <<<"$(sed -n \
      's/^requests: \([0-9]*\) total, \([0-9]*\) started, \([0-9]*\) done, \([0-9]*\) succeeded, \([0-9]*\) failed, \([0-9]*\) errored.*/\1 \2 \3 \4 \5 \6/p' "$out")"
    ok=$succ
    # h2load counts a request as started when it submits it to nghttp2, and as failed when its
    # stream closes without a 2xx/3xx answer. A request submitted in the same read that brought
    # a GOAWAY is never sent: nghttp2 refuses to open the stream and closes it locally. Its
    # --log-file line then has no send time (first column 0); those are "never sent", not
    # broken. Streams started but not done were in flight when the load ended (only possible
    # while the proxy still ran; flagged below) or abandoned when their connection died.
    local unsent unanswered=$((started - ndone))
    unsent=$(awk -F'\t' '$2 == -1 && $1 == 0' "$out.log" | wc -l)
    broken=$((failed - unsent + unanswered))
    detail="failed $failed (never sent $unsent), errored $errored, started−done $unanswered"
    if awk -v e="$t1" -v s="$t0" -v l="$((LOAD - DRAIN_AT))" 'BEGIN {exit !(e - s > l)}'; then
      detail="$detail (proxy outlived the load: started−done includes streams still in flight)"
    fi
  fi
  local note=
  if [ "$variant" = ebb ]; then
    # Field by field: the log line may gain fields (e.g. the drain's scope) between these.
    local d
    d=$(grep -m1 '"message":"Drained"' "$plog" || true)
    [ -z "$d" ] || note="report: drained in $(json_num elapsed_ms "$d") ms, closed gracefully \
$(json_num closed_gracefully "$d"), forced $(json_num forced "$d"), requests completed \
$(json_num requests_completed "$d")"
  fi
  echo "$variant|$proto|$origin|$rep|$ok|$broken|$detail|$refused|$exit_ms|$rc|$note" >>"$RUNS"
  log "$variant $proto $origin #$rep: ok $ok, broken $broken ($detail), refused $refused, exit ${exit_ms} ms (rc $rc) $note"
}

# Responses span several DATA frames and flow-control updates, so a close that drops unsent bytes
# shows as broken streams (BODY_BYTES=0 answers "ok\n").
BODY_FLAGS=(--body-bytes "${BODY_BYTES:-16384}")
SLOW_FLAGS=(--delay-min-ms 50 --delay-max-ms 200 "${BODY_FLAGS[@]}")
log "origins: fast and slow (50-200 ms), ${BODY_BYTES:-16384}-byte responses"
start_origin fast "${BODY_FLAGS[@]}"
FAST_H1=$O_H1 FAST_H2=$O_H2 FAST_PID=$O_PID
start_origin slow "${SLOW_FLAGS[@]}"
SLOW_H1=$O_H1 SLOW_H2=$O_H2 SLOW_PID=$O_PID

# Restarts a dead origin; returns 1 if either had died.
origins_ok() {
  local ok=0
  revive_origin fast "$FAST_PID" "${BODY_FLAGS[@]}" || ok=1
  FAST_PID=$O_PID
  revive_origin slow "$SLOW_PID" "${SLOW_FLAGS[@]}" || ok=1
  SLOW_PID=$O_PID
  return $ok
}

# Repetitions outermost, so the runs of one configuration are spread over the whole benchmark.
for rep in $(seq "$REPS"); do
  for origin in $ORIGINS; do
    for proto in $PROTOS; do
      for variant in $VARIANTS; do
        # A run during which an origin died (killed from outside) measures nothing: drop it and
        # run it again.
        for attempt in 1 2 3; do
          origins_ok || true
          lines=$(wc -l <"$RUNS")
          run "$variant" "$proto" "$origin" "$rep"
          if origins_ok; then break; fi
          log "warning: an origin died during that run; discarding it (attempt $attempt)"
          head -n "$lines" "$RUNS" >"$RUNS.tmp" && mv "$RUNS.tmp" "$RUNS"
        done
      done
    done
  done
done

# --- report --------------------------------------------------------------------------------------
echo
echo "## Drain under load: ${REPS} repetitions, trigger ${DRAIN_AT}s into ${LOAD}s of load"
echo
echo "Machine: $(nproc) cores, shared; $(date -u +%Y-%m-%d). Loads: wrk -t1 -c50 (HTTP/1.1 keep-alive),"
echo "h2load -t1 -c10 -m10 (h2c), h2churn 10 connections × 10 streams (h2c, a new connection after"
echo "every GOAWAY). Origins: fast, and slow (50–200 ms per response)."
# The protocol's name in the tables (an awk function, put in front of the awk programs below).
LABEL='function label(p) { return p == "h1" ? "HTTP/1.1" : p == "h2" ? "h2c" : p == "h2churn" ? "h2c churn" : p }'
echo
echo "### Summary"
echo
echo "| proxy | proto | origin | broken (each run) | refused connects (each run) | trigger → exit ms (each run) |"
echo "|---|---|---|---|---|---|"
for variant in $VARIANTS; do
  for proto in $PROTOS; do
    for origin in $ORIGINS; do
      awk -F'|' -v v="$variant" -v p="$proto" -v o="$origin" "$LABEL"'
        $1 == v && $2 == p && $3 == o {
          b = b (n ? ", " : "") $6; r = r (n ? ", " : "") $8; e = e (n ? ", " : "") $9; n++ }
        END { if (n) printf "| %s | %s | %s | %s | %s | %s |\n", v, label(p), o, b, r, e }' "$RUNS"
    done
  done
done
echo
echo "### Every run"
echo
echo "| proxy | proto | origin | # | completed | broken | client's counters | refused | trigger → exit ms | exit code | note |"
echo "|---|---|---|---:|---:|---:|---|---:|---:|---:|---|"
sort -t'|' -k1,1 -k2,2 -k3,3 -k4,4n "$RUNS" | awk -F'|' "$LABEL"'{printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
  $1, label($2), $3, $4, $5, $6, $7, $8, $9, $10, $11}'
