#!/usr/bin/env bash
# Instructions per request: Ebb's user-space work per proxied request, counted by callgrind (valgrind)
# over a fixed number of requests. Unlike CPU time on a shared 2-core machine (±5 % run to run), the
# count repeats to within about 1 %, so it shows changes of a few percent that timing cannot. It counts
# instructions, not cycles (no cache misses, no kernel time): read it next to proxy.sh's CPU per request.
#
# For each build given (default: this tree's release build), Ebb runs under callgrind with the
# proxy.sh listeners; after a warm-up, counters are zeroed, N requests go through (HTTP/1.1: h2load
# --h1, 20 connections; h2c: h2load, 4 connections x 10 streams), and the dump is divided by N. Prints a
# table, and the per-crate split of the last build's counts.
#
# Env: BUILDS ("name=path ..."; default "ebb=target/release/ebb"), N (default 20000), SKIP_BUILD=1,
# KEEP_WORK=1 (keep the callgrind files), BENCH_NETNS=0.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

N=${N:-20000}
BUILDS=${BUILDS:-ebb=$EBB_BIN}
if [ -z "${SKIP_TOOLS:-}" ]; then
  ensure_tools
  command -v valgrind >/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
  }
fi
build
enter_netns "$@"
setup
start_origin origin

# Self cost from a callgrind dump by the crate whose source it came from (inlined code counts where it
# was written, not in the function it was inlined into; the standard library's inlined generics count
# for the crate of the function they were inlined into).
split_by_crate() {
  python3 - "$1" "$N" <<'PY'
import collections, re, sys
cost = collections.Counter(); cur = fl = fn = None; after_call = False; total = 0
for line in open(sys.argv[1], errors="replace"):
    line = line.rstrip("\n")
    if line.startswith("fl="):
        fl = cur = re.sub(r"^\(\d+\) ?", "", line[3:])
    elif line.startswith(("fi=", "fe=")):
        cur = re.sub(r"^\(\d+\) ?", "", line[3:])
    elif line.startswith("fn="):
        cur = fl; fn = re.sub(r"^\(\d+\) ?", "", line[3:])
    elif line.startswith("calls="):
        after_call = True
    elif line.startswith("summary:"):
        total = int(line.split()[1])
    elif line[:1].isdigit() or line[:1] in "+-*":
        parts = line.split()
        if len(parts) >= 2:
            if after_call:
                after_call = False
            else:
                cost[(cur, fn)] += int(parts[1])
def group(key):
    path, fn = key[0] or "?", key[1] or "?"
    m = re.search(r"/registry/src/[^/]+/([A-Za-z0-9_-]+?)-\d[^/]*/", path)
    if m: return m.group(1)
    if "/rustc/" in path:
        krate = re.sub(r"^<", "", fn).split("::")[0]
        return krate.replace("_", "-") if krate and krate not in ("core", "alloc", "std") else "Rust std/core/alloc"
    if re.search(r"memmove|memcpy|memset", path): return "libc memcpy"
    if "malloc" in path: return "libc malloc"
    if path.startswith("/") and "/src/" in path and "sysdeps" not in path: return "ebb"
    return "other (libc, vdso)"
g = collections.Counter()
for f, c in cost.items(): g[group(f)] += c
n = int(sys.argv[2])
for f, c in g.most_common(14): print(f"    {c / n:8.0f}  {100 * c / total:5.1f} %  {f}")
PY
}

echo "| build | HTTP/1.1 instructions/request | h2c instructions/request |"
echo "|---|---:|---:|"
for b in $BUILDS; do
  name=${b%%=*} bin=${b#*=}
  [ -x "$bin" ] || die "no binary at $bin"
  cat >"$WORK/vg-$name" <<WRAP
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$WORK/cg.$name.%p --dump-instr=no --compress-strings=no --compress-pos=no "$bin" "\$@"
WRAP
  chmod +x "$WORK/vg-$name"
  EBB_BIN=$WORK/vg-$name start_ebb "$O_H1" "$O_H2"
  # Warm-up: pools, buffers, lazily built tables.
  wrk -t1 -c20 -d1s "http://$P_H1/" >/dev/null
  h2load -t1 -c4 -m10 -n 2000 "http://$P_H2/" >/dev/null
  row="| $name |"
  for proto in h1 h2; do
    callgrind_control -z "$P_PID" >/dev/null
    if [ "$proto" = h1 ]; then
      h2load --h1 -t1 -c20 -n "$N" "http://$P_H1/" >"$WORK/load"
    else
      h2load -t1 -c4 -m10 -n "$N" "http://$P_H2/" >"$WORK/load"
    fi
    grep -q "^requests: $N total, $N started, $N done, $N succeeded" "$WORK/load" || die "not all of $N requests succeeded: $(grep '^requests:' "$WORK/load")"
    callgrind_control -d "$proto" "$P_PID" >/dev/null
    for _ in $(seq 50); do
      f=$(find "$WORK" -name "cg.$name.$P_PID.*" -newer "$WORK/load" | sort | tail -1)
      [ -n "$f" ] && grep -q '^totals:\|^summary:' "$f" && break
      sleep 0.1
    done
    ir=$(grep -m1 -E '^(summary|totals):' "$f" | awk '{print $2}')
    row="$row $((ir / N)) |"
    cp "$f" "$WORK/$name.$proto.callgrind"
  done
  echo "$row"
  stop_pid "$P_PID" 10
  last=$name
done
for proto in h1 h2; do
  echo
  echo "Where $last's instructions go ($proto; self cost by crate, per request):"
  split_by_crate "$WORK/$last.$proto.callgrind"
done
