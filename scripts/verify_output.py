#!/usr/bin/env python3
"""Checks a committed nightshift output against its input, independently of nightshift.

Reads `_manifest.json` and only the files it lists (pyarrow), the input (pyarrow), and runs the
model on input rows one at a time (ONNX Runtime's Python API, batch 1). Prints one JSON line:
rows in and out, missing and duplicated ids, passthrough mismatches, the largest difference
between an output prediction and the model run on that row alone, error rows, and output files
the manifest does not list.
"""
import argparse
import glob
import json
import os
import random

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def filesystem(uri):
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
        scheme = "http" if endpoint.startswith("http://") else "https"
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint.split("://", 1)[-1] or None,
            scheme=scheme,
            region=os.environ.get("AWS_REGION", "us-east-1"),
            access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        )
        return fs, uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri).rstrip("/")


def read_files(fs, paths, columns=None, features=None):
    tables = []
    for p in paths:
        t = pq.read_table(p, filesystem=fs, columns=columns)
        if features is not None:
            # Files written by different tools hold the features as List, LargeList or
            # FixedSizeList, and strings as dictionaries or not: make them one type.
            cols = []
            for name in t.column_names:
                c = t[name]
                if name == features:
                    c = c.cast(pa.list_(pa.float64()))
                elif pa.types.is_dictionary(c.type):
                    c = c.cast(c.type.value_type)
                cols.append(c)
            t = pa.table(cols, names=t.column_names)
        tables.append(t)
    return pa.concat_tables(tables) if tables else None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--output", required=True)
    p.add_argument("--input", required=True, help="glob, directory or file")
    p.add_argument("--model", required=True)
    p.add_argument("--sample", type=int, default=0, help="rows to run through the model (0: all)")
    p.add_argument("--passthrough", default="id")
    p.add_argument("--features", default="features")
    p.add_argument("--prediction", default="logits")
    p.add_argument("--onnx-input", default="x")
    p.add_argument("--onnx-output", default="logits")
    a = p.parse_args()

    fs, out = filesystem(a.output)
    with fs.open_input_stream(f"{out}/_manifest.json") as f:
        manifest = json.loads(f.read())
    listed = {f["path"] for f in manifest["files"]} | {f["path"] for f in manifest.get("error_files", [])}
    present = []
    for info in fs.get_file_info(pafs.FileSelector(out, recursive=False)):
        name = info.path[len(out) + 1:]
        if info.type == pafs.FileType.File and not name.startswith("_") and not name.startswith("."):
            present.append(name)
    unlisted = sorted(n for n in present if n not in listed)

    output = read_files(fs, [f"{out}/{f['path']}" for f in manifest["files"]])
    errors = read_files(fs, [f"{out}/{f['path']}" for f in manifest.get("error_files", [])])

    ifs, inp = filesystem(a.input)
    if a.input.startswith("s3://"):
        sel = pafs.FileSelector(inp.rsplit("/", 1)[0] if "*" in inp else inp, recursive=True)
        paths = sorted(i.path for i in ifs.get_file_info(sel) if i.path.endswith(".parquet"))
    elif os.path.isdir(inp):
        paths = sorted(glob.glob(os.path.join(inp, "**", "*.parquet"), recursive=True))
    else:
        paths = sorted(glob.glob(inp))
    pass_cols = [c for c in a.passthrough.split(",") if c]
    wanted = sorted(set(["id", a.features] + pass_cols))
    inputs = read_files(ifs, paths, columns=wanted, features=a.features)

    in_ids = inputs["id"].to_pylist()
    out_ids = output["id"].to_pylist() if output is not None else []
    counts = {}
    for i in out_ids:
        counts[i] = counts.get(i, 0) + 1
    missing = sorted(set(in_ids) - set(counts))
    duplicated = sorted(i for i, c in counts.items() if c > 1)

    by_id = {v: k for k, v in enumerate(in_ids)}
    mismatches = 0
    for col in pass_cols:
        if col == "id" or output is None:
            continue
        want = inputs[col].to_pylist()
        got = output[col].to_pylist()
        for k, i in enumerate(out_ids):
            if want[by_id[i]] != got[k]:
                mismatches += 1

    session = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"])
    elem = session.get_inputs()[0].type
    dtype = np.float64 if "double" in elem else np.float16 if "float16" in elem else np.float32
    rows = list(range(len(out_ids)))
    if a.sample and a.sample < len(rows):
        rows = random.Random(5).sample(rows, a.sample)
    feats = inputs[a.features]
    preds = output[a.prediction] if output is not None else None
    max_diff = 0.0
    for k in rows:
        i = out_ids[k]
        x = np.asarray(feats[by_id[i]].as_py(), dtype=dtype).reshape(1, -1)
        ref = session.run([a.onnx_output], {a.onnx_input: x})[0].reshape(-1)
        got = np.asarray(preds[k].as_py(), dtype=np.float64).reshape(-1)
        max_diff = max(max_diff, float(np.max(np.abs(got - ref))))

    error_ids = errors["id"].to_pylist() if errors is not None else []
    print(json.dumps({
        "input_rows": len(in_ids),
        "output_rows": len(out_ids),
        "distinct_ids": len(counts),
        "missing": missing[:1000],
        "duplicated": duplicated[:1000],
        "passthrough_mismatches": mismatches,
        "max_abs_diff": max_diff,
        "rows_checked_against_model": len(rows),
        "error_rows": len(error_ids),
        "error_ids": sorted(error_ids),
        "manifest_total_rows": manifest["total_rows"],
        "unlisted_files": unlisted,
    }))


if __name__ == "__main__":
    main()
