#!/usr/bin/env bash
# What mesh mTLS costs: a client sidecar in front of a server sidecar in front of the origin, plaintext
# and mTLS between the two in the same run, for Ebb and for Envoy (the anchor) with the same
# certificates (made here with openssl: a CA, and SPIFFE-ID workload certificates for both sides).
#
#   HTTP/1.1 keep-alive: wrk -t1 -c50 -d$DURATION --latency     (client -> client sidecar)
#   h2c:                 h2load -t1 -c10 -m10 -D $DURATION
#   new TLS connections: examples/tlsdial, 8 loops of full handshakes (client certificate, no resumption),
#                        each one request with `Connection: close`, straight at the server sidecar
#
# Each proxy runs one worker thread. CPU per request is both sidecars' (user+system, /proc) over the
# run; per handshake, the server sidecar's alone. Env: DURATION (s, default 10), ROUNDS (default 3),
# SKIP_BUILD=1, BENCH_NETNS=0, KEEP_WORK=1.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
DIAL_BIN=$ROOT/target/release/examples/tlsdial
TD=spiffe://cluster.local/ns/bench/sa

[ -n "${SKIP_TOOLS:-}" ] || ensure_tools
build
if [ -z "${SKIP_BUILD:-}" ] || [ ! -x "$DIAL_BIN" ]; then
  (cd "$ROOT" && cargo build --release --example tlsdial)
fi
enter_netns "$@"
setup
HZ=$(getconf CLK_TCK)
RESULTS=$WORK/results.txt
: >"$RESULTS"

# --- certificates --------------------------------------------------------------------------------
PKI=$WORK/pki
mkdir -p "$PKI"
openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/ca.key" 2>/dev/null
openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=bench mesh CA" -days 2 -out "$PKI/ca.crt" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
leaf() { # leaf NAME: $PKI/NAME.{key,crt} for spiffe://.../sa/NAME
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/$1.key" 2>/dev/null
  openssl req -new -key "$PKI/$1.key" -subj "/CN=$1" -out "$PKI/$1.csr" 2>/dev/null
  printf 'subjectAltName=URI:%s/%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n' \
    "$TD" "$1" >"$PKI/$1.ext"
  openssl x509 -req -in "$PKI/$1.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAserial "$PKI/ca.srl" \
    -CAcreateserial -days 1 -extfile "$PKI/$1.ext" -out "$PKI/$1.crt" 2>/dev/null
}
leaf web
leaf client
leaf probe

start_origin origin

# --- Ebb: one server sidecar (permissive: plaintext and mTLS), one client sidecar with a cluster per
# protocol and mode ---------------------------------------------------------------------------------
# The part of both sidecars' configs that is the same: no capture, ephemeral ports, one worker.
ebb_head() {
  cat <<EOF
inbound: { enabled: false }
outbound: { enabled: false }
admin: { bind: 127.0.0.1:0 }
telemetry: { bind: 127.0.0.1:0 }
health: { bind: 127.0.0.1:0 }
workers: 1
log: { level: info }
EOF
}

start_ebb_yaml ebb-server <<EOF
$(ebb_head)
identity: { cert: $PKI/web.crt, key: $PKI/web.key, trust_bundle: $PKI/ca.crt }
listeners:
  - { name: h1, bind: 127.0.0.1:0, target: $O_H1, direction: inbound }
  - { name: h2, bind: 127.0.0.1:0, target: $O_H2, direction: inbound }
EOF
EBB_SERVER=$P_PID
S_H1=$(ebb_addr "$P_LOG" h1)
S_H2=$(ebb_addr "$P_LOG" h2)
ebb_cluster() { # name vip endpoint [identity]
  echo "  - { name: $1, addresses: [$2], endpoints: [{ addr: $3${4:+, identity: $4} }] }"
}
start_ebb_yaml ebb-client <<EOF
$(ebb_head)
identity: { cert: $PKI/client.crt, key: $PKI/client.key, trust_bundle: $PKI/ca.crt }
listeners:
  - { name: plain-h1, bind: 127.0.0.1:0, target: 10.99.0.1:81, direction: outbound }
  - { name: plain-h2, bind: 127.0.0.1:0, target: 10.99.0.1:82, direction: outbound }
  - { name: mtls-h1, bind: 127.0.0.1:0, target: 10.99.0.1:83, direction: outbound }
  - { name: mtls-h2, bind: 127.0.0.1:0, target: 10.99.0.1:84, direction: outbound }
