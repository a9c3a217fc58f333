"""Text generation from a trained model (the book's ``predict_ch8``, plus sampling)."""
from __future__ import annotations

import numbers
import warnings

import numpy as np

from . import api
from ._model import key
from .data import Vocab


def generate(params, vocab, prefix, length, *, temperature=0.0, seed=None, activation="tanh"):
    """``prefix`` followed by ``length`` generated tokens.

    Any cell and depth (:func:`fastbptt.cell_of` of ``params``); ``activation`` is the rnn
    cell's.  Warm-up: the prefix is run through the model (its characters must be in
    ``vocab``; others map to ``<unk>`` with a warning).  Then each step feeds the last
    token back, carrying the state (every layer's h, and the LSTM's c): greedy (argmax) at
    ``temperature`` 0, the book's choice; otherwise a draw from softmax(o / temperature)
    with ``numpy.random.default_rng(seed)``.
    """
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix: expected a non-empty string, got {prefix!r}")
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise ValueError(f"length: expected a non-negative integer, got {length!r}")
    if isinstance(temperature, bool) or not (isinstance(temperature, numbers.Real) and temperature >= 0
                                             and np.isfinite(temperature)):
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    if not isinstance(vocab, Vocab):
        raise TypeError(f"vocab: expected a fastbptt Vocab (the corpus's), got {type(vocab).__name__}")
    api.cell_of(params)
    for name in api.HEAD_KEYS:
        if name not in params:
            raise ValueError(f"params: missing the head's {name!r} (generation reads the output layer)")
    P, _, cell, L = api._params(api._backend("cpu"), params, None, head=True)     # as every call checks them
    W_hq, b_q = P["W_hq"].astype(np.float64), P["b_q"].astype(np.float64)
    H = P[key("W_hh", L - 1)].shape[0]
    if W_hq.shape != (H, len(vocab)):
        raise ValueError(f"params['W_hq'], params['b_q']: expected shapes {(H, len(vocab))} and {(len(vocab),)} "
                         f"for a vocabulary of {len(vocab)} tokens, got {W_hq.shape} and {b_q.shape}")
    if cell != "rnn" and activation != "tanh":
        raise ValueError(f"activation: applies to the rnn cell only, got {activation!r} for a {cell}")
    unknown = vocab.unknown(prefix)
    if unknown:
        warnings.warn(f"prefix: {', '.join(map(repr, unknown))} not in the vocabulary; read as <unk>",
                      stacklevel=2)
    rng = api.random_generator("seed", seed)
    ids = vocab.encode(list(prefix))
    Hs, state = api.rnn_forward(params, ids[:, None], activation=activation, return_state=True)
    h = Hs[-1]                                                              # the top layer's, (1, H)
    out = []
    for i in range(length):
        _finite_state(state, i)                       # the state this token is read from
        o = h[0].astype(np.float64) @ W_hq + b_q
        if temperature == 0:
            nxt = int(np.argmax(o))
        else:
            with np.errstate(over="ignore"):       # a tiny temperature: -inf below the max, greedy
                p = np.exp((o - o.max()) / temperature)
            nxt = int(rng.choice(len(p), p=p / p.sum()))
        out.append(nxt)
        if i + 1 < length:                            # the last token's state is not read
            Hs, state = api.rnn_forward(params, np.array([[nxt]]), state, activation=activation,
                                        return_state=True)
            h = Hs[-1]
    return prefix + vocab.decode(out)


def _finite_state(state, n):
    """ValueError unless the state after the prefix and n generated tokens is finite (finite
    params whose state overflows, a relu cell's say, can make it inf)"""
    if not all(np.isfinite(s).all() for s in (state if isinstance(state, tuple) else (state,))):
        raise ValueError(f"params: the state overflowed to a non-finite value after the prefix and {n} "
                         f"generated tokens (weights too large for this activation)")
