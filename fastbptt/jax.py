"""fastbptt's recurrent layers as a JAX function: ``jax.grad`` and ``jax.jit`` run the numba
kernels on the CPU through :func:`jax.pure_callback`, with a :func:`jax.custom_vjp`.

    import fastbptt.jax as fj
    outputs, h_T = fj.rnn(params, X, h0)                  # LSTM: outputs, (h_T, c_T)

The forward is :func:`fastbptt.rnn_forward`, the backward one :func:`fastbptt.rnn_backward`
call: the outputs' cotangents are its direct terms, and those of every layer's h_T (and the
LSTM's c_T) its ``dh_T``; with :class:`~fastbptt.Truncated` they join the last step's term.

Importing this module needs jax (``pip install fastbptt[jax]``); ``import fastbptt`` never
imports it.
"""
from __future__ import annotations

import concurrent.futures
import functools
import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

try:
    import jax
    import jax.numpy as jnp
    from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
except ImportError as e:           # pragma: no cover - exercised by a test with jax hidden
    raise ImportError(f"fastbptt.jax needs jax: pip install fastbptt[jax] ({e})") from e

from . import api
from .truncation import Randomized, Truncated

__all__ = ["rnn"]


def rnn(params, X, h0=None, *, cell=None, activation="tanh", truncation=None):
    """The recurrent layers of ``params`` over X, differentiable by JAX.

    Parameters
    ----------
    params : dict of jax (or numpy) arrays in fastbptt's schema, any cell and depth
        ("W_xh", "W_hh", "b_h", "b_hn" for the GRU, "_l{l}" suffixes for layers l >= 1);
        "W_hq", "b_q" may be present and are ignored.  float32 or float64 (mixed: the widest
        is the compute dtype; gradients come back in each array's own dtype).
    X : floating (T,B,D) dense input, or integer (T,B) token ids (no gradient wrt ids).
    h0 : None (zeros), (num_layers,B,H) (for one layer (B,H) too); the LSTM's a tuple (h0, c0).
    cell : None (read from the params) or "rnn" | "gru" | "lstm", checked against them.
    activation : the "rnn" cell's φ: "tanh", "relu" or "identity".
    truncation : None / "full", :class:`~fastbptt.Truncated` ``(k)`` or
        :class:`~fastbptt.Randomized` ``(p, seed)``: the gradient the backward computes.

    Returns
    -------
    outputs : (T,B,H), the top layer's h_1..h_T.
    state : the last state, (num_layers,B,H) ((B,H) if h0 was given as (B,H)); for the LSTM
        a tuple (h_T, c_T).
    """
    keys, found, L, dt, D, H = _check_params(params, cell)
    act = activation
    api._activation(act, found)                      # its ValueError, at trace time
    _check_truncation(truncation)
    X = jnp.asarray(X)
    tokens = jnp.issubdtype(X.dtype, jnp.integer)
    if tokens:
        if X.ndim != 2:
            raise ValueError(f"X: integer token ids must have shape (T,B), got {X.shape}")
        if not isinstance(X, jax.core.Tracer) and X.size:          # known now: checked before any work
            lo, hi = int(X.min()), int(X.max())
            if lo < 0 or hi >= D:
                raise ValueError(f"X: token id {lo if lo < 0 else hi} out of range [0, {D}); "
                                 f"X holds ids of the W_xh rows")
    elif jnp.issubdtype(X.dtype, jnp.floating):
        if X.ndim != 3:
            raise ValueError(f"X: dense input must have shape (T,B,D), got {X.shape}")
        if X.shape[2] != D:
            raise ValueError(f"X: dense input has D={X.shape[2]} but W_xh has {D} rows")
        X = X.astype(dt)
    else:
        raise TypeError(f"X: expected integer token ids (T,B) or floating (T,B,D), got dtype {X.dtype}")
    T, B = X.shape[:2]
    if T < 1 or B < 1:
        raise ValueError(f"X: empty sequence or batch, shape {X.shape}; T and B must be >= 1")
    state0, flat = _check_state(h0, found, L, B, H, dt)
    P = tuple(jnp.asarray(params[k]).astype(dt) for k in keys)
    core = _core(keys, found, L, act, truncation, tokens, np.dtype(dt), (T, B, H))
    Hs, last = core(*_varying_alike((P, X, state0)))
    if flat:
        last = tuple(s[0] for s in last)
    return Hs, (last if found == "lstm" else last[0])


