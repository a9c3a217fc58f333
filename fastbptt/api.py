"""The public API: the only layer that validates, normalizes dtype/layout and picks a backend.

Every function validates its arguments once, then hands C-contiguous, writeable
arrays of one float dtype (token ids as int64) to the graph (``fastbptt._model``) with a
backend (``fastbptt._cpu`` or ``fastbptt._cuda``) and its cell.  Inputs are never modified.  The params' dtype (float32 or
float64) is the compute dtype; X (dense), h0 and dHs of another float dtype are
cast to it, and every returned array is in it.
"""
from __future__ import annotations

import importlib
import numbers
from collections.abc import Mapping

import numpy as np

from . import _model, config
from .truncation import Randomized, Truncated

PARAM_KEYS = ("W_xh", "W_hh", "b_h", "W_hq", "b_q")
RNN_KEYS = ("W_xh", "W_hh", "b_h")
_FLOATS = (np.float32, np.float64)
CUDA_MISSING = "device='cuda' needs numba-cuda and a CUDA GPU: pip install fastbptt[cuda]"


# ----------------------------------------------------------------------------- public
def init_params(input_size, hidden_size, output_size, dtype=np.float32, seed=None):
    """Parameters of a one-layer RNN with a linear head, at the book's scale.

    Weights ~ N(0, 0.01²) and zero biases, as *Dive into Deep Learning* §8.5
    (``get_params``): with std 0.01 the recurrence starts close to linear and far
    from saturation, which is what the book's learning rate (1) and clipping (θ=1)
    are tuned for.  ``seed`` is anything :func:`numpy.random.default_rng` takes.

    Returns ``{"W_xh": (D,H), "W_hh": (H,H), "b_h": (H,), "W_hq": (H,Q), "b_q": (Q,)}``.
    """
    D = _size("input_size", input_size)
    H = _size("hidden_size", hidden_size)
    Q = _size("output_size", output_size)
    dt = _dtype("dtype", dtype)
    rng = np.random.default_rng(seed)
    return {
        "W_xh": (0.01 * rng.standard_normal((D, H))).astype(dt),
        "W_hh": (0.01 * rng.standard_normal((H, H))).astype(dt),
        "b_h": np.zeros(H, dt),
        "W_hq": (0.01 * rng.standard_normal((H, Q))).astype(dt),
        "b_q": np.zeros(Q, dt),
    }


def loss_and_grad(params, X, Y, h0=None, *, activation="tanh", truncation=None,
                  reduction="mean", device="cpu"):
    """Loss, exact (or truncated) BPTT gradients and the last hidden state.

    z_t = x_t W_xh + h_{t-1} W_hh + b_h,  h_t = φ(z_t),  o_t = h_t W_hq + b_q,
    L = 1/(T·B) Σ_t Σ_b CE(softmax(o_t[b]), y_t[b])   (``reduction="sum"``: no 1/(T·B)).

    Parameters
    ----------
    params : dict with "W_xh" (D,H), "W_hh" (H,H), "b_h" (H,), "W_hq" (H,Q), "b_q" (Q,),
        all float32 or float64 (mixed: promoted to the widest).
    X : integer (T,B) token ids in [0, D) (one-hot input, never materialized) or
        floating (T,B,D) dense input.
    Y : integer (T,B) targets in [0, Q).
    h0 : (B,H) initial state, or None for zeros.
    activation : "tanh" (default), "relu" or "identity".
    truncation : None or "full" (exact), :class:`Truncated` ``(k)`` or :class:`Randomized` ``(p, seed)``.
    reduction : "mean" (default) or "sum".
    device : "cpu" (default) or "cuda".

    Returns
    -------
    loss : float
    grads : dict of the five parameter keys and "h0" (∂L/∂h0), in the params' dtype.
    h_T : (B,H) last hidden state.
    """
    be = _backend(device)
    P, Xc, h0c = _model_inputs(be, params, PARAM_KEYS, X, h0)
    Yc = _targets(be, Y, Xc, P)
    k, xi = _truncation(truncation, Xc.shape[0], h0c.dtype)
    scale = _scale(reduction, Xc)
    loss, grads, h_T = _model.loss_and_grad(be, _cell(be), P, Xc, Yc, h0c, _activation(activation), k, xi,
                                            scale)
    return float(loss), grads, h_T


