"""Text generation from a trained model (the book's ``predict_ch8``, plus sampling)."""
from __future__ import annotations

import warnings

import numpy as np

from . import api


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
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    cell, _ = api.cell_of(params)
    if cell != "rnn" and activation != "tanh":
        raise ValueError(f"activation: applies to the rnn cell only, got {activation!r} for a {cell}")
    unknown = vocab.unknown(prefix)
    if unknown:
        warnings.warn(f"prefix: {', '.join(map(repr, unknown))} not in the vocabulary; read as <unk>",
                      stacklevel=2)
    rng = np.random.default_rng(seed)
    ids = vocab.encode(list(prefix))
    Hs, state = api.rnn_forward(params, ids[:, None], activation=activation, return_state=True)
    h = Hs[-1]                                                              # the top layer's, (1, H)
    out = []
    W_hq, b_q = np.asarray(params["W_hq"], np.float64), np.asarray(params["b_q"], np.float64)
    for _ in range(length):
        o = h[0].astype(np.float64) @ W_hq + b_q
        if temperature == 0:
            nxt = int(np.argmax(o))
        else:
            z = o / temperature
            p = np.exp(z - z.max())
            nxt = int(rng.choice(len(p), p=p / p.sum()))
        out.append(nxt)
        Hs, state = api.rnn_forward(params, np.array([[nxt]]), state, activation=activation,
                                    return_state=True)
        h = Hs[-1]
    return prefix + vocab.decode(out)