# ------------------------------------------------------------------------- trace time
def _check_params(params, cell):
    """(the layers' keys in the schema's order, cell, num_layers, compute dtype, D, H)"""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict, got {type(params).__name__}")
    found, L = api.cell_of(params)
    if cell is not None:
        api._cell_gates(cell)
        if cell != found:
            H = np.shape(params["W_hh"])[0]
            raise ValueError(f"params['W_hh']: shape {tuple(np.shape(params['W_hh']))} is a {found}'s; "
                             f"cell={cell!r} expects ({H}, {api.CELLS[cell] * H})")
    for key in api.RNN_KEYS:
        if key not in params:
            raise KeyError(f"params: missing key {key!r}")
    W_xh = params["W_xh"]
    if len(np.shape(W_xh)) != 2:
        raise ValueError(f"params['W_xh']: expected 2 dimensions, got shape {tuple(np.shape(W_xh))}")
    D, H = np.shape(W_xh)[0], np.shape(params["W_hh"])[0]
    if D < 1 or H < 1:
        raise ValueError(f"params['W_xh']: empty shape {tuple(np.shape(W_xh))}; sizes must be >= 1")
    shapes = api._schema(found, L, D, H, None)
    extra = sorted(str(k) for k in params if k not in shapes and k not in api.HEAD_KEYS)
    if extra:
        raise ValueError(f"params: unexpected key(s) {', '.join(map(repr, extra))} for {L} layer(s) of "
                         f"{found!r} (expected {', '.join(shapes)})")
    dtypes = []
    for key, shape in shapes.items():
        if key not in params:
            raise KeyError(f"params: missing key {key!r} for {L} layer(s) of {found!r} "
                           f"(expected {', '.join(shapes)})")
        a = params[key]
        if tuple(np.shape(a)) != shape:
            raise ValueError(f"params[{key!r}]: expected shape {shape} for {found!r} with H={H}, "
                             f"got {tuple(np.shape(a))}")
        dtype = np.dtype(a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype)
        if dtype.type not in (np.float32, np.float64):
            raise TypeError(f"params[{key!r}]: expected float32 or float64, got {dtype}")
        dtypes.append(jax.dtypes.canonicalize_dtype(dtype))     # float64 is float32 without jax_enable_x64
    return tuple(shapes), found, L, np.result_type(*dtypes), D, H


def _check_truncation(truncation):
    if truncation is None or isinstance(truncation, (Truncated, Randomized)) or (
            isinstance(truncation, str) and truncation == "full"):
        return
    what = repr(truncation) if isinstance(truncation, str) else type(truncation).__name__
    err = ValueError if isinstance(truncation, str) else TypeError
    raise err(f"truncation: expected None, 'full', Truncated(k) or Randomized(p), got {what}")


def _check_state(h0, cell, L, B, H, dt):
    """((h0,) or (h0, c0), each (L,B,H) of dt; whether the caller gave (B,H))"""
    names, given = api._state_parts(h0, cell)
    out, flat = [], []
    for name, a in zip(names, given):
        if a is None:                                      # zeros, as rnn_forward reads it
            out.append(None)
            continue
        try:
            a = jnp.asarray(a)
        except (TypeError, ValueError):
            raise TypeError(f"{name}: expected an array, got {type(a).__name__}") from None
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name}: expected a float array, got dtype {a.dtype}")
        if L == 1 and a.shape == (B, H):
            a, f = a[None], True
        elif a.shape == (L, B, H):
            f = False
        else:
            raise ValueError(f"{name}: expected shape {(L, B, H)}{f' or {(B, H)}' if L == 1 else ''}, "
                             f"got {tuple(a.shape)}")
        out.append(a.astype(dt))
        flat.append(f)
    if len(set(flat)) > 1:
        raise ValueError("h0: h0 and c0 must both be (B,H) or both (num_layers,B,H)")
    return tuple(jnp.zeros((L, B, H), dt) if a is None else a for a in out), bool(flat and flat[0])


