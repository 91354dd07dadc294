# syntax=docker/dockerfile:1
# One image for every deepnode binary: deepnode-scheduler, deepnode-reputation, deepnode-rotation and
# the `deepnode` CLI. docker-compose.yml picks the binary per service with `command:`.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target dir between builds; the binaries are copied out of
# the (unpersisted) target dir in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        --bin deepnode-scheduler --bin deepnode-reputation --bin deepnode-rotation --bin deepnode \
    && mkdir -p /out \
    && cp target/release/deepnode-scheduler target/release/deepnode-reputation \
          target/release/deepnode-rotation target/release/deepnode /out/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home --shell /usr/sbin/nologin deepnode
COPY --from=builder /out/ /usr/local/bin/
USER deepnode
CMD ["deepnode", "--help"]