def loss(params, X, Y, h0=None, *, activation="tanh", reduction="mean", device="cpu"):
    """Forward only: ``(loss, h_T)`` with the same arguments and meaning as :func:`loss_and_grad`.

    For evaluation (validation perplexity = exp(mean loss)) without the backward cost.
    """
    be = _backend(device)
    P, Xc, h0c = _model_inputs(be, params, PARAM_KEYS, X, h0)
    Yc = _targets(be, Y, Xc, P)
    scale = _scale(reduction, Xc)
    total, h_T = _model.loss(be, _cell(be), P, Xc, Yc, h0c, _activation(activation))
    return float(total * scale), h_T


def rnn_forward(params, X, h0=None, *, activation="tanh", device="cpu"):
    """Hidden states h_1..h_T, shape (T,B,H): h_t = φ(x_t W_xh + h_{t-1} W_hh + b_h).

    ``params`` needs "W_xh", "W_hh", "b_h" ("W_hq", "b_q" may be present and are ignored).
    X, h0 and activation as in :func:`loss_and_grad`.
    """
    be = _backend(device)
    P, Xc, h0c = _model_inputs(be, params, RNN_KEYS, X, h0)
    return _model.rnn_forward(be, _cell(be), P, Xc, h0c, _activation(activation))[1:]


def rnn_backward(params, X, Hs, dHs, h0=None, *, activation="tanh", truncation=None,
                 device="cpu"):
    """BPTT through the recurrence alone, for any head on top.

    Hs (T,B,H): the output of :func:`rnn_forward` for the same params, X, h0;
    dHs (T,B,H): ∂L/∂h_t of the head (the direct term of each step's loss, which
    is what :class:`Truncated` counts steps from).

    Returns ``{"W_xh", "W_hh", "b_h", "h0"}``, in the params' dtype.
    """
    be = _backend(device)
    P, Xc, h0c = _model_inputs(be, params, RNN_KEYS, X, h0)
    Hx, dZ = _states_and_adjoints(be, Hs, dHs, Xc, h0c)
    k, xi = _truncation(truncation, Xc.shape[0], h0c.dtype)
    return _model.rnn_backward(be, _cell(be), P, Xc, Hx, dZ, _activation(activation), k, xi)


def rnn_adjoints(params, X, Hs, dHs, h0=None, *, activation="tanh", device="cpu"):
    """The adjoints of the full gradient, (T+1,B,H): A[t] = ∂L/∂h_t for t = 0..T.

    a_t = dHs_t + dz_{t+1} W_hhᵀ (a_T = dHs_T, a_0 = dz_1 W_hhᵀ = ∂L/∂h_0), where dHs holds
    each step's direct term as in :func:`rnn_backward`.  With dHs nonzero only at step t,
    A[t-j] = ∂l_t/∂h_{t-j}: how the gradient of one loss term flows back j steps.
    """
    be = _backend(device)
    P, Xc, h0c = _model_inputs(be, params, RNN_KEYS, X, h0)
    Hx, dZ = _states_and_adjoints(be, Hs, dHs, Xc, h0c)
    return _model.rnn_adjoints(be, _cell(be), P, Xc, Hx, dZ, _activation(activation))


def to_device(params):
    """The params copied to the GPU once, as numba device arrays, for ``device="cuda"`` calls
    in a loop: with params on the device, inputs may be numpy or CUDA arrays (numba, CuPy,
    torch: zero-copy) and every result stays on the device.  Validated like any call."""
    be = _backend("cuda")
    keys = PARAM_KEYS if isinstance(params, Mapping) and "W_hq" in params else RNN_KEYS
    P, _ = _params(be, params, keys)
    return be.to_device(P)


