#!/usr/bin/env python3
"""Checks a committed nightshift text-embedding output against an independent reference.

Each input row (files sorted by name, rows in order) is tokenized alone with the `tokenizers`
package (truncated to --max-length, no padding), run through the model with ONNX Runtime (CPU,
batch 1), pooled over its real tokens (mean, cls, max, or none: every token) and L2-normalised
with --normalize. The output is read through `_manifest.json` (only the files it lists, as
verify_output.py does) and compared by id: every non-null input row exactly once, null rows
only in `_errors/`, and embeddings within --atol. Prints one JSON line and exits 1 when not ok.
--pad-report instead prints tokens per row (untruncated, with [CLS] and [SEP]) for the input.
"""
import argparse
import glob
import json
import os
import random
import sys

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from verify_output import filesystem  # the same local / S3 filesystems as the numeric verifier


def input_paths(fs, uri, path):
    if uri.startswith("s3://"):
        sel = pafs.FileSelector(path.rsplit("/", 1)[0] if "*" in path else path, recursive=True)
        return sorted(i.path for i in fs.get_file_info(sel) if i.path.endswith(".parquet"))
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    return sorted(glob.glob(path))


def read_inputs(uri, id_col, text_col):
    fs, path = filesystem(uri)
    ids, texts = [], []
    for p in input_paths(fs, uri, path):
        t = pq.read_table(p, filesystem=fs, columns=[id_col, text_col])
        ids += t[id_col].to_pylist()
        texts += t[text_col].to_pylist()
    return ids, texts


def read_output(uri):
    fs, out = filesystem(uri)
    with fs.open_input_stream(f"{out}/_manifest.json") as f:
        manifest = json.loads(f.read())
    read = lambda files: [pq.read_table(f"{out}/{f['path']}", filesystem=fs) for f in files]
    output, errors = read(manifest["files"]), read(manifest.get("error_files", []))
    return manifest, (pa.concat_tables(output) if output else None), (pa.concat_tables(errors) if errors else None)


def pad_report(tok, texts, max_length, batch):
    lens = np.array([len(e.ids) for e in tok.encode_batch([t for t in texts if t is not None])])
    if not len(lens):
        return {"rows": 0}
    cut = np.minimum(lens, max_length)
    groups = [cut[k:k + batch] for k in range(0, len(cut), batch)]
    padded = sum(len(g) * int(g.max()) for g in groups)
    return {
        "rows": int(len(lens)),
        "null_rows": sum(t is None for t in texts),
        "tokens_median": float(np.median(lens)),
        "tokens_p99": float(np.percentile(lens, 99)),
        "tokens_max": int(lens.max()),
        "tokens_mean": round(float(lens.mean()), 2),
        "rows_over_max_length": int((lens > max_length).sum()),
        f"pad_fraction_batch{batch}_in_order": round(1 - float(cut.sum()) / padded, 4),
    }


class Reference:
    """The model run on one text alone, pooled."""

    def __init__(self, a):
        self.tok = Tokenizer.from_file(a.tokenizer)
        self.tok.no_padding()
        self.tok.enable_truncation(a.max_length)
        self.session = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.a = a

    def embed(self, text):
        e = self.tok.encode(text)
        feed = {
            "input_ids": np.array([e.ids], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask], dtype=np.int64),
        }
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.array([e.type_ids], dtype=np.int64)
        h = self.session.run([self.a.output_name], feed)[0][0].astype(np.float32)
        return pool(h, np.array(e.attention_mask, dtype=bool), self.a.pool, self.a.normalize)


def pool(h, mask, how, normalize):
    """h [seq, hidden] -> [hidden] (or [seq, hidden] for `none`), over the real tokens."""
    if how == "mean":
        v = h[mask].sum(axis=0) / max(int(mask.sum()), 1)
    elif how == "cls":
        v = h[0]
    elif how == "max":
        v = h[mask].max(axis=0)
    else:
        v = h
    if normalize:
        v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    return v.astype(np.float64)


def flat(value):
    """An output cell (a list, or a list of lists for `none`) as a flat float64 array."""
    v = value.values
    while pa.types.is_list(v.type) or pa.types.is_large_list(v.type) or pa.types.is_fixed_size_list(v.type):
        v = v.flatten()
    return v.to_numpy(zero_copy_only=False).astype(np.float64)


