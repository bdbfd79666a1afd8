#!/usr/bin/env python3
"""Trains a BERT-style WordPiece tokenizer on a synthetic corpus and writes its tokenizer.json.

The corpus is text_corpus.py's pseudo-words (with accented Latin, Cyrillic, CJK and emoji). The
vocabulary is learnt here, as tokenizers' WordPieceTrainer does but with ties broken by text
(that trainer breaks them in hash order, which changes from run to run), so the same arguments
always give the same file. The rest is the `tokenizers` package's: a lowercasing BertNormalizer
(accents stripped, as in bert-base-uncased), BertPreTokenizer, WordPiece with [UNK], special
tokens [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, the post-processor `[CLS] $A [SEP]` (pairs:
`[CLS] $A [SEP] $B:1 [SEP]:1`) and a WordPiece decoder. No truncation or padding is saved:
whoever loads the file truncates and pads itself.
"""
import argparse
import collections
import heapq
import os
import sys

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

sys.dont_write_bytecode = True  # no __pycache__ in scripts/ (it is not ignored)
import text_corpus  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def corpus(seed: int, texts: int) -> list:
    rng = np.random.default_rng(seed)
    out = text_corpus.texts(rng, texts, median=22)
    # Every non-ASCII word at least a few times, whatever the sample drew.
    out += [" ".join(text_corpus.NON_ASCII)] * 5
    return out


def word_counts(tok: Tokenizer, lines: list) -> dict:
    """Words after the tokenizer's normaliser and pre-tokenizer, with their counts. Both act
    within whitespace-separated words, so each distinct one goes through them once."""
    raw = collections.Counter(w for line in lines for w in line.split())
    counts = collections.Counter()
    for text, n in raw.items():
        for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
            counts[w] += n
    return counts


def learn_vocab(counts: dict, vocab_size: int, min_frequency: int) -> list:
    """WordPiece vocabulary learnt the way tokenizers' WordPieceTrainer does (BPE merges over
    word pieces, `##` on pieces inside a word), but with ties broken by the pieces' text, so the
    result never depends on hash order."""
    words = [[w[0]] + ["##" + c for c in w[1:]] for w in counts]
    freq = list(counts.values())
    vocab = SPECIALS + sorted({s for w in words for s in w}, key=lambda s: (s.startswith("##"), s))
    seen = set(vocab)
    pairs, where = collections.Counter(), collections.defaultdict(set)
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pairs[pair] += freq[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pairs.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -neg:
            continue  # stale entry
        if -neg < min_frequency:
            break
        new = pair[0] + pair[1][2:]
        if new not in seen:
            seen.add(new)
            vocab.append(new)
        changed = set()
        for i in sorted(where.pop(pair, ())):
            w, f = words[i], freq[i]
            for p in zip(w, w[1:]):
                pairs[p] -= f
                changed.add(p)
            words[i] = w = merge(w, pair, new)
            for p in zip(w, w[1:]):
                pairs[p] += f
                where[p].add(i)
                changed.add(p)
        pairs.pop(pair, None)
        for p in sorted(changed - {pair}):
            if pairs[p] > 0:
                heapq.heappush(heap, (-pairs[p], p))
    return vocab


def merge(word: list, pair: tuple, new: str) -> list:
    out, k = [], 0
    while k < len(word):
        if k + 1 < len(word) and (word[k], word[k + 1]) == pair:
            out.append(new)
            k += 2
        else:
            out.append(word[k])
            k += 1
    return out


def pipeline(model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def build(lines: list, vocab_size: int, hf_trainer: bool) -> Tokenizer:
    if hf_trainer:
        tok = pipeline(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=SPECIALS,
            continuing_subword_prefix="##",
            show_progress=False,
        )
        tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    else:
        counts = word_counts(pipeline(models.WordPiece()), lines)
        vocab = learn_vocab(counts, vocab_size, min_frequency=2)
        tok = pipeline(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                        continuing_subword_prefix="##"))
        tok.add_special_tokens(SPECIALS)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.no_truncation()
    tok.no_padding()
    return tok


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=int, default=3000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--texts", type=int, default=30_000, help="texts in the training corpus")
    p.add_argument(
        "--hf-trainer",
        action="store_true",
        help="train with tokenizers' WordPieceTrainer instead: it breaks ties in hash order, so "
        "its vocabulary (ids and a few tokens) differs from run to run",
    )
    a = p.parse_args()
    tok = build(corpus(a.seed, a.texts), a.vocab_size, a.hf_trainer)
    for i, t in enumerate(SPECIALS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    tok.save(a.out, pretty=True)


if __name__ == "__main__":
    main()
