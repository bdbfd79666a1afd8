#!/usr/bin/env python3
"""Writes a small BERT-style text encoder as ONNX, with random weights from a fixed seed.

input_ids, attention_mask (and with --token-types token_type_ids), all int64 [batch, seq] ->
last_hidden_state [batch, seq, HIDDEN] (float32, or float16 with --dtype float16: then every
weight and activation is float16), or with --cls-output cls_embedding [batch, HIDDEN] instead: the
first token's last hidden state, one vector per row for jobs over token-id columns (without a
[text] table a job cannot pool). The vocabulary size is read from the tokenizer, or given with
--vocab-size. Embeddings
(word + position, positions 0..seq-1 computed in the graph, + token type) and a LayerNorm, then
per layer multi-head self-attention with the additive mask (1 - attention_mask) * -10000, a
residual and LayerNorm, a GELU (erf) feed-forward, a residual and LayerNorm. The mask makes the
outputs at real positions independent of padding; --check verifies that with ONNX Runtime.
"""
import argparse
import os
from types import SimpleNamespace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer

ONNX_T = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


class Graph:
    """Nodes and initializers of one graph, in a single dtype."""

    def __init__(self, rng, dtype):
        self.rng, self.dtype, self.nodes, self.inits = rng, np.dtype(dtype), [], []

    def const(self, name, value, dtype=None):
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype or self.dtype), name))
        return name

    def weight(self, name, shape, std):
        return self.const(name, self.rng.standard_normal(shape) * std)

    def op(self, op_type, inputs, name, **attrs):
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def linear(self, x, prefix, n_in, n_out):
        # Weights ~ N(0, 1/n_in): activations keep their scale, so attention is not uniform and
        # every sublayer contributes (a padding bug would show).
        w = self.weight(f"{prefix}.weight", (n_in, n_out), n_in ** -0.5)
        b = self.weight(f"{prefix}.bias", (n_out,), 0.02)
        return self.op("Add", [self.op("MatMul", [x, w], f"{prefix}.matmul"), b], f"{prefix}.out")

    def layer_norm(self, x, prefix, hidden):
        g = self.const(f"{prefix}.gamma", 1 + self.rng.standard_normal(hidden) * 0.02)
        b = self.weight(f"{prefix}.beta", (hidden,), 0.02)
        return self.op("LayerNormalization", [x, g, b], f"{prefix}.out", axis=-1, epsilon=1e-12)


def embeddings(g, a, vocab):
    word = g.op("Gather", [g.weight("emb.word", (vocab, a.hidden), 0.02), "input_ids"], "emb.word_out")
    seq = g.op("Shape", ["input_ids"], "emb.seq_1d", start=1, end=2)
    seq = g.op("Squeeze", [seq, g.const("axes0", [0], np.int64)], "emb.seq")
    pos_ids = g.op("Range", [g.const("zero_i", 0, np.int64), seq, g.const("one_i", 1, np.int64)], "emb.pos_ids")
    pos = g.op("Gather", [g.weight("emb.position", (a.max_position, a.hidden), 0.02), pos_ids], "emb.pos_out")
    x = g.op("Add", [word, pos], "emb.sum")
    if a.token_types:
        types = g.op("Gather", [g.weight("emb.token_type", (2, a.hidden), 0.02), "token_type_ids"], "emb.type_out")
        x = g.op("Add", [x, types], "emb.sum_types")
    return g.layer_norm(x, "emb.ln", a.hidden)


def additive_mask(g):
    """(1 - attention_mask) * -10000 as [batch, 1, 1, seq]."""
    m = g.op("Cast", ["attention_mask"], "mask.float", to=ONNX_T[g.dtype.name])
    m = g.op("Unsqueeze", [m, g.const("axes12", [1, 2], np.int64)], "mask.4d")
    m = g.op("Sub", [g.const("one", 1.0), m], "mask.inverted")
    return g.op("Mul", [m, g.const("mask_value", -10000.0)], "mask.additive")


