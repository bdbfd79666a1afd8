#!/usr/bin/env bash
# The demo on a fresh machine with Rust and Python 3: installs ONNX Runtime and the generators
# into .venv, generates the demo data (300,000 rows) and model once, builds nightshift, and runs
# `nightshift run jobs/demo.toml` (embedded defaults: SQLite in .nightshift/, local files).
# Extra arguments go to `nightshift run` (e.g. --workers 2, --json).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
py=.venv/bin/python
[ -f models/mlp.onnx ] || "$py" scripts/gen_model.py --out models/mlp.onnx
[ -d data/demo ] || "$py" scripts/gen_data.py --out data/demo --rows 300000 --files 3 --codecs snappy,zstd,gzip
cargo build --release --quiet -p nightshift
exec target/release/nightshift run jobs/demo.toml "$@"
