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
    cell, L = api.cell_of(params)
    for name in api.HEAD_KEYS:
        if name not in params:
            raise ValueError(f"params: missing the head's {name!r} (generation reads the output layer)")
    W_hq, b_q = np.asarray(params["W_hq"], np.float64), np.asarray(params["b_q"], np.float64)
    H = np.shape(params[key("W_hh", L - 1)])[0]
    if W_hq.shape != (H, len(vocab)) or b_q.shape != (len(vocab),):
        raise ValueError(f"params['W_hq'], params['b_q']: expected shapes {(H, len(vocab))} and {(len(vocab),)} "
                         f"for a vocabulary of {len(vocab)} tokens, got {W_hq.shape} and {b_q.shape}")
    if not (np.isfinite(W_hq).all() and np.isfinite(b_q).all()):
        raise ValueError("params['W_hq'], params['b_q']: non-finite values")
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
    for _ in range(length):
        o = h[0].astype(np.float64) @ W_hq + b_q
        if temperature == 0:
            nxt = int(np.argmax(o))
        else:
            with np.errstate(over="ignore"):       # a tiny temperature: -inf below the max, greedy
                p = np.exp((o - o.max()) / temperature)
            nxt = int(rng.choice(len(p), p=p / p.sum()))
        out.append(nxt)
        Hs, state = api.rnn_forward(params, np.array([[nxt]]), state, activation=activation,
                                    return_state=True)
        h = Hs[-1]
    return prefix + vocab.decode(out)