clusters:
$(ebb_cluster plain-h1 10.99.0.1:81 "$S_H1")
$(ebb_cluster plain-h2 10.99.0.1:82 "$S_H2")
$(ebb_cluster mtls-h1 10.99.0.1:83 "$S_H1" "$TD/web")
$(ebb_cluster mtls-h2 10.99.0.1:84 "$S_H2" "$TD/web")
EOF
EBB_CLIENT=$P_PID
declare -A ADDR PIDS_OF
for m in plain mtls; do
  for p in h1 h2; do
    ADDR[ebb-$m-$p]=$(ebb_addr "$P_LOG" "$m-$p")
    PIDS_OF[ebb-$m-$p]="$EBB_CLIENT $EBB_SERVER"
  done
done

# --- Envoy: the same shape ------------------------------------------------------------------------
envoy_tls_listener() { # name port codec cluster alpn
  local tls=type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
  envoy_listener "$1" "$2" "$3" "$4" "$(cat <<EOF
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": $tls
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [$5]
            tls_params: { tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }
            tls_certificates: [{ certificate_chain: { filename: $PKI/web.crt }, private_key: { filename: $PKI/web.key } }]
            validation_context: { trusted_ca: { filename: $PKI/ca.crt } }
EOF
)"
}
envoy_tls_cluster() { # name host:port [h2]
  local tls=type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
  envoy_cluster "$@"
  local alpn='"http/1.1"'
  [ "${3:-}" = h2 ] && alpn='"h2"'
  cat <<EOF
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": $tls
        common_tls_context:
          alpn_protocols: [$alpn]
          tls_params: { tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }
          tls_certificates: [{ certificate_chain: { filename: $PKI/client.crt }, private_key: { filename: $PKI/client.key } }]
          validation_context:
            trusted_ca: { filename: $PKI/ca.crt }
            match_typed_subject_alt_names: [{ san_type: URI, matcher: { exact: "$TD/web" } }]
EOF
}
start_envoy_yaml() { # name: config on stdin; sets P_PID
  local dir
  dir=$(mktemp -d "$WORK/$1.XXXX")
  cat >"$dir/envoy.yaml"
  "$(envoy_path)" -c "$dir/envoy.yaml" --concurrency 1 --disable-hot-restart --log-level warn >"$dir/log" 2>&1 &
  P_PID=$!
  track "$P_PID"
}
read -r ES_ADMIN ES_P1 ES_P2 ES_T1 ES_T2 EC_ADMIN EC_P1 EC_P2 EC_T1 EC_T2 <<<"$(free_ports 10)"
start_envoy_yaml envoy-server <<EOF
admin: { address: { socket_address: { address: 127.0.0.1, port_value: $ES_ADMIN } } }
static_resources:
  listeners:
$(envoy_listener plain-h1 "$ES_P1" HTTP1 origin_h1)
$(envoy_listener plain-h2 "$ES_P2" HTTP2 origin_h2)
$(envoy_tls_listener mtls-h1 "$ES_T1" HTTP1 origin_h1 '"http/1.1"')
$(envoy_tls_listener mtls-h2 "$ES_T2" HTTP2 origin_h2 '"h2"')
  clusters:
$(envoy_cluster origin_h1 "$O_H1")
$(envoy_cluster origin_h2 "$O_H2" h2)
EOF
ENVOY_SERVER=$P_PID
start_envoy_yaml envoy-client <<EOF
admin: { address: { socket_address: { address: 127.0.0.1, port_value: $EC_ADMIN } } }
static_resources:
  listeners:
