"""An independent float64 BPTT for a one-layer RNN, written plainly in numpy.

Nothing here calls fastbptt's kernels or helpers: one-hot inputs are materialized,
every step is a loop iteration, and Truncated(k) is computed per loss term with its
own backward chain, exactly as the definition reads.  Slow and obvious on purpose.
"""
from dataclasses import dataclass

import numpy as np


def phi(z, act):
    if act == "tanh":
        return np.tanh(z)
    if act == "relu":
        return np.maximum(z, 0.0)
    return z.copy()


def dphi(z, act):
    if act == "tanh":
        return 1.0 - np.tanh(z) ** 2
    if act == "relu":
        return (z > 0).astype(np.float64)
    return np.ones_like(z)


def as64(params):
    return {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}


def onehot_or_dense(X, D):
    """x_t as float64 (T,B,D) rows: one-hot for token ids."""
    X = np.asarray(X)
    if X.dtype.kind in "iu":
        return np.eye(D)[X]
    return X.astype(np.float64)


def forward(params, X, h0, act):
    """z_t, h_t for t = 1..T (lists), from h_0."""
    p = as64(params)
    D, H = p["W_xh"].shape
    x = onehot_or_dense(X, D)
    T, B = x.shape[:2]
    h = np.zeros((B, H)) if h0 is None else np.asarray(h0, np.float64)
    Z, Hs = [], []
    for t in range(T):
        z = x[t] @ p["W_xh"] + h @ p["W_hh"] + p["b_h"]
        h = phi(z, act)
        Z.append(z)
        Hs.append(h)
    return x, np.array(Z), np.array(Hs)


def head(params, Hs, Y, scale):
    """Loss and ∂L/∂o, ∂L/∂h_t (direct), ∂W_hq, ∂b_q."""
    p = as64(params)
    T, B, H = Hs.shape
    loss = 0.0
    dO = np.zeros((T, B, p["W_hq"].shape[1]))
    for t in range(T):
        o = Hs[t] @ p["W_hq"] + p["b_q"]
        o = o - o.max(axis=1, keepdims=True)
        logprob = o - np.log(np.exp(o).sum(axis=1, keepdims=True))
        prob = np.exp(logprob)
        for b in range(B):
            loss -= logprob[b, Y[t][b]]
        onehot = np.eye(o.shape[1])[np.asarray(Y[t])]
        dO[t] = (prob - onehot) * scale
    dH = np.array([dO[t] @ p["W_hq"].T for t in range(T)])
    dW_hq = sum(Hs[t].T @ dO[t] for t in range(T))
    db_q = dO.sum(axis=(0, 1))
    return loss * scale, dH, dW_hq, db_q


def dz_full(params, Z, dH, act, xi=None):
    """Reverse sweep: a_t = dH_t + ξ_{t+1} dz_{t+1} W_hhᵀ;  dz_t = a_t ⊙ φ'(z_t). Returns dz, dh0."""
    W_hh = as64(params)["W_hh"]
    T = len(Z)
    xi = np.ones(T) if xi is None else np.asarray(xi, np.float64)
    dZ = np.zeros_like(dH)
    a = dH[T - 1].copy()
    for t in range(T - 1, -1, -1):
        dZ[t] = a * dphi(Z[t], act)
        back = xi[t] * dZ[t] @ W_hh.T          # crosses from h_t to h_{t-1}
        a = back + (dH[t - 1] if t > 0 else 0.0)
    return dZ, back


def dz_truncated(params, Z, dH, act, k):
    """Per loss term: l_t's adjoint walks back through steps t, t-1, ..., t-k+1 only."""
    W_hh = as64(params)["W_hh"]
    T = len(Z)
    dZ = np.zeros_like(dH)
    dh0 = np.zeros_like(dH[0])
    for t in range(T):
        g = dH[t].copy()
        for s in range(t, max(t - k, -1), -1):
            dz = g * dphi(Z[s], act)
            dZ[s] += dz
            g = dz @ W_hh.T
            if s == 0:
                dh0 += g
    return dZ, dh0


def weight_grads(x, Hs, dZ, h0):
    T, B, H = Hs.shape
    hprev = [np.zeros((B, H)) if h0 is None else np.asarray(h0, np.float64)] + list(Hs[:-1])
    return {
        "W_xh": sum(x[t].T @ dZ[t] for t in range(T)),
        "W_hh": sum(hprev[t].T @ dZ[t] for t in range(T)),
        "b_h": dZ.sum(axis=(0, 1)),
    }


