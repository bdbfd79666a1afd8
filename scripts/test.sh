#!/usr/bin/env bash
# The same checks locally and in CI: format, clippy with -D warnings, and every test (unit,
# metastore contract on SQLite and PostgreSQL, end to end with real processes, the local S3 server
# and ONNX Runtime). Tests start and stop their own servers; PostgreSQL's server binaries must
# be installed (.ci/run installs them when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --quiet "$@"