$(envoy_listener plain-h1 "$EC_P1" HTTP1 server_plain_h1)
$(envoy_listener plain-h2 "$EC_P2" HTTP2 server_plain_h2)
$(envoy_listener mtls-h1 "$EC_T1" HTTP1 server_mtls_h1)
$(envoy_listener mtls-h2 "$EC_T2" HTTP2 server_mtls_h2)
  clusters:
$(envoy_cluster server_plain_h1 "127.0.0.1:$ES_P1")
$(envoy_cluster server_plain_h2 "127.0.0.1:$ES_P2" h2)
$(envoy_tls_cluster server_mtls_h1 "127.0.0.1:$ES_T1")
$(envoy_tls_cluster server_mtls_h2 "127.0.0.1:$ES_T2" h2)
EOF
ENVOY_CLIENT=$P_PID
for port in $ES_P1 $ES_P2 $ES_T1 $ES_T2 $EC_P1 $EC_P2 $EC_T1 $EC_T2; do wait_tcp "127.0.0.1:$port"; done
ADDR[envoy-plain-h1]=127.0.0.1:$EC_P1 ADDR[envoy-plain-h2]=127.0.0.1:$EC_P2
ADDR[envoy-mtls-h1]=127.0.0.1:$EC_T1 ADDR[envoy-mtls-h2]=127.0.0.1:$EC_T2
for k in plain-h1 plain-h2 mtls-h1 mtls-h2; do PIDS_OF[envoy-$k]="$ENVOY_CLIENT $ENVOY_SERVER"; done

# --- load ----------------------------------------------------------------------------------------
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(cpu_ticks "$p"))); done; echo "$t"; }