@dataclass
class Result:
    loss: float
    grads: dict
    h_T: np.ndarray
    Hs: np.ndarray


def loss_and_grad(params, X, Y, h0=None, act="tanh", k=None, xi=None, reduction="mean"):
    """k: Truncated(k) per-term depth (None: full); xi: randomized crossing factors ξ_1..ξ_T."""
    x, Z, Hs = forward(params, X, h0, act)
    T, B = Hs.shape[:2]
    scale = 1.0 / (T * B) if reduction == "mean" else 1.0
    loss, dH, dW_hq, db_q = head(params, Hs, np.asarray(Y), scale)
    dZ, dh0 = dz_full(params, Z, dH, act, xi) if k is None else dz_truncated(params, Z, dH, act, k)
    grads = weight_grads(x, Hs, dZ, h0)
    grads.update(W_hq=dW_hq, b_q=db_q, h0=dh0)
    return Result(loss, grads, Hs[-1], Hs)


def rnn_backward(params, X, dHs, h0=None, act="tanh", k=None, xi=None):
    x, Z, Hs = forward(params, X, h0, act)
    dH = np.asarray(dHs, np.float64)
    dZ, dh0 = dz_full(params, Z, dH, act, xi) if k is None else dz_truncated(params, Z, dH, act, k)
    grads = weight_grads(x, Hs, dZ, h0)
    grads["h0"] = dh0
    return grads


def loss_only(params, X, Y, h0=None, act="tanh", reduction="mean"):
    x, Z, Hs = forward(params, X, h0, act)
    T, B = Hs.shape[:2]
    scale = 1.0 / (T * B) if reduction == "mean" else 1.0
    return head(params, Hs, np.asarray(Y), scale)[0]


def sweep_forward(W, pre):
    """The tanh recurrence alone: h_t = tanh(pre_t + h_{t-1} W), pre[0] = h_0 (T+1,B,H)."""
    H = np.array(pre, np.float64)
    for t in range(1, H.shape[0]):
        H[t] = np.tanh(H[t] + H[t - 1] @ W)
    return H


def sweep_backward(W, Hx, dZ, xi):
    """Its reverse sweep: dz_t = (d_t + ξ_{t+1} dz_{t+1} Wᵀ)(1 - h_t²); returns (dz, ξ_1 dz_1 Wᵀ)."""
    D = np.array(dZ, np.float64)
    T = D.shape[0]
    for t in range(T - 1, -1, -1):
        carry = xi[t + 1] * D[t + 1] @ W.T if t + 1 < T else 0.0
        D[t] = (D[t] + carry) * (1 - Hx[t + 1] ** 2)
    return D, xi[0] * D[0] @ W.T


# ---------------------------------------------------------------------------------------------
# Every cell ("rnn", "gru", "lstm") and every depth, in the same plain style.
#
# Layer l's params carry the suffix "" (l = 0) or f"_l{l}"; layer 0 reads x_t (one-hot for token
# ids), layer l >= 1 reads layer l-1's h_t of the same step.  One cell step is written gate by
# gate forward (step_forward) and backward (step_backward); one step of the whole stack backward
# (stack_step_backward) walks the layers top to bottom.  The full / Randomized sweep and the
# per-term Truncated(k) chains only differ in which steps they walk and what they carry across.
# ---------------------------------------------------------------------------------------------

GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def suffix(l):
    return "" if l == 0 else f"_l{l}"


def layer_names(cell):
    return ["W_xh", "W_hh", "b_h"] + (["b_hn"] if cell == "gru" else [])


def count_layers(params):
    L = 0
    while f"W_xh{suffix(L)}" in params:
        L += 1
    return L


