# The mesh-node image. Builds with Debian's toolchain for the eBPF part, as the repository's
# scripts do (docs/toolchain.md), then ships the binaries with the tools mesh-node runs (ip,
# iptables, nft) on a slim base.
FROM debian:bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends \
      ca-certificates curl git build-essential \
    && rm -rf /var/lib/apt/lists/*
# rustup's toolchain for user space (scripts/setup installs Debian's rustc-web for bpfel).
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY . .
RUN scripts/setup && cargo build --release --locked -p mesh-node -p mesh-cni

FROM debian:bookworm-slim
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends \
      iproute2 iptables nftables ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/mesh-node /usr/local/bin/mesh-node
# The CNI plugin mesh-node installs into the node's CNI binary directory (docs/cni.md).
COPY --from=build /src/target/release/mesh-cni /usr/local/bin/mesh-cni
USER 0
ENTRYPOINT ["/usr/local/bin/mesh-node"]
