"""Synthetic text shared by gen_tokenizer.py and gen_text_data.py.

A fixed lexicon of pseudo-words built from syllables (plus a few numbers and non-ASCII words:
accented Latin, Cyrillic, CJK, emoji) is drawn from a Zipf distribution, so frequent words become
whole tokens and rare ones split into word pieces. The lexicon never depends on the caller's
seed: a tokenizer and a data set generated with different seeds still share their words.
"""
import functools

import numpy as np

LEXICON_SIZE = 20_000
LEXICON_SEED = 1234
MAX_WORDS = 700

ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
          "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "y"]
CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "x"]
NON_ASCII = ["café", "naïve", "Straße", "Zürich", "façade", "señor", "привет", "мир", "текст",
             "日本語", "東京", "テキスト", "🚀", "😀"]


def _syllable_word(rng: np.random.Generator) -> str:
    n = rng.choice([1, 2, 3, 4], p=[0.25, 0.4, 0.25, 0.1])
    return "".join(ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))]
                   + CODAS[rng.integers(len(CODAS))] for _ in range(n))


@functools.lru_cache(maxsize=1)
def lexicon() -> np.ndarray:
    """LEXICON_SIZE distinct words, most frequent first; non-ASCII words and numbers spread in."""
    rng = np.random.default_rng(LEXICON_SEED)
    words, seen = [], set()
    while len(words) < LEXICON_SIZE - len(NON_ASCII) - 60:
        w = _syllable_word(rng)
        if w not in seen:
            seen.add(w)
            words.append(w)
    # Short words are the frequent ones, as in natural language (with some noise).
    order = np.argsort(np.array([len(w) for w in words]) + rng.normal(0, 2, len(words)), kind="stable")
    words = [words[i] for i in order]
    numbers = [str(x) for x in rng.integers(0, 3000, size=60)]
    extra = NON_ASCII + numbers
    # Ranks from a few hundred to a few thousand: frequent enough to be seen in training.
    ranks = np.sort(rng.integers(200, 4000, size=len(extra)))
    for r, w in zip(ranks[::-1], extra[::-1]):
        words.insert(int(r), w)
    return np.array(words, dtype=object)


@functools.lru_cache(maxsize=4)
def _zipf(n: int, s: float = 1.07) -> np.ndarray:
    p = 1.0 / (np.arange(n) + 2.7) ** s
    return p / p.sum()


@functools.lru_cache(maxsize=1)
def _variants() -> np.ndarray:
    """Each word in six spellings: (plain, capitalised) x (no mark, '.', ',')."""
    lex = lexicon()
    caps = np.array([w[:1].upper() + w[1:] for w in lex], dtype=object)
    return np.concatenate([lex, lex + ".", lex + ",", caps, caps + ".", caps + ","])


def word_counts(rng: np.random.Generator, n: int, median: float, sigma: float = 0.8,
                max_words: int = MAX_WORDS) -> np.ndarray:
    """Words per text: log-normal around `median`, at least 1, at most `max_words`."""
    k = np.rint(median * np.exp(sigma * rng.standard_normal(n)))
    return np.clip(k, 1, max_words).astype(np.int64)


def texts_of_lengths(rng: np.random.Generator, counts: np.ndarray) -> list:
    """One text per entry of `counts` (that many words), as sentences: capitalised, with commas
    and full stops."""
    total = int(counts.sum())
    lex = lexicon()
    idx = rng.choice(len(lex), size=total, p=_zipf(len(lex)))
    u = rng.random(total)
    ends = np.cumsum(counts)
    mark = np.where(u < 1 / 11, 1, np.where(u > 1 - 1 / 14, 2, 0))
    mark[ends - 1] = 1  # every text ends with a full stop
    starts = np.zeros(total, dtype=bool)
    starts[0] = True
    starts[1:] = mark[:-1] == 1  # after a full stop (and so at the start of each text)
    words = _variants()[idx + len(lex) * (mark + 3 * starts)].tolist()
    out, lo = [], 0
    for hi in ends.tolist():
        out.append(" ".join(words[lo:hi]))
        lo = hi
    return out


def texts(rng: np.random.Generator, n: int, median: float = 22, sigma: float = 0.8,
          max_words: int = MAX_WORDS) -> list:
    return texts_of_lengths(rng, word_counts(rng, n, median, sigma, max_words))