def layer_params(p, cell, l):
    """Layer l's arrays under their unsuffixed names."""
    return {name: p[name + suffix(l)] for name in layer_names(cell)}


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def step_forward(cell, w, x, h, c, act):
    """One step of one layer: (x_t, h_{t-1}, c_{t-1}) -> (h_t, c_t, cache). c is unused unless lstm."""
    H = h.shape[1]
    if cell == "rnn":
        z = x @ w["W_xh"] + h @ w["W_hh"] + w["b_h"]
        h_new = phi(z, act)
        return h_new, c, dict(x=x, h=h, z=z)
    if cell == "gru":
        ax = x @ w["W_xh"] + w["b_h"]                 # (B,3H): [r | z | n] input parts
        ah = h @ w["W_hh"]                            # (B,3H): [r | z | n] recurrent parts
        r = sigmoid(ax[:, :H] + ah[:, :H])
        z = sigmoid(ax[:, H:2 * H] + ah[:, H:2 * H])
        hn = ah[:, 2 * H:] + w["b_hn"]
        n = np.tanh(ax[:, 2 * H:] + r * hn)
        h_new = (1.0 - z) * n + z * h
        return h_new, c, dict(x=x, h=h, r=r, z=z, n=n, hn=hn)
    if cell == "lstm":
        a = x @ w["W_xh"] + h @ w["W_hh"] + w["b_h"]  # (B,4H): [i | f | g | o]
        i = sigmoid(a[:, :H])
        f = sigmoid(a[:, H:2 * H])
        g = np.tanh(a[:, 2 * H:3 * H])
        o = sigmoid(a[:, 3 * H:])
        c_new = f * c + i * g
        h_new = o * np.tanh(c_new)
        return h_new, c_new, dict(x=x, h=h, c=c, i=i, f=f, g=g, o=o, c_new=c_new)
    raise ValueError(cell)


def step_backward(cell, w, cache, dh, dc, act):
    """Adjoints dh_t, dc_t of one layer's step -> (dx_t, dh_{t-1}, dc_{t-1}, {param: grad})."""
    x, h = cache["x"], cache["h"]
    if cell == "rnn":
        dz = dh * dphi(cache["z"], act)
        dax = dah = dz
        dh_prev_direct, dc_prev = 0.0, np.zeros_like(dh)
        extra = {}
    elif cell == "gru":
        r, z, n, hn = cache["r"], cache["z"], cache["n"], cache["hn"]
        dn = dh * (1.0 - z)
        dzg = dh * (h - n)
        dh_prev_direct = dh * z                        # through z * h_{t-1}
        dan = dn * (1.0 - n ** 2)                      # n's pre-activation
        dr = dan * hn
        dhn = dan * r                                  # h W_hh[:, 2H:] + b_hn
        dar = dr * r * (1.0 - r)
        daz = dzg * z * (1.0 - z)
        dax = np.concatenate([dar, daz, dan], axis=1)
        dah = np.concatenate([dar, daz, dhn], axis=1)
        dc_prev = np.zeros_like(dh)
        extra = {"b_hn": dhn.sum(axis=0)}
    elif cell == "lstm":
        i, f, g, o, c, c_new = (cache[s] for s in ("i", "f", "g", "o", "c", "c_new"))
        tc = np.tanh(c_new)
        do = dh * tc
        dct = dc + dh * o * (1.0 - tc ** 2)           # total adjoint of c_t
        di = dct * g
        dg = dct * i
        df = dct * c
        dc_prev = dct * f                              # through f * c_{t-1}
        dax = dah = np.concatenate(
            [di * i * (1.0 - i), df * f * (1.0 - f), dg * (1.0 - g ** 2), do * o * (1.0 - o)], axis=1)
        dh_prev_direct = 0.0
        extra = {}
    else:
        raise ValueError(cell)
    grads = {"W_xh": x.T @ dax, "W_hh": h.T @ dah, "b_h": dax.sum(axis=0), **extra}
    dx = dax @ w["W_xh"].T
    dh_prev = dah @ w["W_hh"].T + dh_prev_direct
    return dx, dh_prev, dc_prev, grads


def stack_inputs(p, X, h0, c0):
    """x (T,B,D_0) float64, and h0, c0 as (L,B,H) float64 (zeros when None)."""
    L = count_layers(p)
    D0 = p["W_xh"].shape[0]
    H = p["W_hh"].shape[0]
    x = onehot_or_dense(X, D0)
    B = x.shape[1]

    def state(s):
        if s is None:
            return np.zeros((L, B, H))
        s = np.asarray(s, np.float64)
        return s.reshape(L, B, H) if s.ndim == 2 else s.copy()

    return x, state(h0), state(c0)


