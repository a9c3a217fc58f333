"""Peers for the benchmark: the same loss + full BPTT gradient written other ways.

Each ``make_<peer>(params, X, Y, h0, device)`` returns a zero-argument callable that
computes the loss and every gradient once and returns the loss, set up so that a call
does only the work being timed.  torch and jax are imported inside their makers (the
optional ``peers`` extra); a missing one raises ImportError, which the harness reports
as skipped.  X, Y are token ids (T,B); params float32 as from ``fastbptt.init_params``.
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
    prob = H2 @ W_hq + b_q
    prob -= prob.max(axis=1, keepdims=True)
    np.exp(prob, out=prob)
    prob /= prob.sum(axis=1, keepdims=True)
    rows = np.arange(N)
    y = Y.reshape(N)
    loss = -np.log(prob[rows, y]).mean()
    prob[rows, y] -= 1.0
    prob /= N
    dW_hq = H2.T @ prob
    db_q = prob.sum(axis=0)
    dZ = (prob @ W_hq.T).reshape(T, B, H)
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


def make_numpy(params, X, Y, h0, device="cpu"):
    if device != "cpu":
        raise ImportError("numpy runs on the CPU only")
    return lambda: numpy_loss_and_grad(params, X, Y, h0)[0]


def _torch(device):
    try:
        import torch
    except ImportError:
        raise ImportError("torch is not installed (pip install fastbptt[peers])") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise ImportError("torch has no CUDA device here")
    return torch


def make_torch_rnn(params, X, Y, h0, device="cpu"):
    """The book's concise model (§8.6): nn.RNN on one-hot input, nn.Linear, cross-entropy,
    loss.backward().  On CUDA this is cuDNN's RNN."""
    torch = _torch(device)
    F = torch.nn.functional
    dev = torch.device(device)
    V, H = params["W_xh"].shape
    rnn = torch.nn.RNN(V, H).to(dev)                 # time-major (T,B,·), tanh
    out = torch.nn.Linear(H, V).to(dev)
    with torch.no_grad():                            # the same weights as fastbptt's params
        rnn.weight_ih_l0.copy_(torch.from_numpy(params["W_xh"].T.copy()))
        rnn.weight_hh_l0.copy_(torch.from_numpy(params["W_hh"].T.copy()))
        rnn.bias_ih_l0.copy_(torch.from_numpy(params["b_h"]))
        rnn.bias_hh_l0.zero_()
        out.weight.copy_(torch.from_numpy(params["W_hq"].T.copy()))
        out.bias.copy_(torch.from_numpy(params["b_q"]))
    Xt = torch.from_numpy(X).to(dev)
    Yt = torch.from_numpy(Y).reshape(-1).to(dev)
    h = torch.from_numpy(h0)[None].to(dev)
    weights = list(rnn.parameters()) + list(out.parameters())

    def call():
        for w in weights:
            w.grad = None
        Hs, _ = rnn(F.one_hot(Xt, V).float(), h)
        loss = F.cross_entropy(out(Hs.reshape(-1, H)), Yt)
        loss.backward()
        return loss.item()                           # synchronizes on CUDA
    return call


def make_torch_scratch(params, X, Y, h0, device="cpu"):
    """The book's from-scratch model (§8.5): per step tanh(X W_xh + H W_hh + b_h) and the
    output layer, autograd for the gradient."""
    torch = _torch(device)
    F = torch.nn.functional
    dev = torch.device(device)
    V, H = params["W_xh"].shape
    W = {k: torch.from_numpy(v.copy()).to(dev).requires_grad_() for k, v in params.items()}
    Xt = torch.from_numpy(X).to(dev)
    Yt = torch.from_numpy(Y).reshape(-1).to(dev)
    h0t = torch.from_numpy(h0).to(dev)

    def call():
        for w in W.values():
            w.grad = None
        h, outs = h0t, []
        for x in F.one_hot(Xt, V).float():
            h = torch.tanh(x @ W["W_xh"] + h @ W["W_hh"] + W["b_h"])
            outs.append(h @ W["W_hq"] + W["b_q"])
        loss = F.cross_entropy(torch.cat(outs), Yt)
        loss.backward()
        return loss.item()
    return call


def make_jax(params, X, Y, h0, device="cpu"):
    """lax.scan over the recurrence inside jax.jit(jax.value_and_grad(...)); the input
    projection is a gather over all T and the head one product, outside the scan."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        raise ImportError("jax is not installed (pip install fastbptt[peers])") from None
    try:
        dev = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    except RuntimeError:
        raise ImportError(f"jax has no {device} device here") from None

    def loss_fn(p, X, Y, h0):
        pre = p["W_xh"][X] + p["b_h"]

        def step(h, pre_t):
            h = jnp.tanh(pre_t + h @ p["W_hh"])
            return h, h
        _, Hs = jax.lax.scan(step, h0, pre)
        logp = jax.nn.log_softmax(Hs @ p["W_hq"] + p["b_q"], axis=-1)
        return -jnp.take_along_axis(logp, Y[..., None], axis=-1).mean()

    f = jax.jit(jax.value_and_grad(loss_fn))
    args = jax.device_put(({k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(X, jnp.int32),
                           jnp.asarray(Y, jnp.int32), jnp.asarray(h0)), dev)

    def call():
        loss, grads = f(*args)
        jax.block_until_ready(grads)
        return float(loss)
    return call
