"""fastbptt's recurrent layers as a JAX function: ``jax.grad`` and ``jax.jit`` run the numba
kernels on the CPU through :func:`jax.pure_callback`, with a :func:`jax.custom_vjp`.

    import fastbptt.jax as fj
    outputs, h_T = fj.rnn(params, X, h0)                  # LSTM: outputs, (h_T, c_T)

The forward is :func:`fastbptt.rnn_forward`, the backward :func:`fastbptt.rnn_backward`
(the cotangent of the top layer's h_T joins that of the last output).  A cotangent of a lower
layer's h_T, or of the LSTM's c_T, can't be handed to ``rnn_backward``: when one is nonzero
(checked at run time, in the callback) the backward runs layer by layer with one-layer calls,
passing ∂L/∂(input) down, and the c_T cotangent's forget-gate chain is added in numpy — the
exact gradient, for the full gradient and :class:`~fastbptt.Randomized` alike.  With
:class:`~fastbptt.Truncated` ``(k)``, k < T, such a cotangent has no defined place in the
per-term truncation and the backward raises a ValueError saying so (never a wrong gradient).

Importing this module needs jax (``pip install fastbptt[jax]``); ``import fastbptt`` never
imports it.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

try:
    import jax
    import jax.numpy as jnp
except ImportError as e:           # pragma: no cover - exercised by a test with jax hidden
    raise ImportError(f"fastbptt.jax needs jax: pip install fastbptt[jax] ({e})") from e

from . import _model, api
from .truncation import Randomized, Truncated

__all__ = ["rnn"]

_EXTRA_TRUNCATED = (
    "fastbptt.jax.rnn: truncation=Truncated({k}) with k < T={T} takes the cotangent of the outputs "
    "and of the top layer's h_T only, but the loss has a nonzero cotangent of {what}; per-term "
    "truncation has no place for it. Apply jax.lax.stop_gradient to that state, or use the full "
    "gradient or Randomized(p)")


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
    Hs, last = core(P, X, state0)
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
        dtypes.append(dtype)
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
    names = ("h0", "c0") if cell == "lstm" else ("h0",)
    if h0 is None:
        return tuple(jnp.zeros((L, B, H), dt) for _ in names), False
    if cell == "lstm":
        if not isinstance(h0, (tuple, list)) or len(h0) != 2:
            raise TypeError(f"h0: an LSTM's state is a tuple (h0, c0) of (B,H) or (num_layers,B,H) "
                            f"arrays, got {type(h0).__name__}")
        given = tuple(h0)
    else:
        given = (h0,)
    out, flat = [], []
    for name, a in zip(names, given):
        a = jnp.asarray(a)
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
    return tuple(out), flat[0]


def _core(keys, cell, L, act, truncation, tokens, dt, shape):
    """f(P, X, state0) -> (Hs, last state tuple), with its custom VJP, for one configuration"""
    T, B, H = shape
    n_state = 2 if cell == "lstm" else 1
    out_shapes = (jax.ShapeDtypeStruct((T, B, H), dt),) + (jax.ShapeDtypeStruct((L, B, H), dt),) * n_state

    def forward(P, X, state0):
        res = jax.pure_callback(
            lambda P, X, s0: _forward_np(keys, cell, act, P, X, s0, dt),
            out_shapes, P, X, state0, vmap_method="sequential")
        return res[0], tuple(res[1:])

    @jax.custom_vjp
    def f(P, X, state0):
        return forward(P, X, state0)

    def fwd(P, X, state0):
        Hs, last = forward(P, X, state0)
        return (Hs, last), (P, X, state0, Hs)

    def bwd(res, cot):
        P, X, state0, Hs = res
        dHs, dlast = cot
        grad_shapes = (tuple(jax.ShapeDtypeStruct(p.shape, dt) for p in P),
                       None if tokens else jax.ShapeDtypeStruct(X.shape, dt),
                       tuple(jax.ShapeDtypeStruct(s.shape, dt) for s in state0))
        gP, gX, gs = jax.pure_callback(
            lambda *a: _backward_np(keys, cell, L, act, truncation, dt, *a),
            grad_shapes, P, X, state0, Hs, dHs, tuple(dlast), vmap_method="sequential")
        return gP, gX, gs

    f.defvjp(fwd, bwd)
    return f


# -------------------------------------------------------------------------- callbacks
def _state_arg(cell, s):
    return (s[0], s[1]) if cell == "lstm" else s[0]


def _forward_np(keys, cell, act, P, X, s0, dt):
    params = dict(zip(keys, P))
    Hs, last = api.rnn_forward(params, X, _state_arg(cell, s0), activation=act, cell=cell,
                               return_state=True)
    last = last if cell == "lstm" else (last,)
    return (np.asarray(Hs, dt),) + tuple(np.asarray(s, dt) for s in last)


def _backward_np(keys, cell, L, act, truncation, dt, P, X, s0, Hs, dHs, dlast):
    params = dict(zip(keys, (np.asarray(p) for p in P)))
    X, Hs = np.asarray(X), np.asarray(Hs)
    s0 = tuple(np.asarray(s) for s in s0)
    dlast = tuple(np.asarray(d, dt) for d in dlast)
    dense = X.ndim == 3
    T = X.shape[0]
    lower = L > 1 and bool(np.any(dlast[0][:-1]))
    c_T = cell == "lstm" and bool(np.any(dlast[1]))
    if not (lower or c_T):
        d = np.array(dHs, dt)
        d[-1] += dlast[0][-1]
        g = api.rnn_backward(params, X, Hs, d, _state_arg(cell, s0), activation=act,
                             truncation=truncation, cell=cell, input_grad=True)
        return _results(keys, g, dense, cell, dt)
    if isinstance(truncation, Truncated) and truncation.k < T:
        what = " and ".join(w for w, on in (("the h_T of a layer below the top", lower), ("c_T", c_T)) if on)
        raise ValueError(_EXTRA_TRUNCATED.format(k=truncation.k, T=T, what=what))
    return _layerwise(params, keys, cell, L, act, truncation, dt, X, s0, np.asarray(dHs, dt), dlast)


def _results(keys, g, dense, cell, dt):
    gP = tuple(np.asarray(g[k], dt) for k in keys)
    gX = np.asarray(g["X"], dt) if dense else None
    gs = tuple(np.asarray(g[n], dt) for n in (("h0", "c0") if cell == "lstm" else ("h0",)))
    return gP, gX, gs


def _layerwise(params, keys, cell, L, act, truncation, dt, X, s0, dHs, dlast):
    """The exact backward, one layer at a time from the top, for cotangents of every layer's
    h_T and of c_T: layer l's outputs get ∂L/∂(layer l+1's input) plus its own h_T cotangent at
    the last step; the c_T cotangent's chain through the forget gates (every ξ_t crossing
    included) is added here, its gate adjoints going into the weights, the input's adjoint and
    (as a cotangent of h_{t-1}, crossing ξ_t) into the kernel's sweep."""
    T = X.shape[0]
    if isinstance(truncation, Randomized):
        seed = truncation.seed
        if seed is None or isinstance(seed, np.random.Generator):   # one draw, for every layer
            truncation = Randomized(truncation.p, int(np.random.default_rng(seed).integers(2 ** 63)))
        xi = truncation.draw(T, dt)
    else:
        xi = np.ones(T, dt)
    layer = [{k: params[_model.key(k, l)] for k in ("W_xh", "W_hh", "b_h", "b_hn") if _model.key(k, l) in params}
             for l in range(L)]
    inputs, outs = [X], []
    for l in range(L):
        Hl, _ = api.rnn_forward(layer[l], inputs[l], _state_arg(cell, tuple(s[l:l + 1] for s in s0)),
                                activation=act, cell=cell, return_state=True)
        outs.append(Hl)
        inputs.append(Hl)
    grads, d0 = {}, [np.zeros_like(s) for s in s0]
    dH = dHs.copy()
    for l in reversed(range(L)):
        dH[-1] += dlast[0][l]
        x = inputs[l]
        extra = None
        if cell == "lstm" and np.any(dlast[1][l]):
            extra = _forget_chain(layer[l], x, outs[l], s0[0][l], s0[1][l], dlast[1][l], xi, dt)
            dP, dc0 = extra
            back = dP @ layer[l]["W_hh"].T                      # into h_{t-1}, crossing ξ_t
            back *= xi[:, None, None]
            dH[:-1] += back[1:]
        want_x = l > 0 or x.ndim == 3
        g = api.rnn_backward(layer[l], x, outs[l], dH, _state_arg(cell, tuple(s[l:l + 1] for s in s0)),
                             activation=act, truncation=truncation, cell=cell, input_grad=want_x)
        g = {k: np.array(v, dt) for k, v in g.items()}
        if extra is not None:
            H4 = dP.shape[-1]
            if x.ndim == 3:
                g["W_xh"] += x.reshape(-1, x.shape[-1]).T @ dP.reshape(-1, H4)
                g["X"] += dP @ layer[l]["W_xh"].T
            else:
                np.add.at(g["W_xh"], x.reshape(-1), dP.reshape(-1, H4))
            prev = np.concatenate([s0[0][l][None], outs[l][:-1]])
            g["W_hh"] += prev.reshape(-1, prev.shape[-1]).T @ dP.reshape(-1, H4)
            g["b_h"] += dP.sum((0, 1))
            g["h0"][0] += back[0]
            g["c0"][0] += dc0
        for k in layer[l]:
            grads[_model.key(k, l)] = g[k]
        d0[0][l] = g["h0"][0]
        if cell == "lstm":
            d0[1][l] = g["c0"][0]
        if want_x:
            dH = g["X"]
    out = dict(grads, h0=d0[0])
    if cell == "lstm":
        out["c0"] = d0[1]
    if X.ndim == 3:
        out["X"] = dH
    return _results(keys, out, X.ndim == 3, cell, dt)