def stack_forward(params, cell, X, h0=None, c0=None, act="tanh", masks=None):
    """Returns x, caches[t][l], Hs (T,L,B,H), Cs (T,L,B,H), h0, c0 (as (L,B,H)).  masks: None or
    L-1 arrays (T,B,H): layer l's input at step t is masks[l-1][t] * h^{(l-1)}_t."""
    p = as64(params)
    L = count_layers(p)
    x, h0, c0 = stack_inputs(p, X, h0, c0)
    T = x.shape[0]
    w = [layer_params(p, cell, l) for l in range(L)]
    h, c = list(h0), list(c0)
    caches, Hs, Cs = [], [], []
    for t in range(T):
        inp = x[t]
        step = []
        for l in range(L):
            h[l], c[l], cache = step_forward(cell, w[l], inp, h[l], c[l], act)
            step.append(cache)
            inp = h[l] if masks is None or l == L - 1 else h[l] * masks[l][t]
        caches.append(step)
        Hs.append(np.array(h))
        Cs.append(np.array(c))
    return x, caches, np.array(Hs), np.array(Cs), h0, c0


def stack_step_backward(cell, w, caches_t, d_top, dh, dc, grads, act, masks_t=None):
    """One step of the stack backward, layers top to bottom.

    d_top: the direct term on the top layer's h_t (or 0); dh[l], dc[l]: what arrived from step
    t+1 in layer l; masks_t: None or the L-1 input masks (B,H) of this step.  Accumulates into
    grads[l]; returns the bottom layer's dx_t and the uncarried crossings dh_{t-1}, dc_{t-1}
    (L,B,H) of every layer.
    """
    L = len(w)
    dh_prev, dc_prev = np.zeros_like(dh), np.zeros_like(dc)
    down = d_top
    for l in range(L - 1, -1, -1):
        dx, dh_prev[l], dc_prev[l], g = step_backward(cell, w[l], caches_t[l], dh[l] + down, dc[l], act)
        for name, v in g.items():
            grads[l][name] += v
        down = dx if masks_t is None or l == 0 else dx * masks_t[l - 1]   # to layer l-1's h_t, same step
    return down, dh_prev, dc_prev


def stack_bptt(p, cell, x, caches, dHs, act, k=None, xi=None, dCs=None, masks=None):
    """Layer grads (list of dicts), dh0, dc0 (L,B,H), dX (T,B,D_0) for direct terms dHs (T,B,H)
    on the top layer's h_t and dCs (T,B,H) on its c_t (the LSTM's; None: zeros); masks as in
    stack_forward."""

    def at(t):
        return None if masks is None else [m[t] for m in masks]

    L = count_layers(p)
    T, B = x.shape[:2]
    H = p["W_hh"].shape[0]
    w = [layer_params(p, cell, l) for l in range(L)]
    grads = [{name: np.zeros_like(v) for name, v in w[l].items()} for l in range(L)]
    dX = np.zeros_like(x)
    zero = np.zeros((L, B, H))
    if k is None:
        # full (xi None) or Randomized: one reverse sweep, crossing t -> t-1 scaled by xi_t
        xi = np.ones(T) if xi is None else np.asarray(xi, np.float64)
        dh, dc = zero.copy(), zero.copy()
        for t in range(T - 1, -1, -1):
            if dCs is not None:
                dc[-1] += dCs[t]
            dX[t], dh_prev, dc_prev = stack_step_backward(cell, w, caches[t], dHs[t], dh, dc, grads, act, at(t))
            dh, dc = xi[t] * dh_prev, xi[t] * dc_prev
        return grads, dh, dc, dX
    # Truncated(k): each loss term l_t walks back through steps t, t-1, ..., t-k+1 on its own
    dh0, dc0 = zero.copy(), zero.copy()
    for t in range(T):
        dh, dc = zero.copy(), zero.copy()
        if dCs is not None:
            dc[-1] += dCs[t]                           # the term's own step
        for s in range(t, max(t - k, -1), -1):
            d_top = dHs[t] if s == t else 0.0
            dx, dh, dc = stack_step_backward(cell, w, caches[s], d_top, dh, dc, grads, act, at(s))
            dX[s] += dx
            if s == 0:                                 # l_t reaches the initial state (t < k)
                dh0 += dh
                dc0 += dc
    return grads, dh0, dc0, dX


