"""How far the gradient of each loss term flows back in time.

Three strategies, exactly as in the design notes (§1):

- ``None`` / ``"full"``: the exact gradient (one O(T) reverse sweep).
- :class:`Truncated` ``(k)``: loss term l_t contributes only through steps
  t-k+1 … t (per term, *not* chunking the sequence into windows).
- :class:`Randomized` ``(p, seed)``: the adjoint crossing from h_t to h_{t-1} is
  multiplied by ξ_t ∈ {0, 1/p}, P(ξ_t = 1/p) = p, so E[gradient] = full gradient
  (Tallec & Ollivier 2017).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Truncated:
    """Per-term truncation after ``k`` steps.

    Every loss term l_t flows back through at most ``k`` steps: it contributes the
    direct terms of steps t-k+1 … t only.  ``k = 1``: nothing crosses a step through
    W_hh; ``k >= T``: the full gradient (and the O(T) full path is taken).
    ∂L/∂h_0 receives l_t's flow only when t <= k.

    Cost: the kernel runs min(k, T) chain depths, each one large GEMM over the
    (T-d)·B rows still active, so O(T·min(k, T)) recurrent products in all.
    """

    k: int

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral):
            raise TypeError(f"Truncated: k must be a positive int, got {type(self.k).__name__} {self.k!r}")
        if self.k < 1:
            raise ValueError(f"Truncated: k must be >= 1 (k=1 keeps only the direct terms), got {self.k}")
        object.__setattr__(self, "k", int(self.k))


@dataclass(frozen=True)
class Randomized:
    """Randomized truncation (unbiased): ξ_t ∈ {0, 1/p} scales the h_t → h_{t-1} crossing.

    ``p`` in (0, 1]; ``p = 1`` is the exact gradient.  ``seed``: ``None`` (fresh entropy
    every call), a non-negative int (the same gradient on every call), or a
    ``numpy.random.Generator`` (drawn from on every call).
    """

    p: float
    seed: Any = None

    def __post_init__(self):
        if isinstance(self.p, bool) or not isinstance(self.p, numbers.Real):
            raise TypeError(f"Randomized: p must be a float in (0, 1], got {type(self.p).__name__} {self.p!r}")
        if not (0.0 < float(self.p) <= 1.0):
            raise ValueError(f"Randomized: p must be in (0, 1], got {self.p}")
        object.__setattr__(self, "p", float(self.p))
        seed = self.seed
        ok = seed is None or isinstance(seed, (np.random.Generator, np.random.SeedSequence)) or (
            isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0)
        if not ok:
            raise TypeError(f"Randomized: seed must be None, a non-negative int or a numpy Generator, got {seed!r}")

    def draw(self, T: int, dtype) -> np.ndarray:
        """ξ_1 … ξ_T as an array of length T: 1/p with probability p, else 0."""
        rng = np.random.default_rng(self.seed)
        keep = rng.random(T) < self.p
        return np.where(keep, 1.0 / self.p, 0.0).astype(dtype)