@functools.lru_cache(maxsize=256)
def _core(keys, cell, L, act, truncation, tokens, dt, shape):
    """f(P, X, state0) -> (Hs, last state tuple), with its custom VJP, for one configuration:
    made once, with its callbacks (JAX compiles a callback it has not seen for every call, and
    keeps what it compiled)"""
    T, B, H = shape
    n_state = 2 if cell == "lstm" else 1
    out_shapes = ((jax.ShapeDtypeStruct((T, B, H), dt),) + (jax.ShapeDtypeStruct((L, B, H), dt),) * n_state
                  + (jax.ShapeDtypeStruct((), jnp.int32),))
    forward_np = {keep: functools.partial(_on_worker, _forward_np, keys, cell, act, dt, keep)
                  for keep in (False, True)}
    backward_np = {want_dx: functools.partial(_on_worker, _backward_np, keys, cell, L, act, truncation, dt, want_dx)
                   for want_dx in (False, True)}

    def forward(P, X, state0, keep):
        res = _varying_as(jax.pure_callback(forward_np[keep], out_shapes, P, X, state0, vmap_method="sequential"), X)
        return res[0], tuple(res[1:-1]), res[-1]

    @jax.custom_vjp
    def f(P, X, state0):
        return forward(P, X, state0, False)[:2]

    def fwd(P, X, state0):
        # symbolic zeros: ∂L/∂X only where X is differentiated (its residual marker () rather than
        # None), the last states' cotangents only where they are not zero
        want_dx = () if X.perturbed and not tokens else None
        P, X, state0 = jax.tree.map(lambda p: p.value, (P, X, state0),
                                    is_leaf=lambda p: isinstance(p, CustomVJPPrimal))
        Hs, last, handle = forward(P, X, state0, True)
        return (Hs, last), (P, X, state0, Hs, handle, want_dx)

    def bwd(res, cot):
        P, X, state0, Hs, handle, want_dx = res
        dHs, dlast = cot
        dHs = jnp.zeros(Hs.shape, dt) if isinstance(dHs, SymbolicZero) else dHs
        dlast = None if all(isinstance(d, SymbolicZero) for d in dlast) else \
            tuple(jnp.zeros(s.shape, dt) if isinstance(d, SymbolicZero) else d for d, s in zip(dlast, state0))
        grad_shapes = (tuple(jax.ShapeDtypeStruct(p.shape, dt) for p in P),
                       None if want_dx is None else jax.ShapeDtypeStruct(X.shape, dt),
                       tuple(jax.ShapeDtypeStruct(s.shape, dt) for s in state0))
        return _varying_as(jax.pure_callback(backward_np[want_dx is not None], grad_shapes, P, X, state0, Hs,
                                             handle, dHs, dlast, vmap_method="sequential"), X)

    f.defvjp(fwd, bwd, symbolic_zeros=True)
    return f


# ------------------------------------------------------------------ inside jax.shard_map
_typeof = getattr(jax, "typeof", None) or jax.core.get_aval


def _varying(a):
    """the mesh axes along which ``a`` differs inside ``jax.shard_map`` (none outside it)"""
    t = _typeof(a)
    mat = getattr(t, "manual_axis_type", None)             # newer JAX; older: t.vma
    return frozenset(mat.varying if mat is not None else getattr(t, "vma", ()))


def _varying_alike(tree):
    """every array of ``tree`` varying along the axes that any of them varies along: a callback
    of varying inputs has varying outputs, and the cast of an input that does not vary (the
    weights beside a batch split over the devices) transposes to the sum of its cotangents
    over the devices"""
    return _varying_along(tree, frozenset().union(*map(_varying, jax.tree.leaves(tree))))


def _varying_as(tree, like):
    """the arrays of ``tree`` (a callback's results) varying as ``like`` (its input) does: a
    callback's results come back typed alike on every device, though each device computed
    its own"""
    return _varying_along(tree, _varying(like))


