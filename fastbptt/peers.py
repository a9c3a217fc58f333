"""Peers for the benchmark: the same loss + full BPTT gradient written other ways.

Each ``make_<peer>(params, X, Y, h0)`` returns a zero-argument callable that computes
(loss, grads) once, set up so that a call does only the work being timed.  torch and
jax are imported inside their makers (the optional ``peers`` extra); a missing one
raises ImportError, which the harness reports as skipped.
"""
import numpy as np


def numpy_loss_and_grad(params, X, Y, h0):
    """A careful numpy BPTT for token ids X (T,B): gather, per-step matmul + tanh,
    head and softmax-CE over all rows, reverse sweep, weight gradients as one product."""
    W_xh, W_hh, b_h, W_hq, b_q = (params[k] for k in ("W_xh", "W_hh", "b_h", "W_hq", "b_q"))
    T, B = X.shape
    D, H = W_xh.shape
    N = T * B
    Hs = W_xh[X] + b_h                                   # pre_t for all t, then h_t in place
    h = h0
    for t in range(T):
        h = np.tanh(Hs[t] + h @ W_hh, out=Hs[t])
    H2 = Hs.reshape(N, H)
    O = H2 @ W_hq + b_q
    O -= O.max(axis=1, keepdims=True)
    np.exp(O, out=O)
    O /= O.sum(axis=1, keepdims=True)
    rows = np.arange(N)
    y = Y.reshape(N)
    loss = -np.log(O[rows, y]).mean()
    O[rows, y] -= 1.0
    O /= N
    dW_hq = H2.T @ O
    db_q = O.sum(axis=0)
    dZ = (O @ W_hq.T).reshape(T, B, H)
    W_hhT = np.ascontiguousarray(W_hh.T)
    carry = None
    for t in range(T - 1, -1, -1):
        if carry is not None:
            dZ[t] += carry
        dZ[t] *= 1.0 - Hs[t] * Hs[t]
        carry = dZ[t] @ W_hhT
    dZ2 = dZ.reshape(N, H)
    dW_hh = h0.T @ dZ[0] + H2[:-B].T @ dZ2[B:]
    onehot = np.zeros((N, D), W_xh.dtype)
    onehot[rows, X.reshape(N)] = 1.0
    grads = {"W_xh": onehot.T @ dZ2, "W_hh": dW_hh, "b_h": dZ2.sum(axis=0),
             "W_hq": dW_hq, "b_q": db_q, "h0": carry}
    return float(loss), grads


def make_numpy(params, X, Y, h0):
    return lambda: numpy_loss_and_grad(params, X, Y, h0)
