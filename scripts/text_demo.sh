#!/usr/bin/env bash
# The text-embedding example: generates a WordPiece tokenizer, a small BERT-style encoder and
# 50,000 texts (log-normal lengths, some null) once, builds nightshift and runs
# `nightshift run jobs/embed.toml`. Extra arguments go to `nightshift run`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
py=.venv/bin/python
[ -f models/text/tokenizer.json ] || "$py" scripts/gen_tokenizer.py --out models/text/tokenizer.json
[ -f models/text/encoder.onnx ] || "$py" scripts/gen_text_model.py --tokenizer models/text/tokenizer.json \
  --out models/text/encoder.onnx --hidden 384 --layers 6 --heads 6 --intermediate 1536
[ -d data/texts ] || "$py" scripts/gen_text_data.py --out data/texts --rows 50000 --files 2 \
  --median-words 17 --null-every 1000
cargo build --release --quiet -p nightshift
exec target/release/nightshift run jobs/embed.toml "$@"