# measure ROUND PROXY MODE PROTO: appends "round proxy mode proto rps p99_ms errors cpu_us_per_req".
measure() {
  local round=$1 proxy=$2 mode=$3 proto=$4 key=$2-$3-$4
  local addr=${ADDR[$key]} out=$WORK/$key.$1 c0 c1 rps p99 ok errs
  # shellcheck disable=SC2086
  c0=$(ticks ${PIDS_OF[$key]})
  if [ "$proto" = h1 ]; then
    wrk -t1 -c50 -d"${DURATION}s" --latency "http://$addr/" >"$out"
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
    p99=$(wrk_ms "$(awk '$1 == "99%" {print $2}' "$out")")
    ok=$(awk '/ requests in / {print $1}' "$out")
    errs=$(awk '/Socket errors:/ {gsub(",", ""); e += $4 + $6 + $8 + $10}
      /Non-2xx or 3xx responses:/ {e += $5} END {print e + 0}' "$out")
  else
    h2load -t1 -c10 -m10 -D "$DURATION" --log-file "$out.log" "http://$addr/" >"$out"
    rps=$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$out")
    p99=$(h2load_pct_ms "$out.log" 99)
    ok=$(sed -n 's/.* done, \([0-9]*\) succeeded.*/\1/p' "$out")
    errs=$(sed -n 's/.* succeeded, \([0-9]*\) failed.*/\1/p' "$out")
    rm -f "$out.log"
  fi
  # shellcheck disable=SC2086
  c1=$(ticks ${PIDS_OF[$key]})
  cpu=$(awk -v c=$((c1 - c0)) -v hz="$HZ" -v n="$ok" 'BEGIN {printf "%.1f", n ? c / hz * 1e6 / n : 0}')
  echo "$round $proxy $mode $proto $rps $p99 $errs $cpu" >>"$RESULTS"
  log "round $round $key: $rps req/s, p99 ${p99}ms, errors $errs, both sidecars ${cpu}us/req"
}

# handshakes ROUND PROXY ADDR ALPN SERVER_PID: appends "round proxy handshake - per_s - failed cpu_us".
handshakes() {
  local out=$WORK/dial-$2.$1 c0 c1 done failed per_s cpu
  c0=$(cpu_ticks "$5")
  "$DIAL_BIN" --addr "$3" --alpn "$4" --ca "$PKI/ca.crt" --cert "$PKI/probe.crt" --key "$PKI/probe.key" \
    --conns 8 --duration "${DURATION}s" >"$out"
  c1=$(cpu_ticks "$5")
  read -r done failed per_s <<<"$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["completed"], r["failed"], r["per_second"])' "$out")"
  cpu=$(awk -v c=$((c1 - c0)) -v hz="$HZ" -v n="$done" 'BEGIN {printf "%.1f", n ? c / hz * 1e6 / n : 0}')
  echo "$1 $2 handshake - $per_s - $failed $cpu" >>"$RESULTS"
  log "round $1 $2 new TLS connections: $per_s/s, failed $failed, server sidecar ${cpu}us each"
}

for round in $(seq "$ROUNDS"); do
  log "round $round/$ROUNDS (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
  for proto in h1 h2; do
    for proxy in ebb envoy; do
      for mode in plain mtls; do measure "$round" "$proxy" "$mode" "$proto"; done
    done
  done
  handshakes "$round" ebb "$S_H1" ebb-mesh/http/1.1 "$EBB_SERVER"
  handshakes "$round" envoy "127.0.0.1:$ES_T1" http/1.1 "$ENVOY_SERVER"
done

# --- report --------------------------------------------------------------------------------------
col() { # col PROXY MODE PROTO FIELD
  awk -v p="$1" -v m="$2" -v t="$3" -v f="$4" '$2 == p && $3 == m && $4 == t {print $f}' "$RESULTS"
}
echo
echo "## mTLS between sidecars: ${ROUNDS} rounds of ${DURATION}s, medians"
echo
echo "$(date -u +%Y-%m-%d), $(nproc) cores, one worker thread per proxy; client -> client sidecar -> server sidecar -> origin."
for proto in h1 h2; do
  echo
  if [ "$proto" = h1 ]; then echo "### HTTP/1.1 keep-alive (wrk -t1 -c50)"; else echo "### h2c (h2load -t1 -c10 -m10)"; fi
  echo
  echo "| proxy | plaintext req/s | mTLS req/s | plaintext p99 ms | mTLS p99 ms | plaintext CPU µs/req | mTLS CPU µs/req | mTLS CPU cost | errors |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  for proxy in ebb envoy; do
    # shellcheck disable=SC2046
    {
      pr=$(median $(col "$proxy" plain "$proto" 5)); tr=$(median $(col "$proxy" mtls "$proto" 5))
      pp=$(median $(col "$proxy" plain "$proto" 6)); tp=$(median $(col "$proxy" mtls "$proto" 6))
      pc=$(median $(col "$proxy" plain "$proto" 8)); tc=$(median $(col "$proxy" mtls "$proto" 8))
      errs=$( (col "$proxy" plain "$proto" 7; col "$proxy" mtls "$proto" 7) | awk '{s += $1} END {print s + 0}')
    }
    printf '| %s | %.0f | %.0f | %.2f | %.2f | %.1f | %.1f | %+.0f %% | %s |\n' \
      "$proxy" "$pr" "$tr" "$pp" "$tp" "$pc" "$tc" "$(awk -v a="$pc" -v b="$tc" 'BEGIN {print (b / a - 1) * 100}')" "$errs"
  done
done
echo
echo "### New TLS connections (tlsdial: 8 loops, full handshake with a client certificate, one request each)"
echo
echo "| proxy | connections/s | server sidecar CPU µs per connection | failed |"
echo "|---|---:|---:|---:|"
for proxy in ebb envoy; do
  # shellcheck disable=SC2046
  printf '| %s | %.0f | %.1f | %s |\n' "$proxy" "$(median $(col "$proxy" handshake - 5))" \
    "$(median $(col "$proxy" handshake - 8))" "$(col "$proxy" handshake - 7 | awk '{s += $1} END {print s + 0}')"
done