def _varying_along(tree, axes):
    """every array of ``tree`` cast to vary along ``axes`` (those it varies along already kept)"""
    def cast(a):
        more = tuple(sorted(axes - _varying(a)))
        if not more:
            return a
        if hasattr(jax.lax, "pcast"):
            return jax.lax.pcast(a, more, to="varying")
        return jax.lax.pvary(a, more)                           # older JAX
    return jax.tree.map(cast, tree) if axes else tree


# -------------------------------------------------------------------------- callbacks
def _state_arg(cell, s):
    return (s[0], s[1]) if cell == "lstm" else s[0]


_worker, _worker_lock = {}, threading.Lock()       # {pid: this process's one-thread executor}


def _on_worker(fn, *args):
    """fn(*args) on this process's one fastbptt thread: XLA runs callbacks on several of its
    threads, and the kernels' OpenMP runtime keeps a team of threads per calling thread, whose
    idle teams would spin against the working one (docs/performance.md, "The JAX bridge").  A
    forked child makes its own (its parent's thread is not in it)."""
    pid = os.getpid()
    with _worker_lock:
        if pid not in _worker:
            _worker.clear()
            _worker[pid] = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fastbptt-jax")
        worker = _worker[pid]
    return worker.submit(fn, *args).result()


class _KeptForwards:
    """The forwards that differentiation ran (``rnn_forward(keep=True)``: the gates every layer's
    backward needs), each under the handle its callback returned among the VJP's residuals, until
    its backward takes it.  At most MAX: a forward whose backward never runs is dropped oldest
    first, and a backward that finds no forward under its handle recomputes it (rnn_backward from
    the residuals), which gives the same gradients."""
    MAX = 8

    def __init__(self):
        self.forwards, self.lock, self.handles = OrderedDict(), threading.Lock(), itertools.count(1)

    def put(self, forward):
        with self.lock:
            handle = next(self.handles) % (1 << 31)
            self.forwards[handle] = forward
            while len(self.forwards) > self.MAX:
                self.forwards.popitem(last=False)
        return handle

    def take(self, handle):
        with self.lock:
            return self.forwards.pop(handle, None)


_kept = _KeptForwards()


def _forward_np(keys, cell, act, dt, keep, P, X, s0):
    """(Hs, the last states..., the kept forward's handle: 0 if none kept)"""
    params = dict(zip(keys, P))
    Hs, last, *kept = api.rnn_forward(params, X, _state_arg(cell, s0), activation=act, cell=cell,
                                      return_state=True, keep=keep, check_finite=False)  # NaN, inf flow as in JAX
    last = last if cell == "lstm" else (last,)
    handle = _kept.put(kept[0]) if keep else 0
    return (np.asarray(Hs, dt),) + tuple(np.asarray(s, dt) for s in last) + (np.int32(handle),)


def _backward_np(keys, cell, L, act, truncation, dt, want_dx, P, X, s0, Hs, handle, dHs, dlast):
    """the gradients (params, X or None, state) from the forward kept under ``handle`` or, if
    it is gone, recomputed; dlast: every layer's h_T (and c_T) cotangent, None for zeros"""
    dh_T = None if dlast is None else _state_arg(cell, tuple(np.asarray(d, dt) for d in dlast))
    kept = _kept.take(int(handle))
    if kept is not None:
        g = api.kept_backward(kept, np.asarray(dHs, dt), activation=act, truncation=truncation,
                              input_grad=want_dx, dh_T=dh_T, check_finite=False)
    else:
        params = dict(zip(keys, (np.asarray(p) for p in P)))
        g = api.rnn_backward(params, np.asarray(X), np.asarray(Hs), np.asarray(dHs, dt),
                             _state_arg(cell, tuple(np.asarray(s) for s in s0)),
                             activation=act, truncation=truncation, cell=cell, input_grad=want_dx,
                             dh_T=dh_T, check_finite=False)
    return _results(keys, g, want_dx, cell, dt)


def _results(keys, g, want_dx, cell, dt):
    gP = tuple(np.asarray(g[k], dt) for k in keys)
    gX = np.asarray(g["X"], dt) if want_dx else None
    gs = tuple(np.asarray(g[n], dt) for n in (("h0", "c0") if cell == "lstm" else ("h0",)))
    return gP, gX, gs
