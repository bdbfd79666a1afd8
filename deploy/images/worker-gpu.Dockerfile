# syntax=docker/dockerfile:1
# The GPU worker image: `nightshift worker` with ONNX Runtime's CUDA build.
#
#   docker build -f deploy/images/worker-gpu.Dockerfile -t nightshift-worker-gpu .
#
# The runtime is NVIDIA's CUDA 13 image with cuDNN 9: it carries cuBLAS, cuFFT, cuRAND, NVRTC,
# the CUDA runtime and cuDNN, which onnxruntime-gpu's CUDA provider loads; the driver
# (libcuda, NVML) comes from the host through the NVIDIA container toolkit. ONNX Runtime itself
# is the onnxruntime-gpu wheel from PyPI in /opt/venv; nightshift loads its libonnxruntime.so
# (ORT_DYLIB_PATH below, and --ort-lib in deploy/k8s/worker/worker.yaml).

ARG RUST_VERSION=1.95
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

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

FROM ${CUDA_IMAGE}
ARG ONNXRUNTIME_GPU_VERSION=1.31.1
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
      "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
 && groupadd --system --gid 10001 nightshift \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin nightshift \
 && install -d -o 10001 -g 10001 /var/cache/nightshift
# Ubuntu 24.04's python3 is 3.12; the path names the wheel's version (keep the two in step).
ENV ORT_DYLIB_PATH=/opt/venv/lib/python3.12/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1
COPY --from=build /usr/local/bin/nightshift /usr/local/bin/nightshift
# Fails the build if the binary cannot start here, or the library is not where ORT_DYLIB_PATH says.
RUN nightshift --version && test -f "$ORT_DYLIB_PATH"
USER 10001:10001
ENTRYPOINT ["nightshift"]
CMD ["worker"]
