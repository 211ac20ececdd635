#!/usr/bin/env bash
# Builds Ebb's images (Dockerfile targets proxy, init, app) with podman, or docker when podman is not
# there: static binaries (glibc with crt-static: no libc needed at run time), the init image's root
# filesystem from this machine's Debian iptables (binaries, their libraries, xtables extensions), then
# `build --target` for each. Prints each image's size.
#
#   scripts/images.sh [TAG_PREFIX]      # default ebb → ebb:proxy, ebb:init, ebb:app
#   PROFILE=release (default) | dev
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${1:-ebb}
profile=${PROFILE:-release}
target=x86_64-unknown-linux-gnu
engine=${ENGINE:-$(command -v podman || command -v docker || true)}
[ -n "$engine" ] || { echo "scripts/images.sh: neither podman nor docker is installed" >&2; exit 1; }
case "$(basename "$engine")" in
  podman) build=("$engine" --storage-driver vfs --cgroup-manager cgroupfs build --runtime runc) ;;
  *) build=("$engine" build) ;;
esac

# Static: the proxy image has no libc, and the copy in the app's volume must run in any image.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked --profile "$profile" --target "$target" \
  -p ebb -p sidecar-init --bins
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
bin=target/$target/$dir
for b in ebb sidecar-init; do
  file "$bin/$b" 2>/dev/null | grep -q "static" || ldd "$bin/$b" 2>&1 | grep -q "not a dynamic" \
    || { echo "scripts/images.sh: $bin/$b is not static" >&2; exit 1; }
done

ctx=target/image
rm -rf "$ctx"
mkdir -p "$ctx/proxy/usr/local/bin" "$ctx/init/usr/local/bin" "$ctx/app/demo"
# Without debug info: the proxy image's size is the binary's.
strip_to() { objcopy --strip-debug "$1" "$2" 2>/dev/null || cp "$1" "$2"; }
strip_to "$bin/ebb" "$ctx/proxy/usr/local/bin/ebb"
cp "$ctx/proxy/usr/local/bin/ebb" "$ctx/init/usr/local/bin/ebb"
cp "$ctx/proxy/usr/local/bin/ebb" "$ctx/app/demo/ebb"
strip_to "$bin/sidecar-init" "$ctx/init/usr/local/bin/sidecar-init"
# /tmp for anything that wants it; the proxy runs with a read-only root in Kubernetes.
mkdir -p "$ctx/proxy/tmp" "$ctx/app/tmp"

# The init image's iptables, from the Debian packages installed here.
command -v xtables-nft-multi >/dev/null || { echo "scripts/images.sh: install iptables (apt-get install iptables)" >&2; exit 1; }
root=$ctx/init
mkdir -p "$root/usr/sbin" "$root/run" "$root/tmp" "$root/etc" "$root/var/lib"
for m in xtables-nft-multi xtables-legacy-multi; do cp "$(command -v $m)" "$root/usr/sbin/"; done
for b in iptables ip6tables; do
  for mode in nft legacy; do
    for op in "" -save -restore; do ln -sf "xtables-$mode-multi" "$root/usr/sbin/$b-$mode$op"; done
  done
  # Debian's default back-end: nft (sidecar-init's EBB_INIT_IPTABLES_RESTORE picks another).
  for op in "" -save -restore; do ln -sf "xtables-nft-multi" "$root/usr/sbin/$b$op"; done
done
# Debian's merged /usr: /lib and /lib64 are links into /usr, where everything is copied.
mkdir -p "$root/usr/lib" "$root/usr/lib64"
ln -sfn usr/lib "$root/lib"
ln -sfn usr/lib64 "$root/lib64"
usr() { case "$1" in /usr/*) echo "$1" ;; *) echo "/usr$1" ;; esac; }
xt=$(usr "$(dirname "$(ldd "$(command -v xtables-nft-multi)" | awk '/libxtables/ {print $3}')")")/xtables
[ -d "$xt" ] || { echo "scripts/images.sh: no xtables extensions in $xt" >&2; exit 1; }
mkdir -p "$root$xt"
cp "$xt"/*.so "$root$xt/"
# Every library the binaries and the extensions load, with the loader.
for f in "$root"/usr/sbin/xtables-*-multi "$root$xt"/*.so; do
  ldd "$f" 2>/dev/null | awk '/=>/ {print $3} /ld-linux/ {print $1}'
done | sort -u | while read -r lib; do
  [ -e "$lib" ] || continue
  dest=$root$(usr "$lib")
  mkdir -p "$(dirname "$dest")"
  cp -L "$lib" "$dest"
done
cp /etc/protocols /etc/ethertypes "$root/etc/" 2>/dev/null || true

for t in proxy init app; do
  "${build[@]}" --target "$t" -t "$prefix:$t" -f Dockerfile "$ctx" >/dev/null
  echo "$prefix:$t $(du -sb "$ctx/$t" | cut -f1) bytes"
done
