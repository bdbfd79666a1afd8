#!/usr/bin/env python3
"""The usual Python way to embed a table of texts, as a baseline for `nightshift-bench text`:
read the texts with pyarrow, tokenize them all with Hugging Face `tokenizers` (truncated to
--max-length), sort by length, run ONNX Runtime (CUDA when --device cuda) on batches of --batch
rows padded to each batch's longest, mean-pool over the attention mask, L2-normalise, put the rows
back in order and write Parquet. Prints one JSON line: rows, seconds, rows_per_s.
"""
import argparse
import glob
import json
import os
import time

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help="glob of Parquet files with `id` and `body`")
    p.add_argument("--output", required=True, help="Parquet file to write")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    a = p.parse_args()
    started = time.perf_counter()
    table = pa.concat_tables([pq.read_table(f, columns=["id", "body"]) for f in sorted(glob.glob(a.input))])
    table = table.filter(table["body"].is_valid())
    texts = table["body"].to_pylist()
    tok = Tokenizer.from_file(a.tokenizer)
    tok.enable_truncation(a.max_length)
    encodings = tok.encode_batch(texts)
    order = np.argsort([len(e.ids) for e in encodings], kind="stable")
    providers = ["CUDAExecutionProvider"] if a.device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(a.model, providers=providers)
    if a.device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise SystemExit("onnxruntime has no CUDA execution provider here (PYTHONPATH?)")
    out = [None] * len(texts)
    for start in range(0, len(order), a.batch):
        rows = order[start:start + a.batch]
        width = max(len(encodings[r].ids) for r in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            e = encodings[r]
            ids[i, :len(e.ids)] = e.ids
            mask[i, :len(e.ids)] = 1
        h = session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
        m = mask[:, :, None].astype(np.float32)
        v = (h.astype(np.float32) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        for i, r in enumerate(rows):
            out[r] = v[i]
    embeddings = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(out).astype(np.float32)), len(out[0]))
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    pq.write_table(pa.table({"id": table["id"], "embedding": embeddings}), a.output)
    seconds = time.perf_counter() - started
    print(json.dumps({"rows": len(texts), "seconds": seconds, "rows_per_s": len(texts) / seconds}))


if __name__ == "__main__":
    main()