def _forget_chain(p, x, Hs, h0, c0, dc_T, xi, dt):
    """One LSTM layer's pure c-path from a cotangent dc_T of c_T: b_T = dc_T, b_{t-1} = ξ_t f_t b_t.
    Returns the gate pre-activation adjoints it makes, (T,B,4H) (i, f, g; none for o), and its
    dc_0 = ξ_1 f_1 b_1."""
    H = Hs.shape[-1]
    prev = np.concatenate([h0[None], Hs[:-1]])
    pre = (p["W_xh"][x] if x.ndim == 2 else x @ p["W_xh"]) + prev @ p["W_hh"] + p["b_h"]
    pre = pre.astype(dt, copy=False)
    sig = lambda a: 1 / (1 + np.exp(-a))                                  # noqa: E731
    i, f, g = sig(pre[..., :H]), sig(pre[..., H:2 * H]), np.tanh(pre[..., 2 * H:3 * H])
    T = Hs.shape[0]
    c = np.empty((T + 1,) + h0.shape, dt)
    c[0] = c0
    for t in range(T):
        c[t + 1] = f[t] * c[t] + i[t] * g[t]
    dP = np.zeros(pre.shape, dt)
    b = np.array(dc_T, dt)
    for t in reversed(range(T)):                                          # step t+1, 1-based
        dP[t, :, :H] = b * g[t] * i[t] * (1 - i[t])
        dP[t, :, H:2 * H] = b * c[t] * f[t] * (1 - f[t])
        dP[t, :, 2 * H:3 * H] = b * i[t] * (1 - g[t] * g[t])
        b = xi[t] * f[t] * b
    return dP, b
