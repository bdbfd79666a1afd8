# syntax=docker/dockerfile:1
# The coordinator image: `nightshift coordinator` (the API on :7070 over PostgreSQL).
#
#   docker build -f deploy/images/coordinator.Dockerfile -t nightshift-coordinator .
#
# Built from the repository root; coordinator.Dockerfile.dockerignore keeps target/ and .venv/
# out of the context. The builder is Debian bookworm so that the binary's glibc needs are met
# by both runtime images (this one and the worker's Ubuntu 24.04).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nightshift \
 && install -m 0755 target/release/nightshift /usr/local/bin/nightshift

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 nightshift \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin nightshift
COPY --from=build /usr/local/bin/nightshift /usr/local/bin/nightshift
# Fails the build if the binary cannot start here (a missing shared library, a newer glibc).
RUN nightshift --version
USER 10001:10001
EXPOSE 7070
ENTRYPOINT ["nightshift"]
CMD ["coordinator"]
