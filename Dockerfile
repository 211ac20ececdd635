# Ebb's images, FROM scratch: nothing in them but what runs. `scripts/images.sh` builds the static
# binaries and the init image's root filesystem into target/image/, then this file with docker or
# podman, there or in any CI (no base image is pulled):
#   scripts/images.sh                         # podman if present, else docker
#   docker build --target proxy -t ebb:proxy target/image -f Dockerfile
#
# proxy: the static `ebb`, run as UID 1337 (the UID sidecar-init exempts from capture, so the proxy's
# own upstream connections do not loop back).
FROM scratch AS proxy
COPY proxy/ /
USER 1337:1337
EXPOSE 15001 15006 15020 15021
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/ebb"]
CMD ["run"]

# init: sidecar-init with iptables (legacy and nft back-ends, nft by default as in Debian) and the
# libraries they load, plus the static `ebb` it copies for the app's preStop (EBB_INIT_INSTALL_EBB).
FROM scratch AS init
COPY init/ /
ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ENTRYPOINT ["/usr/local/bin/sidecar-init"]

# app: the demo's app (HTTP/1.1, HTTP/2, gRPC), a root filesystem with no libc at all: what the
# container tests run `ebb drain` from, as a distroless or scratch app image would.
FROM scratch AS app
COPY app/ /
USER 1000:1000
EXPOSE 8080 8081
ENTRYPOINT ["/demo/ebb", "demo-app"]
