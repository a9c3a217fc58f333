"""The public API: the only layer that validates, normalizes dtype/layout and picks a backend.

Every function validates its arguments once, then hands C-contiguous, writeable
arrays of one float dtype (token ids as int64) to the graph (``fastbptt._model``) with a
backend (``fastbptt._cpu`` or ``fastbptt._cuda``) and its cell.  Inputs are never modified.  The
params' dtype (float32 or float64) is the compute dtype; X (dense), h0 and dHs of another float dtype are
cast to it, and every returned array is in it.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import numbers
from collections.abc import Mapping

import numpy as np

from . import _model, config
from .truncation import Randomized, Truncated

PARAM_KEYS = ("W_xh", "W_hh", "b_h", "W_hq", "b_q")
RNN_KEYS = ("W_xh", "W_hh", "b_h")
HEAD_KEYS = ("W_hq", "b_q")
#: gates per hidden unit: the width of a cell's pre-activations is G·H
CELLS = {"rnn": 1, "gru": 3, "lstm": 4}
INITS = ("normal", "uniform")            # init_params' init
_FLOATS = (np.float32, np.float64)
CUDA_MISSING = "device='cuda' needs numba-cuda and a CUDA GPU: pip install fastbptt[cuda]"


# ----------------------------------------------------------------------------- public
def init_params(input_size, hidden_size, output_size, dtype=np.float32, seed=None, *,
                cell="rnn", num_layers=1, init=None):
    """Parameters of a recurrent network of ``num_layers`` layers of ``cell`` with a linear head,
    drawn as *Dive into Deep Learning* draws them.

    ``init``:

    - ``"normal"``: weights ~ N(0, 0.01²) and zero biases, the book's from-scratch
      ``get_params`` (§8.5, §9.1–9.3): with std 0.01 the recurrence starts close to linear and
      far from saturation, which is what the book's learning rate (1) and clipping (θ=1) are
      tuned for.
    - ``"uniform"``: every weight and bias ~ U(−1/√H, 1/√H), as PyTorch's ``nn.RNN``, ``nn.GRU``,
      ``nn.LSTM`` and ``nn.Linear(H, Q)`` draw theirs (the book's concise models, §8.6, §9.1–9.2,
      and ``fastbptt.torch``'s): ``b_h`` is torch's ``bias_ih + bias_hh``, so drawn as that sum
      (the GRU's n block from ``bias_ih`` alone, and ``b_hn`` from ``bias_hh``).
    - None (the default): ``"normal"`` for ``"rnn"`` (drawn exactly as it always has been),
      ``"uniform"`` for ``"gru"`` and ``"lstm"``: from it the book's chapter-9 recipe reaches
      the book's concise perplexity by epoch 500 for every seed tried, where from ``"normal"``
      it is still descending there and where it ends depends on the seed (docs/performance.md,
      "Gated cells: the book's chapter 9").

    ``seed`` is anything :func:`numpy.random.default_rng` takes.

    Returns, for layer l (keys suffixed ``_l{l}`` for l >= 1; D_0 = input_size, D_l = H),
    with G = 1 ("rnn"), 3 ("gru": column blocks [r | z | n]) or 4 ("lstm": [i | f | g | o]):
    ``"W_xh"`` (D_l,G·H), ``"W_hh"`` (H,G·H), ``"b_h"`` (G·H,), for the GRU ``"b_hn"`` (H,)
    (the n gate's recurrent bias, inside the reset), and the head ``"W_hq"`` (H,Q), ``"b_q"`` (Q,).
    """
    D = _size("input_size", input_size)
    H = _size("hidden_size", hidden_size)
    Q = _size("output_size", output_size)
    dt = _dtype("dtype", dtype)
    G = _cell_gates(cell)
    L = _size("num_layers", num_layers)
    init = _init_kind(init, cell)
    rng = random_generator("seed", seed)
    if init == "normal":
        def weight(shape):
            return 0.01 * rng.standard_normal(shape)

        def bias(n):
            return np.zeros(n)
    else:
        def weight(shape):
            return rng.uniform(-1 / np.sqrt(H), 1 / np.sqrt(H), shape)
        bias = weight
    try:
        params = _drawn(weight, bias, cell, D, H, Q, G, L, dt)
    except (MemoryError, ValueError) as e:        # numpy's "array is too big" is a ValueError
        n = (D + H + (L - 1) * 2 * H + L) * G * H + L * H * (cell == "gru") + (H + 1) * Q
        raise ValueError(f"hidden_size: {H} (input_size {D}, output_size {Q}, num_layers {L}): "
                         f"{n:,} parameters cannot be allocated here ({type(e).__name__}: {e})") from None
    return {k: params[k] for k in sorted(params, key=_key_order)}


def random_generator(name, seed):
    """numpy.random.default_rng(seed), its error naming the argument ``name``"""
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e} (got {seed!r})") from None


def _drawn(weight, bias, cell, D, H, Q, G, L, dt):
    """init_params' arrays, unordered"""
    params = {}
    for l in range(L):
        params[_model.key("W_xh", l)] = weight((D if l == 0 else H, G * H)).astype(dt)
        params[_model.key("W_hh", l)] = weight((H, G * H)).astype(dt)
        b_h = bias(G * H)                                  # torch's bias_ih, then bias_hh's share
        if cell == "gru":                                  # the n gate's b_hh is b_hn, inside the reset
            b_h[:2 * H] += bias(2 * H)
            params[_model.key("b_hn", l)] = bias(H).astype(dt)
        else:
            b_h += bias(G * H)
        params[_model.key("b_h", l)] = b_h.astype(dt)
    params["W_hq"] = weight((H, Q)).astype(dt)
    params["b_q"] = bias(Q).astype(dt)
    return params


def cell_of(params):
    """``(cell, num_layers)`` of a params dict: the cell from W_hh's width (H, G·H), the depth
    from the layer keys present.  Raises ValueError naming the parameter when they are
    inconsistent."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict, got {type(params).__name__}")
    if "W_hh" not in params:
        raise KeyError("params: missing key 'W_hh'")
    shape = np.shape(params["W_hh"])
    cells = {G: name for name, G in CELLS.items()}
    if len(shape) != 2 or shape[0] < 1 or shape[1] % shape[0] or shape[1] // shape[0] not in cells:
        raise ValueError(f"params['W_hh']: expected shape (H,H) (rnn), (H,3H) (gru) or (H,4H) "
                         f"(lstm), got {shape}")
    L = 1
    while _model.key("W_hh", L) in params or _model.key("W_xh", L) in params:
        L += 1
    return cells[shape[1] // shape[0]], L


def loss_and_grad(params, X, Y, h0=None, *, activation="tanh", truncation=None,
                  reduction="mean", device="cpu", cell=None, stored_states=None):
    """Loss, exact (or truncated) BPTT gradients and the last state.

    One "rnn" layer:  z_t = x_t W_xh + h_{t-1} W_hh + b_h,  h_t = φ(z_t);  the "gru" and
    "lstm" cells and stacks as :func:`init_params` lays them out;  on the top layer
    o_t = h_t W_hq + b_q,  L = 1/(T·B) Σ_t Σ_b CE(softmax(o_t[b]), y_t[b])
    (``reduction="sum"``: no 1/(T·B)).

    Parameters
    ----------
    params : dict as from :func:`init_params` (any cell and depth), all float32 or float64
        (mixed: promoted to the widest).
    X : integer (T,B) token ids in [0, D) (one-hot input, never materialized) or
        floating (T,B,D) dense input.
    Y : integer (T,B) targets in [0, Q).
    h0 : the initial state, None for zeros: (B,H) for one layer or (num_layers,B,H); for the
        LSTM a tuple (h0, c0) of those.
    activation : "tanh" (default), "relu" or "identity" (the "rnn" cell's φ).
    truncation : None or "full" (exact), :class:`Truncated` ``(k)`` or :class:`Randomized` ``(p, seed)``.
    reduction : "mean" (default) or "sum".
    device : "cpu" (default) or "cuda".
    cell : None (inferred from the params, see :func:`cell_of`) or "rnn" | "gru" | "lstm",
        checked against the params.
    stored_states : how many states (h, and c for the LSTM, of every layer at one step) the
        forward keeps for the backward; the others are recomputed from the nearest kept one,
        and the gradients are the same.  None: all T (the fastest); "sqrt": about √T, each
        step but the last range's computed twice; an int n >= 1: Griewank and Walther's
        binomial schedule for n (:mod:`fastbptt.schedule`), the fewest recomputations that n
        allow (n >= T: as None).
        With ``Truncated(k)``, k < T, the loss terms go in windows of about √T ("sqrt") or
        ⌈T/n⌉ steps (at least k), each recomputed from a kept state at least k steps before
        it.  See docs/memory.md.

    Returns
    -------
    loss : float
    grads : dict of every parameter key, and "h0" (∂L/∂h0; "c0" too for the LSTM), in the
        params' dtype and the state's shapes.
    h_T : the last state, in the form h0 was given (None: (B,H) for one layer, else
        (num_layers,B,H); a tuple (h_T, c_T) for the LSTM).
    """
    be = _backend(device)
    m = _model_inputs(be, params, X, h0, cell, head=True)
    Yc = _targets(be, Y, m.X, m.P)
    k, xi = _truncation(truncation, m.X.shape[0], m.dtype)
    act = _activation(activation, m.cell)
    stored = _stored_states(stored_states, m.X.shape[0])
    run = _model.loss_and_grad if stored is None else functools.partial(_model.bounded_loss_and_grad,
                                                                        stored=stored)
    loss, grads, d0, last = run(be, m.module, m.P, m.X, Yc, m.state0, act, k, xi, _scale(reduction, m.X), m.L)
    grads.update(zip(("h0", "c0"), m.shaped(d0)))
    return float(loss), grads, m.state(last)


def loss(params, X, Y, h0=None, *, activation="tanh", reduction="mean", device="cpu", cell=None):
    """Forward only: ``(loss, h_T)`` with the same arguments and meaning as :func:`loss_and_grad`.

    For evaluation (validation perplexity = exp(mean loss)) without the backward cost.
    """
    be = _backend(device)
    m = _model_inputs(be, params, X, h0, cell, head=True)
    Yc = _targets(be, Y, m.X, m.P)
    scale = _scale(reduction, m.X)
    total, last = _model.loss(be, m.module, m.P, m.X, Yc, m.state0, _activation(activation, m.cell), m.L)
    return float(total * scale), m.state(last)


def rnn_forward(params, X, h0=None, *, activation="tanh", device="cpu", cell=None,
                return_state=False, keep=False, check_finite=True, input_masks=None):
    """The top layer's hidden states h_1..h_T, shape (T,B,H): one "rnn" layer
    h_t = φ(x_t W_xh + h_{t-1} W_hh + b_h), or any cell and depth.

    ``params`` needs the layers' keys ("W_hq", "b_q" may be present and are ignored).
    X, h0, activation and cell as in :func:`loss_and_grad`.  With ``return_state``,
    ``(Hs, h_T)``, h_T in the form of :func:`loss_and_grad`'s (for generation, say).  With
    ``keep``, ``(Hs, h_T, forward)``: ``forward`` holds what the backward needs (the gates of
    every layer), for :func:`rnn_backward`'s ``forward=`` (a framework's autograd function).
    ``check_finite=False``: a NaN or inf in params, X or h0 is not an error but flows through,
    as in a framework's own layers (the bridges' choice).  ``input_masks``: None, or for a
    stack a list of num_layers - 1 arrays (T,B,H), the masks of layers 1.. L-1's inputs
    (inter-layer dropout, drawn by the caller: 0 or 1/(1-p)): layer l reads
    input_masks[l-1] ⊙ h^{(l-1)}_t, and the backward carries the same masks down (truncation's
    chains too).
    """
    be = _backend(device)
    with _finite_checked(check_finite):
        m = _model_inputs(be, params, X, h0, cell, head=False, input_masks=input_masks)
    S, last, lays = _model.rnn_forward(be, m.module, m.P, m.X, m.state0, _activation(activation, m.cell),
                                       m.L, keep=keep, masks=m.masks)
    if keep:
        return S[1:], m.state(last), _Kept(be, m, lays)
    return (S[1:], m.state(last)) if return_state else S[1:]


class _Kept:
    """what rnn_forward(keep=True) keeps for rnn_backward: the layers' records and the call's
    shape, to check that the backward is given the same model and inputs (and those inputs
    as validated, for :func:`kept_backward`)"""

    def __init__(self, be, m, lays):
        # an input the validation made contiguous in a buffer the next call reuses is copied:
        # the backward reads (and compares) the values this forward ran on
        m.P = {k: be.owned(a) for k, a in m.P.items()}
        m.state0 = [tuple(be.owned(a) for a in layer) for layer in m.state0]
        self.be, self.m, self.lays, self.stamp = be, m, lays, _stamp(m)


def kept_cell_states(forward):
    """c_1..c_T (T,B,H) of the top layer of an LSTM, from what ``rnn_forward(..., keep=True)``
    kept: a new array, where rnn_forward's Hs is.  With :func:`kept_backward`'s ``dCs`` (their
    gradients) the cell states are outputs a framework can differentiate: the PyTorch
    bridge reads each sequence's c_n at its own last step of a PackedSequence this way."""
    if not isinstance(forward, _Kept):
        raise ValueError("forward: expected what rnn_forward(..., keep=True) returned")
    if forward.m.cell != "lstm":
        raise ValueError(f"forward: cell states are the LSTM's; this forward's cell is {forward.m.cell!r}")
    return forward.be.copied(forward.lays[-1].C[1:], forward.m.P)


def _stamp(m):
    return (m.cell, m.L, m.X.shape, m.H, m.dtype)


def _first_different(be, kept, m):
    """the name of the first of m's validated params, X and state whose values are not those
    ``kept`` was computed from, or None (one array given to both calls is not compared;
    device arrays are compared on the device)"""
    names = ("h0", "c0")
    pairs = [(f"params[{k!r}]", kept.P[k], m.P[k]) for k in m.P if k in kept.P] + [("X", kept.X, m.X)]
    pairs += [(names[i], a, b) for was, now in zip(kept.state0, m.state0)
              for i, (a, b) in enumerate(zip(was, now))]
    if m.masks is not None:                    # (None: the kept forward's own)
        if kept.masks is None:
            return "input_masks"
        pairs += [(f"input_masks[{i}]", a, b) for i, (a, b) in enumerate(zip(kept.masks, m.masks))]
    for name, a, b in pairs:
        if a is not b and not be.equal(a, b):
            return name
    return None


def rnn_backward(params, X, Hs, dHs, h0=None, *, activation="tanh", truncation=None,
                 device="cpu", cell=None, input_grad=False, forward=None, stored_states=None, dh_T=None,
                 dCs=None, state_grads=True, check_finite=True, input_masks=None):
    """BPTT through the recurrent layers alone, for any head on top.

    Hs (T,B,H): the output of :func:`rnn_forward` for the same params, X, h0; dHs (T,B,H):
    ∂L/∂h_t of the top layer from the head (the direct term of each step's loss, which is
    what :class:`Truncated` counts steps from).  ``forward``: what ``rnn_forward(...,
    keep=True)`` kept for the same params, X and h0 (a forward of other values is refused; a
    change made in place to an array that both calls read as it is cannot be seen); without
    it one "rnn" layer uses Hs as it is, and other cells and stacks recompute their gates
    from X and h0.  ``stored_states`` as in :func:`loss_and_grad`: the forward is recomputed
    within that memory.  With ``forward`` or ``stored_states`` Hs is not read (its dtype and
    shape are checked).
    ``dh_T``: ∂L/∂ of the last state, in h_T's form ((B,H) or (num_layers,B,H); (dh_T, dc_T)
    for the LSTM), None for zeros: what flows in through the last states (an encoder's h_n
    of every layer; with ``Truncated``, it joins step T's term).  ``dCs`` (T,B,H), the LSTM's:
    ∂L/∂c_t of the top layer's cell state at every step, beside dHs (each step's term of
    c_t joins that step's loss term), None for zeros; not with ``stored_states``.
    ``check_finite`` and ``input_masks`` as in :func:`rnn_forward`, for every array given here
    (the forward's masks; with ``forward=``, those it kept); not with ``stored_states``.

    Returns the layers' parameter gradients and "h0" ("c0" too for the LSTM), in the params'
    dtype; with ``input_grad`` and dense X, also "X": ∂L/∂X (T,B,D).  ``state_grads=False``:
    no "h0" nor "c0", and the product that only they need is skipped.
    """
    be = _backend(device)
    with _finite_checked(check_finite):
        m = _model_inputs(be, params, X, h0, cell, head=False, input_masks=input_masks)
        stored = _stored_states(stored_states, m.X.shape[0])
        if m.masks is not None and stored is not None:
            raise ValueError("input_masks: not with stored_states (give them to a backward that keeps "
                             "every state)")
        lays = None
        if forward is not None and stored is not None:
            raise ValueError("stored_states: recomputes the forward within bounded memory; it takes no "
                             "forward= (what rnn_forward kept), give one of them")
        if forward is not None:
            if not isinstance(forward, _Kept) or forward.stamp != _stamp(m):
                raise ValueError("forward: expected what rnn_forward(..., keep=True) returned for the same "
                                 "cell, depth, shapes and dtype")
            if forward.be is not be:
                raise ValueError(f"forward: kept by rnn_forward(...) on the other device; this call's "
                                 f"device is {device!r}")
            other = _first_different(be, forward.m, m)
            if other:
                raise ValueError(f"forward: kept by rnn_forward(..., keep=True) for other values of {other} "
                                 f"than this call's")
            lays = forward.lays
        Hx, dZ = _states_and_adjoints(be, Hs, dHs, m, stack=stored is None and lays is None)   # kept: in lays
        return _backward(be, m, Hx, dZ, lays, stored, activation, truncation, input_grad, dh_T, dCs, state_grads)


def kept_backward(forward, dHs, *, activation="tanh", truncation=None, input_grad=False, dh_T=None, dCs=None,
                  state_grads=True, check_finite=True):
    """:func:`rnn_backward` (arguments and results as there) from ``forward``, what
    ``rnn_forward(..., keep=True)`` kept, for a caller that owns that forward's params, X,
    h0 and input_masks and has not changed them since (they are kept as given, not copied,
    but for those the validation made contiguous in buffers a later call reuses, _Kept):
    a framework's autograd function (the PyTorch bridge: the params are its own copies, X and
    h0 tensors torch saved and guards against in-place changes, the masks its own draws).
    Those inputs are taken as the forward validated them, not checked again."""
    if not isinstance(forward, _Kept):
        raise ValueError("forward: expected what rnn_forward(..., keep=True) returned")
    be, m = forward.be, forward.m
    with _finite_checked(check_finite):
        _, dZ = _states_and_adjoints(be, None, dHs, m, stack=False, check_hs=False)
        return _backward(be, m, None, dZ, forward.lays, None, activation, truncation, input_grad, dh_T, dCs,
                         state_grads)


def _backward(be, m, Hx, dZ, lays, stored, activation, truncation, input_grad, dh_T, dCs, state_grads=True):
    """rnn_backward's gradients from its validated inputs (dCs not yet validated)"""
    k, xi = _truncation(truncation, m.X.shape[0], m.dtype)
    want_dx = bool(input_grad) and m.X.ndim == 3
    act = _activation(activation, m.cell)
    end = None if dh_T is None else _states(be, dh_T, m.cell, m.L, m.B, m.H, m.dtype, ("dh_T", "dc_T"))[0]
    if dCs is not None:
        if m.cell != "lstm":
            raise ValueError(f"dCs: the cell state's terms are the LSTM's; this model's cell is {m.cell!r}")
        if stored is not None:
            raise ValueError("dCs: not with stored_states (give the cell states' terms to a backward that "
                             "keeps every state)")
        dCs = _floats(be, "dCs", dCs, tuple(m.X.shape[:2]) + (m.H,), m.dtype)
    if stored is None:
        grads, d0 = _model.rnn_backward(be, m.module, m.P, m.X, Hx, dZ, m.state0, act, k, xi, m.L, want_dx,
                                        lays, end, dCs, want_d0=bool(state_grads), masks=m.masks)
    else:
        grads, d0 = _model.bounded_rnn_backward(be, m.module, m.P, m.X, dZ, m.state0, act, k, xi, m.L,
                                                want_dx, stored, end)
    if state_grads:
        grads.update(zip(("h0", "c0"), m.shaped(d0)))
    return grads


def rnn_adjoints(params, X, Hs, dHs, h0=None, *, activation="tanh", device="cpu", cell=None):
    """The adjoints of the full gradient of one layer, (T+1,B,H): A[t] = ∂L/∂h_t for t = 0..T.

    For one "rnn" layer a_t = dHs_t + dz_{t+1} W_hhᵀ (a_T = dHs_T, a_0 = ∂L/∂h_0); the gated
    cells add their own paths (the GRU's z ⊙ h_{t-1}; the LSTM's c is not h).  dHs holds each
    step's direct term as in :func:`rnn_backward`.  With dHs nonzero only at step t,
    A[t-j] = ∂l_t/∂h_{t-j}: how the gradient of one loss term flows back j steps.
    """
    be = _backend(device)
    m = _model_inputs(be, params, X, h0, cell, head=False)
    if m.L != 1:
        raise ValueError(f"params: rnn_adjoints takes one layer, got {m.L}")
    Hx, dZ = _states_and_adjoints(be, Hs, dHs, m)
    return _model.rnn_adjoints(be, m.module, m.P, m.X, Hx, dZ, m.state0, _activation(activation, m.cell))


def to_device(params):
    """The params copied to the GPU once, as numba device arrays, for ``device="cuda"`` calls
    in a loop: with params on the device, inputs may be numpy or CUDA arrays (numba, CuPy,
    torch: zero-copy) and every result stays on the device.  Validated like any call."""
    be = _backend("cuda")
    P, _, _, _ = _params(be, params, None, head=isinstance(params, Mapping) and "W_hq" in params)
    return be.to_device(P)


# ------------------------------------------------------------------------- dispatch
def _backend(device):
    """The module that runs the kernels for ``device``; CUDA is imported only when asked for."""
    if not isinstance(device, str):
        raise TypeError(f"device: expected 'cpu' or 'cuda', got {type(device).__name__}")
    if device == "cpu":
        from . import _cpu
        _cpu.team.check_usable()
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
class _Inputs:
    """A call's validated model inputs: P, X, the cell (name, backend module, depth), state0
    (one tuple per layer) and the form the caller gave the state in, to answer in."""

    def __init__(self, be, params, X, h0, cell, head, input_masks=None):
        self.P, self.dtype, self.cell, self.L = _params(be, params, cell, head)
        self.module = be.CELLS[self.cell]
        self.X = _inputs(be, "X", X, self.P["W_xh"].shape[0], self.dtype)
        self.B, self.H = self.X.shape[1], self.P["W_hh"].shape[0]
        self.state0, self.stacked = _states(be, h0, self.cell, self.L, self.B, self.H, self.dtype)
        self.masks = _input_masks(be, input_masks, self)

    def shaped(self, arrays):
        """(L,B,H) arrays in the caller's form: (B,H) when h0 was (B,H) or None for one layer"""
        return tuple(a if self.stacked else a[0] for a in arrays)

    def state(self, arrays):
        """the last state as the caller gave h0: an array, or (h, c) for the LSTM"""
        arrays = self.shaped(arrays)
        return arrays if self.cell == "lstm" else arrays[0]


def _model_inputs(be, params, X, h0, cell, head, input_masks=None):
    return _Inputs(be, params, X, h0, cell, head, input_masks)


def _input_masks(be, masks, m):
    """None, or the L-1 masks (T,B,H) of layers 1..L-1's inputs, validated"""
    if masks is None:
        return None
    if not isinstance(masks, (list, tuple)) or len(masks) != m.L - 1:
        got = f"{len(masks)} arrays" if isinstance(masks, (list, tuple)) else type(masks).__name__
        raise (ValueError if isinstance(masks, (list, tuple)) else TypeError)(
            f"input_masks: expected None or a list of num_layers - 1 = {m.L - 1} arrays (T,B,H), got {got}")
    shape = tuple(m.X.shape[:2]) + (m.H,)
    return [_floats(be, f"input_masks[{i}]", a, shape, m.dtype) for i, a in enumerate(masks)] or None


def _targets(be, Y, Xc, P):
    return _token_ids(be, "Y", Y, Xc.shape[:2], P["W_hq"].shape[1],
                      "targets; Y holds class ids of the W_hq columns")


def _scale(reduction, Xc):
    if not isinstance(reduction, str) or reduction not in config.REDUCTIONS:
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    return 1.0 / (Xc.shape[0] * Xc.shape[1]) if reduction == "mean" else 1.0


def _states_and_adjoints(be, Hs, dHs, m, stack=True, check_hs=True):
    """Hx = h_0..h_T (T+1,B,H) of the top layer as the forward keeps them, and a writeable
    copy of dHs.  Without ``stack`` (the states come from the forward's record, or are
    recomputed) Hs is not read: None, its dtype and shape checked (unless not ``check_hs``),
    not its values."""
    shape = tuple(m.X.shape[:2]) + (m.H,)
    Hx = None
    if stack:
        Hx = be.stack_states(m.state0[-1][0], _floats(be, "Hs", Hs, shape, m.dtype))
    elif check_hs:
        _float_shape(be, "Hs", Hs, shape)
    dZ = be.work_copy("dHs", _floats(be, "dHs", dHs, shape, m.dtype))     # the kernels overwrite it
    return Hx, dZ


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


#: whether _finite looks (False within a call given check_finite=False)
_CHECK_FINITE = contextvars.ContextVar("fastbptt_check_finite", default=True)


@contextlib.contextmanager
def _finite_checked(check):
    token = _CHECK_FINITE.set(bool(check))
    try:
        yield
    finally:
        _CHECK_FINITE.reset(token)


def _finite(be, name, a):
    """``a`` (normalized) if every value is finite (or no check is asked for), else a
    ValueError saying where."""
    if not _CHECK_FINITE.get():
        return a
    bad = be.first_nonfinite(a)
    if bad is not None:
        raise ValueError(f"{name}: non-finite value {bad}")
    return a


def _key_order(key):
    """layer by layer, each in the schema's order, the head last"""
    name, _, l = key.partition("_l")
    order = ("W_xh", "W_hh", "b_h", "b_hn", "W_hq", "b_q")
    return (int(l) if l.isdigit() else (1 << 30 if name in HEAD_KEYS else 0),
            order.index(name) if name in order else len(order))


def _cell_gates(cell):
    if not isinstance(cell, str) or cell not in CELLS:
        raise ValueError(f"cell: expected one of {', '.join(map(repr, CELLS))}, got {cell!r}")
    return CELLS[cell]


def _init_kind(init, cell):
    """init_params' ``init``, None resolved for the cell"""
    if init is None:
        return "normal" if cell == "rnn" else "uniform"
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"init: expected one of {', '.join(map(repr, INITS))} or None, got {init!r}")
    return init


def _schema(cell, L, D, H, Q):
    """{key: shape} of every parameter of L layers of ``cell`` (and the head when Q)"""
    G = CELLS[cell]
    shapes = {}
    for l in range(L):
        shapes[_model.key("W_xh", l)] = (D if l == 0 else H, G * H)
        shapes[_model.key("W_hh", l)] = (H, G * H)
        shapes[_model.key("b_h", l)] = (G * H,)
        if cell == "gru":
            shapes[_model.key("b_hn", l)] = (H,)
    if Q is not None:
        shapes.update(W_hq=(H, Q), b_q=(Q,))
    return shapes


def _params(be, params, cell, head):
    """(P normalized, dtype, cell, num_layers) of a params dict, checked against the schema of
    the cell it holds (or the one named) and its depth; the head's keys only when ``head``
    (else they may be present and are ignored)."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict with keys {', '.join(PARAM_KEYS)}, got {type(params).__name__}")
    for key in RNN_KEYS + (HEAD_KEYS if head else ()):
        if key not in params:
            raise KeyError(f"params: missing key {key!r} (expected {', '.join(PARAM_KEYS if head else RNN_KEYS)}, "
                           f"and the other layers' and cells' keys)")
    W_hh = be.as_array("params['W_hh']", params["W_hh"])
    W_xh = be.as_array("params['W_xh']", params["W_xh"])
    for key, a in (("W_xh", W_xh), ("W_hh", W_hh)):
        if a.ndim != 2:
            raise ValueError(f"params[{key!r}]: expected 2 dimensions, got shape {a.shape}")
        if 0 in a.shape:
            raise ValueError(f"params[{key!r}]: empty shape {a.shape}; sizes must be >= 1")
    found, L = cell_of({"W_hh": W_hh, **{k: None for k in params if k != "W_hh"}})
    if cell is not None:
        G = _cell_gates(cell)
        if cell != found:
            H = W_hh.shape[0]
            raise ValueError(f"params['W_hh']: shape {W_hh.shape} is a {found}'s; cell={cell!r} expects "
                             f"({H}, {G * H})")
    H = W_hh.shape[0]
    Q = None
    if head:
        W_hq = be.as_array("params['W_hq']", params["W_hq"])
        Q = W_hq.shape[1] if W_hq.ndim == 2 and W_hq.shape[1] >= 1 else 0
    shapes = _schema(found, L, W_xh.shape[0], H, Q)
    allowed = set(shapes) | set(HEAD_KEYS)
    extra = sorted(str(k) for k in params if k not in allowed)
    if extra:
        raise ValueError(f"params: unexpected key(s) {', '.join(map(repr, extra))} for {L} layer(s) of "
                         f"{found!r} (expected {', '.join(shapes)})")
    missing = [k for k in shapes if k not in params]
    if missing:
        raise KeyError(f"params: missing key {missing[0]!r} for {L} layer(s) of {found!r} "
                       f"(expected {', '.join(shapes)})")
    arrays = {key: be.as_array(f"params[{key!r}]", params[key]) for key in shapes}
    for key, a in arrays.items():
        if a.dtype.type not in _FLOATS:
            raise TypeError(f"params[{key!r}]: expected float32 or float64, got {a.dtype}")
    dt = np.result_type(*(a.dtype for a in arrays.values()))
    for key, shape in shapes.items():
        a = arrays[key]
        if a.ndim != len(shape):
            raise ValueError(f"params[{key!r}]: expected {len(shape)} dimensions, got shape {a.shape}")
        if 0 in a.shape:
            raise ValueError(f"params[{key!r}]: empty shape {a.shape}; sizes must be >= 1")
        if a.shape != shape:
            raise ValueError(f"params[{key!r}]: expected shape {shape} for {found!r} with H={H}"
                             f"{f', Q={Q}' if Q else ''} (from W_hh {W_hh.shape}, W_xh {W_xh.shape}"
                             f"{', W_hq' if key == 'b_q' else ''}), got {a.shape}")
    P = {key: _finite(be, f"params[{key!r}]", be.normalized(f"params[{key!r}]", a, dt, weight=True))
         for key, a in arrays.items()}
    return P, dt, found, L


def _inputs(be, name, X, D, dt):
    X = be.as_array(name, X)
    if X.dtype.kind in "iu":
        if X.ndim != 2:
            raise ValueError(f"{name}: integer token ids must have shape (T,B), got {X.shape}")
        _nonempty(name, X.shape, "(T,B)")
        return _token_ids(be, name, X, X.shape, D, "X holds ids of the W_xh rows")
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
    unsigned = ids.dtype.kind == "u"
    ids = be.normalized(name, ids, np.int64)
    lo, hi = be.id_range(ids)
    if lo < 0 or hi >= n:
        bad = "2**63 or more" if unsigned and lo < 0 else lo if lo < 0 else hi   # a uint64 past int64's range
        raise ValueError(f"{name}: token id {bad} out of range [0, {n}); {what}")
    return ids


def _state_parts(h0, cell, names=("h0", "c0")):
    """(the names, the arrays) a state is made of: (h0,), or the LSTM's (h0, c0) pair; None
    for each when h0 is None.  Shared with the JAX bridge, which checks them at trace time."""
    names = names if cell == "lstm" else names[:1]
    if h0 is None:
        return names, [None] * len(names)
    if cell == "lstm":
        if not isinstance(h0, (tuple, list)) or len(h0) != 2:
            raise TypeError(f"{names[0]}: an LSTM's state is a tuple ({names[0]}, {names[1]}) of (B,H) or "
                            f"(num_layers,B,H) arrays, got {type(h0).__name__}")
        return names, list(h0)
    return names, [h0]


def _states(be, h0, cell, L, B, H, dt, names=("h0", "c0")):
    """(one tuple (h_0,) or (h_0, c_0) per layer, whether the caller's state is stacked
    (num_layers,B,H)).  None: zeros; a (B,H) array only for one layer.  ``names``: the
    arguments' names in errors."""
    names, given = _state_parts(h0, cell, names)
    stacked = L > 1
    arrays = []
    for name, a in zip(names, given):
        if a is None:
            arrays.append(np.zeros((L, B, H), dt))
            continue
        ndim = len(getattr(a, "shape", np.shape(a)))
        if ndim == 2 and L == 1:
            stacked = False
            arrays.append(_floats(be, name, a, (B, H), dt).reshape((1, B, H)))    # a CUDA array has no [None]
        else:
            stacked = True
            arrays.append(_floats(be, name, a, (L, B, H), dt))
    return [tuple(a[l] for a in arrays) for l in range(L)], stacked


def _float_shape(be, name, a, shape):
    """``a`` as an array, checked to be floating of ``shape``"""
    a = be.as_array(name, a)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a float array, got dtype {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(a.shape)}")
    return a


def _floats(be, name, a, shape, dt):
    return _finite(be, name, be.normalized(name, _float_shape(be, name, a, shape), dt))


def _stored_states(stored_states, T):
    """None, "sqrt" or a positive int n; n >= T keeps every state, as None does"""
    if stored_states is None or (isinstance(stored_states, str) and stored_states == "sqrt"):
        return stored_states
    if isinstance(stored_states, numbers.Integral) and not isinstance(stored_states, bool):
        if stored_states < 1:
            raise ValueError(f"stored_states: expected None, 'sqrt' or an int >= 1, got {stored_states}")
        return int(stored_states) if stored_states < T else None
    raise (ValueError if isinstance(stored_states, str) else TypeError)(
        f"stored_states: expected None, 'sqrt' or an int >= 1, got {stored_states!r}")


def _activation(activation, cell="rnn"):
    try:
        code = config.ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(f"activation: expected one of {', '.join(map(repr, config.ACTIVATIONS))}, "
                         f"got {activation!r}") from None
    if cell != "rnn" and activation != "tanh":
        raise ValueError(f"activation: {activation!r} applies to the 'rnn' cell only; the {cell!r} "
                         f"cell's nonlinearities are fixed (sigmoid gates, tanh)")
    return code


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