def compare(ref, texts, by_id, out_ids, emb, rows):
    """Largest |difference| over `rows` (indices into the output), and the rows that differ in
    shape or hold a null embedding."""
    worst, worst_id, bad = 0.0, None, []
    for k in rows:
        cell = emb[k]
        if not cell.is_valid:
            bad.append(out_ids[k])
            continue
        want = ref.embed(texts[by_id[out_ids[k]]]).reshape(-1)
        got = flat(cell)
        if got.shape != want.shape:
            bad.append(out_ids[k])
            continue
        d = float(np.max(np.abs(got - want))) if len(want) else 0.0
        if not d <= worst:  # also catches NaN
            worst, worst_id = (d if d == d else float("inf")), out_ids[k]
    return worst, worst_id, bad


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--model")
    p.add_argument("--input", required=True, help="glob, directory or file")
    p.add_argument("--output", help="the committed output directory")
    p.add_argument("--column", default="body")
    p.add_argument("--id-column", default="id")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--pool", choices=["mean", "cls", "max", "none"], default="mean")
    p.add_argument("--normalize", action="store_true")
    p.add_argument("--output-name", default="last_hidden_state", help="the model's output")
    p.add_argument("--embedding-column", default="embedding")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--sample", type=int, default=0, help="rows to run through the model (0: all)")
    p.add_argument("--seed", type=int, default=5, help="for --sample")
    p.add_argument("--pad-report", action="store_true", help="only print tokens per input row")
    p.add_argument("--pad-batch", type=int, default=32, help="batch size for --pad-report's padding fraction")
    a = p.parse_args()

    ids, texts = read_inputs(a.input, a.id_column, a.column)
    if a.pad_report:
        tok = Tokenizer.from_file(a.tokenizer)
        tok.no_truncation()
        tok.no_padding()
        print(json.dumps(pad_report(tok, texts, a.max_length, a.pad_batch)))
        return
    if not a.model or not a.output:
        p.error("--model and --output are required (unless --pad-report)")

    manifest, output, errors = read_output(a.output)
    by_id = {i: k for k, i in enumerate(ids)}
    nulls = {i for i, t in zip(ids, texts) if t is None}
    want = set(ids) - nulls
    out_ids = output[a.id_column].to_pylist() if output is not None else []
    counts = {}
    for i in out_ids:
        counts[i] = counts.get(i, 0) + 1
    missing = sorted(want - set(counts))
    duplicated = sorted(i for i, c in counts.items() if c > 1)
    unexpected = sorted(set(counts) - want)  # null rows, or ids not in the input
    error_ids = errors[a.id_column].to_pylist() if errors is not None and a.id_column in errors.column_names else []
    nulls_not_in_errors = sorted(nulls - set(error_ids))

    first = {}
    for k, i in enumerate(out_ids):
        if i in want:
            first.setdefault(i, k)
    rows = sorted(first.values())
    if a.sample and a.sample < len(rows):
        rows = sorted(random.Random(a.seed).sample(rows, a.sample))
    emb = output[a.embedding_column].combine_chunks() if output is not None else None
    max_diff, worst_id, bad = compare(Reference(a), texts, by_id, out_ids, emb, rows)

    ok = (
        not missing
        and not duplicated
        and not unexpected
        and not nulls_not_in_errors
        and not bad
        and max_diff <= a.atol
        and manifest.get("total_rows", len(out_ids)) == len(out_ids)
        and manifest.get("input_rows", len(ids)) == len(ids)
    )
    print(json.dumps({
        "rows_in": len(ids),
        "rows_out": len(out_ids),
        "manifest_total_rows": manifest.get("total_rows"),
        "manifest_input_rows": manifest.get("input_rows"),
        "missing": len(missing),
        "duplicated": len(duplicated),
        "unexpected": len(unexpected),
        "null_rows": len(nulls),
        "nulls_not_in_errors": len(nulls_not_in_errors),
        "error_rows": len(error_ids),
        "bad_shape_or_null": len(bad),
        "rows_compared": len(rows),
        "max_abs_diff": max_diff,
        "worst_id": worst_id,
        "atol": a.atol,
        "examples": {
            "missing": missing[:10],
            "duplicated": duplicated[:10],
            "unexpected": unexpected[:10],
            "nulls_not_in_errors": nulls_not_in_errors[:10],
            "bad_shape_or_null": bad[:10],
        },
        "ok": ok,
    }))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