# ------------------------------------------------------------------------- dispatch
def _cell(be):
    """the backend's module of the Elman cell (the one cell so far)"""
    return be.CELLS["rnn"]


def _backend(device):
    """The module that runs the kernels for ``device``; CUDA is imported only when asked for."""
    if device == "cpu":
        from . import _cpu
        return _cpu
    if device == "cuda":
        try:
            cuda_backend = importlib.import_module("fastbptt._cuda")
        except ImportError as e:
            raise RuntimeError(f"{CUDA_MISSING} ({e})") from None
        if not cuda_backend.available():
            raise RuntimeError(CUDA_MISSING)
        return cuda_backend
    raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")


# ----------------------------------------------------------------------- validation
def _model_inputs(be, params, keys, X, h0):
    """(params, X, h0) validated and normalized to the params' dtype; h0 None becomes zeros."""
    P, dt = _params(be, params, keys)
    Xc = _inputs(be, "X", X, P["W_xh"].shape[0], dt)
    return P, Xc, _state(be, "h0", h0, Xc.shape[1], P["W_hh"].shape[0], dt)


def _targets(be, Y, Xc, P):
    return _token_ids(be, "Y", Y, Xc.shape[:2], P["W_hq"].shape[1],
                      "targets; Y holds class ids of the W_hq columns")


def _scale(reduction, Xc):
    if reduction not in config.REDUCTIONS:
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    return 1.0 / (Xc.shape[0] * Xc.shape[1]) if reduction == "mean" else 1.0


def _states_and_adjoints(be, Hs, dHs, Xc, h0c):
    """Hx = h_0..h_T (T+1,B,H) as the forward keeps them, and a writeable copy of dHs."""
    shape = tuple(Xc.shape[:2]) + tuple(h0c.shape[1:])
    Hsc = _floats(be, "Hs", Hs, shape, h0c.dtype)
    dZ = _floats(be, "dHs", dHs, shape, h0c.dtype, copy=True)     # the kernels overwrite it
    return be.stack_states(h0c, Hsc), dZ


def _size(name, n):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name}: expected a positive int, got {type(n).__name__} {n!r}")
    if n < 1:
        raise ValueError(f"{name}: expected a positive int, got {n}")
    return int(n)


def _dtype(name, dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name}: expected float32 or float64, got {dtype!r}") from None
    if dt.type not in _FLOATS:
        raise TypeError(f"{name}: expected float32 or float64, got {dt}")
    return dt


def _finite(be, name, a):
    """``a`` (normalized) if every value is finite, else a ValueError saying where."""
    bad = be.first_nonfinite(a)
    if bad is not None:
        raise ValueError(f"{name}: non-finite value {bad}")
    return a


