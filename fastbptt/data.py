"""Text, tokens and minibatches for the character-level language model (d2l 0.17 §8.2–8.3).

- :func:`load_text`: a UTF-8 text file, or the embedded corpus (*The Time Machine*).
- :func:`tokenize`: ``"book"`` (the book's rule: letters only, lower case, lines joined
  with no separator) or ``"chars"`` (raw characters).
- :class:`Vocab`: ``<unk>`` first, then tokens by descending frequency (ties: first seen).
- :func:`sequential_batches`, :func:`random_batches`: the book's two samplers, drawing from a
  ``numpy.random.Generator``; they yield (X, Y) as (T, B) token ids, time-major as the
  kernels take them.
"""
from __future__ import annotations

import collections
import re
from importlib import resources

import numpy as np

from ._preflight import check_input

UNK = "<unk>"
TOKENIZERS = ("book", "chars")


def load_text(path=None) -> str:
    """The text of ``path`` (UTF-8), or the embedded *The Time Machine* when ``path`` is None."""
    if path is None:
        return resources.files("fastbptt").joinpath("data/timemachine.txt").read_text("utf-8")
    p = check_input("path", path)
    raw = p.read_bytes()
    if not raw.strip():
        raise ValueError(f"path: {path} is empty")
    if b"\x00" in raw:
        raise ValueError(f"path: {path} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"path: {path} is not UTF-8 ({e.reason} at byte {e.start})") from None


def tokenize(text: str, mode: str = "book") -> list:
    """Character tokens.  ``book``: per line ``re.sub('[^A-Za-z]+', ' ', line).strip().lower()``,
    lines joined with no separator (d2l 0.17 ``read_time_machine``); ``chars``: every character."""
    if mode == "book":
        lines = text.split("\n")
        return list("".join(re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in lines))
    if mode == "chars":
        return list(text)
    raise ValueError(f"mode: expected one of {', '.join(TOKENIZERS)}, got {mode!r}")


class Vocab:
    """Token ↔ id.  Id 0 is ``<unk>``; the rest by descending frequency, ties by first appearance."""

    def __init__(self, tokens=None, *, idx_to_token=None):
        if idx_to_token is None:
            counts = collections.Counter(tokens)
            ranked = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)   # stable
            idx_to_token = [UNK] + [tok for tok, _ in ranked if tok != UNK]
        self.idx_to_token = list(idx_to_token)
        self.token_to_idx = {tok: i for i, tok in enumerate(self.idx_to_token)}

    def __len__(self):
        return len(self.idx_to_token)

    def __eq__(self, other):
        return isinstance(other, Vocab) and self.idx_to_token == other.idx_to_token

    def encode(self, tokens) -> np.ndarray:
        """Token ids (int64); tokens not in the vocabulary map to ``<unk>`` (id 0)."""
        get = self.token_to_idx.get
        return np.fromiter((get(t, 0) for t in tokens), dtype=np.int64, count=len(tokens))

    def unknown(self, tokens) -> list:
        """The distinct tokens of ``tokens`` that are not in the vocabulary."""
        return sorted({t for t in tokens if t not in self.token_to_idx})

    def decode(self, ids) -> str:
        return "".join(self.idx_to_token[int(i)] for i in ids)


def check_length(n_tokens, num_steps, batch_size, what="text"):
    need = num_steps * batch_size + 1
    if n_tokens < need:
        raise ValueError(f"n_tokens: the {what} has {n_tokens} tokens, fewer than one minibatch "
                         f"(num_steps·batch_size + 1 = {need}); use a longer text or smaller "
                         f"num_steps/batch_size")


def positive_int(name, v):
    """ValueError naming ``name`` unless v is a positive integer (Python's or numpy's)"""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name}: expected a positive integer, got {v!r}")


def fraction(name, v):
    """ValueError naming ``name`` unless v is a real number in [0, 1) (Python's or numpy's)"""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not 0 <= v < 1:
        raise ValueError(f"{name}: expected a number in [0, 1), got {v!r}")


def _check_batches(corpus, batch_size, num_steps, least):
    """the corpus as a 1-D integer array, or ValueError/TypeError naming the argument; ``least``:
    the tokens it needs for the sizes (None: any non-empty corpus)"""
    positive_int("batch_size", batch_size)
    positive_int("num_steps", num_steps)
    ids = corpus if isinstance(corpus, np.ndarray) else np.asarray(corpus)   # a memmap stays one (its pages)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise TypeError(f"corpus: expected a 1-D array of integer token ids, got {ids.ndim}-D of {ids.dtype}")
    need = 2 if least is None else least
    if ids.size < need:
        raise ValueError(f"corpus: {ids.size} tokens, fewer than the {need} that batch_size={batch_size} "
                         f"and num_steps={num_steps} need")
    return ids


def sequential_batches(corpus, batch_size, num_steps, rng):
    """The book's ``seq_data_iter_sequential``: a random offset in [0, num_steps], then
    ``batch_size`` rows that continue from one minibatch to the next (so the hidden state
    can be carried).  Yields (X, Y), each (num_steps, batch_size)."""
    corpus = _check_batches(corpus, batch_size, num_steps, num_steps * batch_size + 1)
    n = len(corpus)
    offset = int(rng.integers(0, min(num_steps, n - num_steps * batch_size - 1) + 1))
    num_tokens = ((n - offset - 1) // batch_size) * batch_size
    Xs = corpus[offset:offset + num_tokens].reshape(batch_size, -1)
    Ys = corpus[offset + 1:offset + 1 + num_tokens].reshape(batch_size, -1)
    for i in range(0, (Xs.shape[1] // num_steps) * num_steps, num_steps):
        yield Xs[:, i:i + num_steps].T, Ys[:, i:i + num_steps].T


def random_batches(corpus, batch_size, num_steps, rng):
    """The book's ``seq_data_iter_random``: a random offset in [0, num_steps), the rest cut
    into non-overlapping windows of num_steps, shuffled; each minibatch takes batch_size of
    them.  Yields (X, Y), each (num_steps, batch_size)."""
    corpus = _check_batches(corpus, batch_size, num_steps, num_steps * batch_size + 1)
    n = len(corpus)
    offset = int(rng.integers(0, min(num_steps - 1, n - num_steps * batch_size - 1) + 1))
    count = (n - offset - 1) // num_steps                # int32 where it fits: a big text's starts are many
    starts = offset + num_steps * np.arange(count, dtype=np.int32 if n < 2**31 else np.int64)
    rng.shuffle(starts)
    cols = np.arange(num_steps)[:, None]
    for i in range(0, (len(starts) // batch_size) * batch_size, batch_size):
        s = starts[i:i + batch_size][None, :] + cols
        yield corpus[s], corpus[s + 1]


SAMPLERS = {"sequential": sequential_batches, "random": random_batches}


def eval_batches(corpus, batch_size, num_steps):
    """The whole of ``corpus`` as ``batch_size`` parallel streams cut into windows of
    num_steps (the last may be shorter), for forward-only evaluation with the state
    carried across windows.  Yields (X, Y), each (≤ num_steps, B)."""
    corpus = _check_batches(corpus, batch_size, num_steps, None)
    B = max(1, min(batch_size, len(corpus) - 1))
    L = (len(corpus) - 1) // B
    Xs = corpus[:B * L].reshape(B, L)
    Ys = corpus[1:B * L + 1].reshape(B, L)
    for i in range(0, L, num_steps):
        yield Xs[:, i:i + num_steps].T, Ys[:, i:i + num_steps].T
