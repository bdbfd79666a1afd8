#!/usr/bin/env python3
"""Writes an MLP as ONNX: x [batch, DIM] float32 -> logits [batch, CLASSES] float32.

Weights come from a fixed seed, so the same arguments always give the same model. Options make
the variants tests need (another dtype, a flat input, a model that rejects some rows).
"""
import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2, help="hidden layers")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--input-name", default="x")
    p.add_argument("--output-name", default="logits")
    p.add_argument("--dtype", choices=["float16", "float32", "float64"], default="float32")
    p.add_argument("--flat-input", action="store_true", help="x is [batch] (one value per row), not [batch, DIM]")
    p.add_argument(
        "--reject-above",
        type=float,
        default=None,
        help="make the model fail on rows whose first feature exceeds this value "
        "(a Gather with an out-of-range index), to test poison rows",
    )
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    np_t = {"float16": np.float16, "float32": np.float32, "float64": np.float64}[a.dtype]
    onnx_t = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}[a.dtype]
    nodes, inits = [], []
    prev, width = a.input_name, a.dim
    if a.flat_input:
        inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"))
        nodes.append(helper.make_node("Unsqueeze", [a.input_name, "axis1"], ["x2d"]))
        prev, width = "x2d", 1
    for i in range(a.layers + 1):
        out_w = a.classes if i == a.layers else a.hidden
        w = (rng.standard_normal((width, out_w)) * np.sqrt(2.0 / width)).astype(np_t)
        b = (rng.standard_normal(out_w) * 0.01).astype(np_t)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"]))
        last = i == a.layers
        add_out = "pre_out" if last else f"add{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [add_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [add_out], [f"relu{i}"]))
            prev = f"relu{i}"
        width = out_w
    if a.reject_above is None:
        nodes.append(helper.make_node("Identity", ["pre_out"], [a.output_name]))
    else:
        # index = (x[:, 0] > T) * 1_000_000: Gather on a 1-row table fails for those rows.
        inits += [
            numpy_helper.from_array(np.array([0], dtype=np.int64), "col0"),
            numpy_helper.from_array(np.array(a.reject_above, dtype=np_t), "thresh"),
            numpy_helper.from_array(np.array(1_000_000, dtype=np.int64), "big"),
            numpy_helper.from_array(np.zeros((1, a.classes), dtype=np_t), "table"),
        ]
        nodes += [
            helper.make_node("Gather", [a.input_name, "col0"], ["first"], axis=1),
            helper.make_node("Greater", ["first", "thresh"], ["over"]),
            helper.make_node("Cast", ["over"], ["over_i"], to=TensorProto.INT64),
            helper.make_node("Mul", ["over_i", "big"], ["idx2"]),
            helper.make_node("Squeeze", ["idx2", "col0"], ["idx"]),
            helper.make_node("Gather", ["table", "idx"], ["zeros"], axis=0),
            helper.make_node("Add", ["pre_out", "zeros"], [a.output_name]),
        ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info(a.input_name, onnx_t, ["batch"] if a.flat_input else ["batch", a.dim])],
        [helper.make_tensor_value_info(a.output_name, onnx_t, ["batch", a.classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # ONNX Runtime 1.31 rejects the IR version the onnx package writes by default.
    model.ir_version = 8
    onnx.checker.check_model(model)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    onnx.save(model, a.out)


if __name__ == "__main__":
    main()