def _params(be, params, keys):
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict with keys {', '.join(keys)}, got {type(params).__name__}")
    for key in keys:
        if key not in params:
            raise KeyError(f"params: missing key {key!r} (expected {', '.join(keys)})")
    extra = sorted(str(k) for k in params if k not in PARAM_KEYS)
    if extra:
        raise ValueError(f"params: unexpected key(s) {', '.join(map(repr, extra))} (expected {', '.join(PARAM_KEYS)})")
    arrays = {key: be.as_array(f"params[{key!r}]", params[key]) for key in keys}
    for key, a in arrays.items():
        if a.dtype.type not in _FLOATS:
            raise TypeError(f"params[{key!r}]: expected float32 or float64, got {a.dtype}")
    dt = np.result_type(*(a.dtype for a in arrays.values()))
    want_ndim = {"W_xh": 2, "W_hh": 2, "b_h": 1, "W_hq": 2, "b_q": 1}
    for key, a in arrays.items():
        if a.ndim != want_ndim[key]:
            raise ValueError(f"params[{key!r}]: expected {want_ndim[key]} dimensions, got shape {a.shape}")
        if 0 in a.shape:
            raise ValueError(f"params[{key!r}]: empty shape {a.shape}; sizes must be >= 1")
    D, H = arrays["W_xh"].shape
    expect = {"W_hh": (H, H), "b_h": (H,)}
    if "W_hq" in arrays:
        Q = arrays["W_hq"].shape[1]
        expect.update(W_hq=(H, Q), b_q=(Q,))
    for key, shape in expect.items():
        if arrays[key].shape != shape:
            raise ValueError(f"params[{key!r}]: expected shape {shape} (from W_xh {D}x{H}"
                             f"{', W_hq' if key == 'b_q' else ''}), got {arrays[key].shape}")
    P = {key: _finite(be, f"params[{key!r}]", be.normalized(f"params[{key!r}]", a, dt))
         for key, a in arrays.items()}
    return P, dt


def _inputs(be, name, X, D, dt):
    X = be.as_array(name, X)
    if X.dtype.kind in "iu":
        if X.ndim != 2:
            raise ValueError(f"{name}: integer token ids must have shape (T,B), got {X.shape}")
        _nonempty(name, X.shape, "(T,B)")
        return _token_ids(be, name, X, X.shape, D, "input; X holds ids of the W_xh rows")
    if X.dtype.kind == "f":
        if X.ndim != 3:
            raise ValueError(f"{name}: dense input must have shape (T,B,D), got {X.shape}")
        _nonempty(name, X.shape[:2], "(T,B,D)")
        if X.shape[2] != D:
            raise ValueError(f"{name}: dense input has D={X.shape[2]} but W_xh has {D} rows")
        return _finite(be, name, be.normalized(name, X, dt))
    raise TypeError(f"{name}: expected integer token ids (T,B) or floating (T,B,D), got dtype {X.dtype}")


def _nonempty(name, shape, layout):
    if 0 in shape:
        raise ValueError(f"{name}: empty sequence or batch, shape {shape} {layout}; T and B must be >= 1")


def _token_ids(be, name, ids, shape, n, what):
    ids = be.as_array(name, ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer ids, got dtype {ids.dtype}")
    if tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (T,B), got {tuple(ids.shape)}")
    ids = be.normalized(name, ids, np.int64)
    lo, hi = be.id_range(ids)
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: token id {bad} out of range [0, {n}); {what}")
    return ids


def _state(be, name, h0, B, H, dt):
    if h0 is None:
        return np.zeros((B, H), dt)
    return _floats(be, name, h0, (B, H), dt)


def _floats(be, name, a, shape, dt, copy=False):
    a = be.as_array(name, a)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a float array, got dtype {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(a.shape)}")
    return _finite(be, name, be.normalized(name, a, dt, copy=copy))


def _activation(activation):
    try:
        return config.ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(f"activation: expected one of {', '.join(map(repr, config.ACTIVATIONS))}, "
                         f"got {activation!r}") from None


def _truncation(truncation, T, dt):
    """(k, xi): k = per-term depth for Truncated(k < T), else None and xi = ξ_1..ξ_T."""
    if truncation is None or (isinstance(truncation, str) and truncation == "full"):
        return None, np.ones(T, dt)
    if isinstance(truncation, Truncated):
        if truncation.k >= T:
            return None, np.ones(T, dt)
        return truncation.k, None
    if isinstance(truncation, Randomized):
        return None, truncation.draw(T, dt)
    if isinstance(truncation, str):
        raise ValueError(f"truncation: expected None, 'full', Truncated(k) or Randomized(p), got {truncation!r}")
    raise TypeError(f"truncation: expected None, 'full', Truncated(k) or Randomized(p), "
                    f"got {type(truncation).__name__}")