def flat_grads(cell, layer_grads):
    return {name + suffix(l): g[name] for l, g in enumerate(layer_grads) for name in layer_names(cell)}


@dataclass
class StackResult:
    loss: float
    grads: dict
    hT: np.ndarray
    cT: object        # (L,B,H) for lstm, else None


def stack_loss_and_grad(params, cell, X, Y, h0=None, c0=None, act="tanh", k=None, xi=None,
                        reduction="mean"):
    """Loss and gradients of a stack of `cell` layers with the softmax head on the top layer.

    k: Truncated(k) per loss term (None: full); xi: Randomized crossing factors xi_1..xi_T.
    grads: every key of params, "h0" (L,B,H), "c0" (L,B,H) for lstm, "X" (T,B,D) for dense X.
    """
    p = as64(params)
    x, caches, Hs, Cs, h0_, c0_ = stack_forward(p, cell, X, h0, c0, act)
    T, B = x.shape[:2]
    scale = 1.0 / (T * B) if reduction == "mean" else 1.0
    loss, dH, dW_hq, db_q = head(p, Hs[:, -1], np.asarray(Y), scale)
    layer_grads, dh0, dc0, dX = stack_bptt(p, cell, x, caches, dH, act, k, xi)
    grads = flat_grads(cell, layer_grads)
    grads.update(W_hq=dW_hq, b_q=db_q, h0=dh0)
    if cell == "lstm":
        grads["c0"] = dc0
    if np.asarray(X).dtype.kind not in "iu":
        grads["X"] = dX
    return StackResult(loss, grads, Hs[-1], Cs[-1] if cell == "lstm" else None)


def stack_loss_only(params, cell, X, Y, h0=None, c0=None, act="tanh", reduction="mean"):
    """(loss, hT, cT) of the stack and head; cT None unless lstm."""
    p = as64(params)
    x, _, Hs, Cs, _, _ = stack_forward(p, cell, X, h0, c0, act)
    T, B = x.shape[:2]
    scale = 1.0 / (T * B) if reduction == "mean" else 1.0
    loss = head(p, Hs[:, -1], np.asarray(Y), scale)[0]
    return loss, Hs[-1], Cs[-1] if cell == "lstm" else None


def stack_backward(params, cell, X, dHs, h0=None, c0=None, act="tanh", k=None, xi=None, dCs=None, masks=None):
    """BPTT of the stack alone for direct terms dHs (T,B,H) on the top layer's h_t (and dCs on
    its c_t, the LSTM's); masks as in stack_forward."""
    p = as64(params)
    masks = None if masks is None else [np.asarray(m, np.float64) for m in masks]
    x, caches, _, _, _, _ = stack_forward(p, cell, X, h0, c0, act, masks)
    dCs = None if dCs is None else np.asarray(dCs, np.float64)
    layer_grads, dh0, dc0, dX = stack_bptt(p, cell, x, caches, np.asarray(dHs, np.float64), act, k, xi, dCs,
                                           masks)
    grads = flat_grads(cell, layer_grads)
    grads["h0"] = dh0
    if cell == "lstm":
        grads["c0"] = dc0
    if np.asarray(X).dtype.kind not in "iu":
        grads["X"] = dX
    return grads


def init_stack(rng, cell, L, D, H, Q, scale=0.5):
    """float64 params of the spec's shapes: weights N(0, (2*scale)^2 / fan_in), biases N(0, scale^2),
    so that pre-activations are O(1): gates neither saturated nor linear (scale = 0.5)."""
    G = GATES[cell]
    params = {}
    for l in range(L):
        s, Dl = suffix(l), (D if l == 0 else H)
        params["W_xh" + s] = rng.normal(0, 2 * scale / np.sqrt(Dl), (Dl, G * H))
        params["W_hh" + s] = rng.normal(0, 2 * scale / np.sqrt(H), (H, G * H))
        params["b_h" + s] = rng.normal(0, scale, G * H)
        if cell == "gru":
            params["b_hn" + s] = rng.normal(0, scale, H)
    params["W_hq"] = rng.normal(0, 2 * scale / np.sqrt(H), (H, Q))
    params["b_q"] = rng.normal(0, scale, Q)
    return params
