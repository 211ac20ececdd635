# Ebb images. Two targets, built from one build stage (the same `cargo build --release` the tests use):
#   docker build --target proxy -t ebb:proxy .   # the sidecar: runs as UID 1337
#   docker build --target init  -t ebb:init  .   # sidecar-init + iptables, and a copy of ebb for preStop
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins

FROM debian:bookworm-slim AS init
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/sidecar-init /usr/local/bin/sidecar-init
COPY --from=build /src/target/release/ebb /usr/local/bin/ebb
ENTRYPOINT ["/usr/local/bin/sidecar-init"]

FROM gcr.io/distroless/cc-debian12:nonroot AS proxy
COPY --from=build /src/target/release/ebb /usr/local/bin/ebb
# The UID sidecar-init exempts from capture: the proxy's own upstream connections must not loop back.
USER 1337:1337
EXPOSE 15001 15006 15020 15021
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/ebb"]
CMD ["run"]
