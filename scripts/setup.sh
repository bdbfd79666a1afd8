#!/usr/bin/env bash
# Creates .venv with ONNX Runtime, the generators' libraries, the output readers and the local
# S3 server (moto), all from PyPI. Idempotent: does nothing when requirements.txt is unchanged.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${NIGHTSHIFT_VENV:-$root/.venv}"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$root/scripts/requirements.txt" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/scripts/requirements.txt"
echo "$want" > "$stamp"
lib="$(ls "$venv"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* | head -n 1)"
echo "nightshift: ONNX Runtime at $lib" >&2
