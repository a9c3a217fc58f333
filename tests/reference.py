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