def attention(g, x, mask, prefix, a):
    d = a.hidden // a.heads
    split = g.const(f"{prefix}.split_shape", [0, 0, a.heads, d], np.int64)
    heads = {}
    for n, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        h = g.op("Reshape", [g.linear(x, f"{prefix}.{n}", a.hidden, a.hidden), split], f"{prefix}.{n}_split")
        heads[n] = g.op("Transpose", [h], f"{prefix}.{n}_heads", perm=perm)
    scores = g.op("MatMul", [heads["q"], heads["k"]], f"{prefix}.scores")
    scores = g.op("Mul", [scores, g.const(f"{prefix}.scale", d ** -0.5)], f"{prefix}.scaled")
    scores = g.op("Add", [scores, mask], f"{prefix}.masked")
    probs = g.op("Softmax", [scores], f"{prefix}.probs", axis=-1)
    ctx = g.op("MatMul", [probs, heads["v"]], f"{prefix}.context")
    ctx = g.op("Transpose", [ctx], f"{prefix}.context_t", perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", [ctx, g.const(f"{prefix}.merge_shape", [0, 0, a.hidden], np.int64)], f"{prefix}.merged")
    out = g.linear(ctx, f"{prefix}.o", a.hidden, a.hidden)
    return g.layer_norm(g.op("Add", [x, out], f"{prefix}.residual"), f"{prefix}.ln", a.hidden)


def feed_forward(g, x, prefix, a):
    h = g.linear(x, f"{prefix}.in", a.hidden, a.intermediate)
    # GELU: 0.5 * h * (1 + erf(h / sqrt(2)))
    e = g.op("Erf", [g.op("Mul", [h, g.const(f"{prefix}.inv_sqrt2", 0.5 ** 0.5)], f"{prefix}.h_scaled")], f"{prefix}.erf")
    e = g.op("Add", [e, g.const(f"{prefix}.one", 1.0)], f"{prefix}.erf1")
    h = g.op("Mul", [g.op("Mul", [h, e], f"{prefix}.h_erf"), g.const(f"{prefix}.half", 0.5)], f"{prefix}.gelu")
    out = g.linear(h, f"{prefix}.out", a.intermediate, a.hidden)
    return g.layer_norm(g.op("Add", [x, out], f"{prefix}.residual"), f"{prefix}.ln", a.hidden)


def build(a, vocab):
    g = Graph(np.random.default_rng(a.seed), a.dtype)
    x = embeddings(g, a, vocab)
    mask = additive_mask(g)
    for i in range(a.layers):
        x = attention(g, x, mask, f"layer{i}.attention", a)
        x = feed_forward(g, x, f"layer{i}.ffn", a)
    if a.cls_output:
        # A scalar index drops the seq axis: [batch, hidden].
        x = g.op("Gather", [x, g.const("cls_index", 0, np.int64)], "cls", axis=1)
        output = helper.make_tensor_value_info("cls_embedding", ONNX_T[a.dtype], ["batch", a.hidden])
    else:
        output = helper.make_tensor_value_info("last_hidden_state", ONNX_T[a.dtype], ["batch", "seq", a.hidden])
    g.nodes.append(helper.make_node("Identity", [x], [output.name], name="output"))
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if a.token_types else [])
    graph = helper.make_graph(
        g.nodes,
        "bert_encoder",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in names],
        [output],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="nightshift")
    # ONNX Runtime 1.31 rejects the IR version the onnx package writes by default.
    model.ir_version = 8
    return model


def check_encodings(tok_path, vocab):
    """A short and a long encoding: of two texts by the tokenizer, or of made-up ids below vocab."""
    if tok_path:
        tok = Tokenizer.from_file(tok_path)
        return tok.encode("Café naïve, a short text."), tok.encode("a much longer text " * 20, "and a pair")

    def made_up(n):
        return SimpleNamespace(ids=[(7 * i + 1) % vocab for i in range(n)], attention_mask=[1] * n, type_ids=[0] * n)

    return made_up(9), made_up(80)


def check(path, tok_path, vocab, token_types):
    """Runs one text alone and padded inside a batch with a longer one: real positions agree."""
    import onnxruntime as ort

    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    short, long = check_encodings(tok_path, vocab)

    def feed(encs):
        n = max(len(e.ids) for e in encs)
        pad = lambda v: [list(x) + [0] * (n - len(x)) for x in v]
        f = {
            "input_ids": np.array(pad([e.ids for e in encs]), np.int64),
            "attention_mask": np.array(pad([e.attention_mask for e in encs]), np.int64),
        }
        if token_types:
            f["token_type_ids"] = np.array(pad([e.type_ids for e in encs]), np.int64)
        return f

    alone = s.run(None, feed([short]))[0][0].astype(np.float32)
    batch = s.run(None, feed([long, short]))[0]
    # A [batch, hidden] output holds the first position only.
    padded = (batch[1, : len(short.ids)] if batch.ndim == 3 else batch[1]).astype(np.float32)
    diff = float(np.max(np.abs(alone - padded)))
    assert np.all(np.isfinite(batch)), "non-finite output"
    print(f"check: output {batch.dtype} {batch.shape}, std {float(batch.astype(np.float32).std()):.3f}, "
          f"padding changes real positions by {diff:.2e}")
    assert diff <= (1e-5 if batch.dtype == np.float32 else 1e-2), diff


def main() -> None:
    p = argparse.ArgumentParser()
    vocab = p.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--tokenizer", help="tokenizer.json (for the vocabulary size)")
    vocab.add_argument("--vocab-size", type=int, help="the vocabulary size, without a tokenizer")
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=64)
    p.add_argument("--max-position", type=int, default=512)
    p.add_argument("--token-types", action="store_true", help="add the token_type_ids input")
    p.add_argument("--cls-output", action="store_true", help="output cls_embedding [batch, hidden] instead")
    p.add_argument("--dtype", choices=sorted(ONNX_T), default="float32")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--check", action="store_true", help="check the model and run it with ONNX Runtime")
    a = p.parse_args()
    if a.hidden % a.heads:
        p.error("--hidden must be a multiple of --heads")
    if a.vocab_size is not None and a.vocab_size < 1:
        p.error("--vocab-size must be positive")
    vocab = a.vocab_size or Tokenizer.from_file(a.tokenizer).get_vocab_size(with_added_tokens=True)
    model = build(a, vocab)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    onnx.save(model, a.out)
    if a.check:
        onnx.checker.check_model(a.out, full_check=True)
        check(a.out, a.tokenizer, vocab, a.token_types)


if __name__ == "__main__":
    main()
