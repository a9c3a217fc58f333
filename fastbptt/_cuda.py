"""CUDA kernels (numba-cuda): the same functions as ``fastbptt._cpu``, in the same order.

The math is the CPU module's (see its docstring and docs/math.md).  Imported only when
``device="cuda"`` is asked for; ``available()`` says whether it can run here (a CUDA GPU,
or the simulator under ``NUMBA_ENABLE_CUDASIM=1``).

Only the recurrence is sequential.  The input projection, the head with its fused
softmax-CE and every weight gradient are one GEMM or one elementwise kernel over all
T·B rows: CuPy's cuBLAS when CuPy is installed (and not under the simulator), else the
plain numba-cuda GEMM below.  The recurrence has two paths, chosen by
``config.CUDA_RECURRENCE`` ("auto": persistent when B <= config.CUDA_PERSIST_MAX_B and H
fits, else step):

- **step**: one fused kernel launch per time step (recurrent product + bias + φ;
  backward: dz_t = a_t ⊙ φ' then a_{t-1} = dz_t W_hhᵀ);
- **persistent**: one cooperative launch for all T steps; block c keeps its slice of
  W_hh (config.CUDA_PERSIST_COLS columns) in shared memory for the whole sweep and
  the grid synchronizes once per step (twice backward).  Largest H:
  :func:`persistent_max_hidden` (48 KiB of shared memory per block).
"""
from __future__ import annotations

import math
import os

import numpy as np
from numba import cuda

from . import config
from .config import ACTIVATIONS

TANH, RELU, IDENTITY = (ACTIVATIONS[name] for name in ("tanh", "relu", "identity"))
_SHARED_BYTES = 48 * 1024
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def available() -> bool:
    """True when kernels can run: a CUDA GPU with its driver, or the CUDA simulator."""
    try:
        return bool(cuda.is_available())
    except Exception:
        return False


def _grid(n):
    return max(1, min(math.ceil(n / config.CUDA_BLOCK), config.CUDA_MAX_GRID)), config.CUDA_BLOCK


# ------------------------------------------------------------------------------ GEMM
@cuda.jit
def _gemm_kernel(C, A, B, ta, tb, beta):
    """C = op(A) op(B) + beta·C, one thread per element of C (the fallback without CuPy)

    C (M,N) · A (M,K) or (K,M) if ta · B (K,N) or (N,K) if tb
    """
    M, N = C.shape
    K = A.shape[0] if ta else A.shape[1]
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, M * N, stride):
        i, j = idx // N, idx % N
        acc = 0.0                    # accumulate in float64; C may hold garbage when beta = 0
        if beta != 0:
            acc = beta * C[i, j]
        for k in range(K):
            a = A[k, i] if ta else A[i, k]
            b = B[j, k] if tb else B[k, j]
            acc += a * b
        C[i, j] = acc


def _cupy():
    if SIMULATOR or not config.CUDA_USE_CUPY:
        return None
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def gemm(C, A, B, ta=False, tb=False, beta=0.0):
    """C = op(A) op(B) + beta·C on the device (cuBLAS through CuPy when installed)."""
    cp = _cupy()
    if cp is not None:
        a, b, c = cp.asarray(A), cp.asarray(B), cp.asarray(C)
        prod = cp.matmul(a.T if ta else a, b.T if tb else b)
        if beta:
            c *= beta
            c += prod
        else:
            c[...] = prod
        return
    _gemm_kernel[_grid(C.shape[0] * C.shape[1])](C, A, B, ta, tb, beta)


@cuda.jit(device=True)
def _phi(z, act):
    if act == TANH:
        return math.tanh(z)
    if act == RELU:
        return z if z > 0 else z * 0
    return z


@cuda.jit(device=True)
def _dphi(h, act):
    if act == TANH:
        return 1 - h * h
    if act == RELU:
        return 1 if h > 0 else 0
    return 1


# ------------------------------------------------------------------ input projection
@cuda.jit
def embed_tokens_cuda(pre, X, W_xh, b_h):
    """pre[t,b] = W_xh[X[t,b]] + b_h (row gather) · pre (T,B,H) · X (T,B) int64 · W_xh (D,H) · b_h (H,)"""
    T, B, H = pre.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, T * B * H, stride):
        t, r = idx // (B * H), idx % (B * H)
        b, j = r // H, r % H
        pre[t, b, j] = W_xh[X[t, b], j] + b_h[j]


@cuda.jit
def _add_bias_cuda(Y, bias):
    """Y[n] += bias · Y (N,M) · bias (M,)"""
    N, M = Y.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, N * M, stride):
        Y[idx // M, idx % M] += bias[idx % M]


def embed_dense_cuda(pre, X, W_xh, b_h):
    """pre = X W_xh + b_h over all T·B rows (one GEMM) · pre (T·B,H) · X (T·B,D)"""
    gemm(pre, X, W_xh)
    _add_bias_cuda[_grid(pre.size)](pre, b_h)


# ------------------------------------------------------------------------ recurrence
@cuda.jit
def rnn_step_cuda(Hx, t, W_hh, act):
    """h_t = φ(pre_t + h_{t-1} W_hh) for one step t, fused · Hx (T+1,B,H) · W_hh (H,H)"""
    B, H = Hx.shape[1], Hx.shape[2]
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, B * H, stride):
        b, j = idx // H, idx % H
        acc = Hx[t, b, j]
        for k in range(H):
            acc += Hx[t - 1, b, k] * W_hh[k, j]
        Hx[t, b, j] = _phi(acc, act)


_persistent_cache = {}


@cuda.jit(device=True)
def _stage_slice(W_s, W_hh, j0, C, rows):
    """Copy block j0's slice of W_hh into shared memory W_s (H·C): its C columns in k-major
    order (W_s[k·C + jl] = W_hh[k, j0+jl], the forward's h W_hh) or, with rows, its C rows
    in k-minor order (W_s[jl·H + k] = W_hh[j0+jl, k], the backward's dz W_hhᵀ); zeros past H."""
    H = W_hh.shape[0]
    for idx in range(cuda.threadIdx.x, H * C, cuda.blockDim.x):
        if rows:
            jl, k = idx // H, idx % H
            W_s[idx] = W_hh[j0 + jl, k] if j0 + jl < H else 0
        else:
            k, jl = idx // C, idx % C
            W_s[idx] = W_hh[k, j0 + jl] if j0 + jl < H else 0
    cuda.syncthreads()


def _persistent_kernels(dtype):
    """The persistent forward/backward kernels for ``dtype`` (shared arrays need a fixed type)."""
    if dtype in _persistent_cache:
        return _persistent_cache[dtype]
    from numba import float32, float64
    nbt = float32 if dtype == np.float32 else float64

    @cuda.jit
    def forward(Hx, W_hh, act):
        """All T steps of h_t = φ(pre_t + h_{t-1} W_hh) in one launch; block c owns columns
        c·C … c·C+C-1 and keeps W_hh[:, those] in shared memory; one grid sync per step."""
        T, B, H = Hx.shape[0] - 1, Hx.shape[1], Hx.shape[2]
        C = config.CUDA_PERSIST_COLS
        j0 = cuda.blockIdx.x * C
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        W_s = cuda.shared.array(0, dtype=nbt)
        _stage_slice(W_s, W_hh, j0, C, False)
        grid = cuda.cg.this_grid()
        for t in range(1, T + 1):
            for idx in range(tid, B * C, nt):
                b, jl = idx // C, idx % C
                j = j0 + jl
                if j < H:
                    acc = Hx[t, b, j]
                    for k in range(H):
                        acc += Hx[t - 1, b, k] * W_s[k * C + jl]
                    Hx[t, b, j] = _phi(acc, act)
            grid.sync()

    @cuda.jit
    def backward(dZ, carry, Hx, W_hh, xi, act):
        """All T steps of the reverse sweep in one launch; block c owns rows c·C … of W_hh
        (in shared memory) and the same slice of dz_t; grid syncs between the dz and the
        carry = dz_t W_hhᵀ phases of each step.  On exit carry holds dz_1 W_hhᵀ."""
        T, B, H = dZ.shape
        C = config.CUDA_PERSIST_COLS
        j0 = cuda.blockIdx.x * C
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        W_s = cuda.shared.array(0, dtype=nbt)
        _stage_slice(W_s, W_hh, j0, C, True)
        grid = cuda.cg.this_grid()
        for s in range(T - 1, -1, -1):
            x = xi[s + 1] if s + 1 < T else 0
            for idx in range(tid, B * C, nt):            # dz_s = (g_s + ξ_{s+1} carry) ⊙ φ'(h_s)
                b, jl = idx // C, idx % C
                j = j0 + jl
                if j < H:
                    a = dZ[s, b, j]
                    if x != 0:
                        a += x * carry[b, j]
                    dZ[s, b, j] = a * _dphi(Hx[s + 1, b, j], act)
            grid.sync()
            for idx in range(tid, B * C, nt):            # carry = dz_s W_hhᵀ
                b, jl = idx // C, idx % C
                j = j0 + jl
                if j < H:
                    acc = 0.0
                    for k in range(H):
                        acc += dZ[s, b, k] * W_s[jl * H + k]
                    carry[b, j] = acc
            grid.sync()

    _persistent_cache[dtype] = (forward, backward)
    return forward, backward


def persistent_max_hidden(dtype) -> int:
    """The largest H the persistent kernels take: H·CUDA_PERSIST_COLS elements of shared memory."""
    return _SHARED_BYTES // (np.dtype(dtype).itemsize * config.CUDA_PERSIST_COLS)


def use_persistent(B, H, dtype) -> bool:
    mode = config.CUDA_RECURRENCE
    fits = H <= persistent_max_hidden(dtype)
    if mode == "persistent":
        return fits
    return mode == "auto" and fits and B <= config.CUDA_PERSIST_MAX_B


def _persistent_launch(kernel, H, dtype):
    blocks = math.ceil(H / config.CUDA_PERSIST_COLS)
    shared = H * config.CUDA_PERSIST_COLS * np.dtype(dtype).itemsize
    return kernel[blocks, config.CUDA_PERSIST_THREADS, 0, shared]


def rnn_forward_cuda(Hx, W_hh, act):
    """h_t = φ(pre_t + h_{t-1} W_hh), t = 1..T · Hx (T+1,B,H) in: h_0, pre; out: h_0..h_T"""
    T, B, H = Hx.shape[0] - 1, Hx.shape[1], Hx.shape[2]
    if use_persistent(B, H, Hx.dtype):
        forward, _ = _persistent_kernels(Hx.dtype.type)
        _persistent_launch(forward, H, Hx.dtype)(Hx, W_hh, act)
        return
    for t in range(1, T + 1):
        rnn_step_cuda[_grid(B * H)](Hx, t, W_hh, act)


@cuda.jit
def _dz_step_cuda(dZ, s, carry, xi, Hx, act):
    """dz_s ← (dz_s + xi · carry) ⊙ φ'(h_s)   (inverts h_s = φ(z_s)) · dZ (T,B,H) · carry (B,H)"""
    B, H = carry.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, B * H, stride):
        b, j = idx // H, idx % H
        a = dZ[s, b, j]
        if xi != 0:
            a += xi * carry[b, j]
        dZ[s, b, j] = a * _dphi(Hx[s + 1, b, j], act)


@cuda.jit
def _carry_cuda(carry, dZ, s, W_hh):
    """carry = dz_s W_hhᵀ (inverts h_{s-1} W_hh) · carry (B,H) · dZ (T,B,H) · W_hh (H,H)"""
    B, H = carry.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, B * H, stride):
        b, j = idx // H, idx % H
        acc = 0.0
        for k in range(H):
            acc += dZ[s, b, k] * W_hh[j, k]
        carry[b, j] = acc


@cuda.jit
def _zero_cuda(out):
    """out = 0 (2-D)"""
    N, M = out.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, N * M, stride):
        out[idx // M, idx % M] = 0


@cuda.jit
def _scale_cuda(out, src, scale):
    """out = scale · src, elementwise (2-D)"""
    N, M = out.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, N * M, stride):
        out[idx // M, idx % M] = scale * src[idx // M, idx % M]


def rnn_backward_cuda(dZ, dh0, Hx, W_hh, xi, act):
    """Reverse sweep: a_t = dHs_t + ξ_{t+1} dz_{t+1} W_hhᵀ, dz_t = a_t ⊙ φ'(h_t); ∂h_0 = ξ_1 dz_1 W_hhᵀ

    dZ (T,B,H) device, in: dHs, out: dz · dh0 (B,H) device out · Hx (T+1,B,H) · W_hh (H,H) ·
    xi (T,) host array of ξ_1..ξ_T (a zero skips that step's product)
    """
    T, B, H = dZ.shape
    carry = cuda.device_array((B, H), dZ.dtype)
    if use_persistent(B, H, dZ.dtype):
        _, backward = _persistent_kernels(dZ.dtype.type)
        _persistent_launch(backward, H, dZ.dtype)(dZ, carry, Hx, W_hh, cuda.to_device(xi), act)
    else:
        g = _grid(B * H)
        for s in range(T - 1, -1, -1):
            x = xi[s + 1] if s + 1 < T else 0.0
            _dz_step_cuda[g](dZ, s, carry, x, Hx, act)
            if xi[s] != 0:
                _carry_cuda[g](carry, dZ, s, W_hh)
    if xi[0] != 0:                    # as on the CPU: the carry of step 1 exists only when ξ_1 != 0
        _scale_cuda[_grid(B * H)](dh0, carry, xi[0])
    else:
        _zero_cuda[_grid(B * H)](dh0)


@cuda.jit
def _chain_step_cuda(chain, dZ, d, Hx, act):
    """For every live chain t >= d (at step s = t-d): chain_t ← chain_t ⊙ φ'(h_s); dz_s += chain_t"""
    T, B, H = dZ.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, B * H, stride):          # one thread per (b, j), serial over t: no races
        b, j = idx // H, idx % H
        for t in range(d, T):
            c = chain[t, b, j] * _dphi(Hx[t - d + 1, b, j], act)
            chain[t, b, j] = c
            dZ[t - d, b, j] += c


def rnn_backward_truncated_cuda(dZ, dh0, Hx, W_hh, k, act):
    """Per-term truncation after k steps, chains advanced one depth at a time (one GEMM per depth),
    as ``_cpu.rnn_backward_truncated_cpu``; ∂h_0 = dz_1 W_hhᵀ."""
    T, B, H = dZ.shape
    chain = cuda.device_array_like(dZ)
    chain.copy_to_device(dZ)
    nxt = cuda.device_array_like(dZ)
    _zero_cuda[_grid(T * B * H)](dZ.reshape(T * B, H))
    depth = min(k, T)
    for d in range(depth):
        _chain_step_cuda[_grid(B * H)](chain, dZ, d, Hx, act)
        if d + 1 < depth:
            rows = slice((d + 1) * B, T * B)
            gemm(nxt.reshape(T * B, H)[rows], chain.reshape(T * B, H)[rows], W_hh, tb=True)
            chain, nxt = nxt, chain
    gemm(dh0, dZ[0], W_hh, tb=True)


# ------------------------------------------------------------------ weight gradients
@cuda.jit
def _colsum_cuda(out, Y):
    """out[j] = Σ_n Y[n, j] · out (M,) · Y (N,M)"""
    N, M = Y.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for j in range(start, M, stride):
        acc = 0.0
        for n in range(N):
            acc += Y[n, j]
        out[j] = acc


def rnn_weight_grads_cuda(dW_hh, db_h, dZ, Hx):
    """∂W_hh = Σ_t h_{t-1}ᵀ dz_t (one GEMM over T·B rows), ∂b_h = Σ_t Σ_b dz_t"""
    T, B, H = dZ.shape
    dZ2 = dZ.reshape(T * B, H)
    gemm(dW_hh, Hx[:T].reshape(T * B, H), dZ2, ta=True)
    _colsum_cuda[_grid(H)](db_h, dZ2)


@cuda.jit
def embed_tokens_backward_cuda(dW_xh, dZ, X):
    """dW_xh[X[t,b]] += dz_t[b] (scatter-add, atomic) · dW_xh (D,H) zeroed · dZ (T,B,H) · X (T,B)"""
    T, B, H = dZ.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, T * B * H, stride):
        t, r = idx // (B * H), idx % (B * H)
        b, j = r // H, r % H
        cuda.atomic.add(dW_xh, (X[t, b], j), dZ[t, b, j])


def embed_dense_backward_cuda(dW_xh, dZ, X):
    """∂W_xh = Xᵀ dZ over all T·B rows (one GEMM) · dZ (T·B,H) · X (T·B,D)"""
    gemm(dW_xh, X, dZ, ta=True)


# ---------------------------------------------------------------------- softmax head
@cuda.jit
def _softmax_xent_cuda(logits, row_loss, Y, b_q, scale, grad):
    """Per row n: o = logits_n + b_q; row_loss_n = logsumexp(o) - o[y_n]; if grad:
    logits_n ← scale·(softmax(o) - onehot(y_n)).  Stable via the row max."""
    N, Q = logits.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for n in range(start, N, stride):
        m = logits[n, 0] + b_q[0]
        for q in range(Q):
            logits[n, q] += b_q[q]
            m = max(m, logits[n, q])
        s = 0.0
        for q in range(Q):
            s += math.exp(logits[n, q] - m)
        y = Y[n]
        row_loss[n] = m + math.log(s) - logits[n, y]
        if grad:
            for q in range(Q):
                logits[n, q] = scale * math.exp(logits[n, q] - m) / s
            logits[n, y] -= scale


def head_forward_backward_cuda(dHs, dW_hq, db_q, logits, Hs, Y, W_hq, b_q, scale):
    """o = H W_hq + b_q; L = scale·Σ CE; do = scale·(softmax - onehot); ∂W_hq = Hᵀ do,
    ∂b_q = Σ do, dHs = do W_hqᵀ.  Shapes as ``_cpu.head_forward_backward_cpu``; returns L."""
    N = logits.shape[0]
    gemm(logits, Hs, W_hq)
    row_loss = cuda.device_array(N, np.float64)
    _softmax_xent_cuda[_grid(N)](logits, row_loss, Y, b_q, scale, True)
    gemm(dW_hq, Hs, logits, ta=True)
    _colsum_cuda[_grid(logits.shape[1])](db_q, logits)
    gemm(dHs, logits, W_hq, tb=True)
    return float(row_loss.copy_to_host().sum()) * scale


def head_loss_cuda(logits, Hs, Y, W_hq, b_q):
    """Σ_n (logsumexp(o_n) - o_n[y_n]) with o = H W_hq + b_q (forward only)."""
    N = logits.shape[0]
    gemm(logits, Hs, W_hq)
    row_loss = cuda.device_array(N, np.float64)
    _softmax_xent_cuda[_grid(N)](logits, row_loss, Y, b_q, 1.0, False)
    return float(row_loss.copy_to_host().sum())


# ------------------------------------------------------- composites (called by api.py)
# Arrays come validated from api.py, each on the host or on the device.  Host arrays are
# copied to the device; results come back to the host unless the params live on the
# device (fastbptt.to_device), in which case they stay there, zero-copy.

def _on_device(a):
    """A numba device array, or any object with the CUDA array interface (CuPy, torch)."""
    return not isinstance(a, np.ndarray) and (cuda.devicearray.is_cuda_ndarray(a)
                                               or hasattr(a, "__cuda_array_interface__"))


def _dev(a):
    return a if _on_device(a) else cuda.to_device(a)


def _results(P):
    """How results leave: as device arrays when the params are on the device, else copied back."""
    if _on_device(P["W_hh"]):
        return lambda a: a
    return lambda a: a.copy_to_host()


def to_device(P):
    return {k: _dev(v) for k, v in P.items()}


def _forward_device(D, X, h0, act):
    T, B = X.shape[:2]
    H = D["W_hh"].shape[0]
    Hx = cuda.device_array((T + 1, B, H), D["W_hh"].dtype)
    Hx[0].copy_to_device(h0)
    Xd = _dev(X)
    if X.ndim == 2:
        embed_tokens_cuda[_grid(T * B * H)](Hx[1:], Xd, D["W_xh"], D["b_h"])
    else:
        embed_dense_cuda(Hx[1:].reshape(T * B, H), Xd.reshape(T * B, X.shape[2]), D["W_xh"], D["b_h"])
    rnn_forward_cuda(Hx, D["W_hh"], act)
    return Hx, Xd


def _backward_device(D, X, Xd, Hx, dZ, act, k, xi):
    T, B, H = dZ.shape
    dt = dZ.dtype
    dh0 = cuda.device_array((B, H), dt)
    if k is None:
        rnn_backward_cuda(dZ, dh0, Hx, D["W_hh"], xi, act)
    else:
        rnn_backward_truncated_cuda(dZ, dh0, Hx, D["W_hh"], k, act)
    dW_hh = cuda.device_array((H, H), dt)
    db_h = cuda.device_array(H, dt)
    rnn_weight_grads_cuda(dW_hh, db_h, dZ, Hx)
    dW_xh = cuda.device_array(D["W_xh"].shape, dt)
    _zero_cuda[_grid(dW_xh.size)](dW_xh)
    if X.ndim == 2:
        embed_tokens_backward_cuda[_grid(T * B * H)](dW_xh, dZ, Xd)
    else:
        embed_dense_backward_cuda(dW_xh, dZ.reshape(T * B, H), Xd.reshape(T * B, X.shape[2]))
    return {"W_xh": dW_xh, "W_hh": dW_hh, "b_h": db_h, "h0": dh0}


def forward(P, X, h0, act):
    """Hx (T+1,B,H) = h_0..h_T, as ``_cpu.forward``."""
    Hx, _ = _forward_device(to_device(P), X, h0, act)
    return _results(P)(Hx)


def backward(P, X, Hx, dZ, act, k, xi):
    """Gradients of W_xh, W_hh, b_h, h0, as ``_cpu.backward`` (dZ is overwritten)."""
    out = _results(P)
    g = _backward_device(to_device(P), X, _dev(X), _dev(Hx), _dev(dZ), act, k, xi)
    return {name: out(v) for name, v in g.items()}


def adjoints(P, Hx, dZ, act):
    """A (T+1,B,H) = ∂L/∂h_0 … ∂L/∂h_T of the full gradient, as ``_cpu.adjoints``."""
    T, B, H = dZ.shape
    D = to_device(P)
    dZd = _dev(dZ)
    A = cuda.device_array((T + 1, B, H), dZ.dtype)
    _zero_cuda[_grid(B * H)](A[0])
    A[1:].copy_to_device(dZd)                              # the direct terms, before the sweep
    dh0 = cuda.device_array((B, H), dZ.dtype)
    rnn_backward_cuda(dZd, dh0, _dev(Hx), D["W_hh"], np.ones(T, dZ.dtype), act)
    gemm(A[:T].reshape(T * B, H), dZd.reshape(T * B, H), D["W_hh"], tb=True, beta=1.0)
    return _results(P)(A)


def loss_and_grad(P, X, Y, h0, act, k, xi, scale):
    """(loss, grads, h_T), as ``_cpu.loss_and_grad``."""
    out = _results(P)
    D = to_device(P)
    Hx, Xd = _forward_device(D, X, h0, act)
    T, B, H = Hx.shape[0] - 1, Hx.shape[1], Hx.shape[2]
    Q = D["W_hq"].shape[1]
    dt = Hx.dtype
    dHs = cuda.device_array((T, B, H), dt)
    dW_hq = cuda.device_array((H, Q), dt)
    db_q = cuda.device_array(Q, dt)
    logits = cuda.device_array((T * B, Q), dt)
    loss = head_forward_backward_cuda(dHs.reshape(T * B, H), dW_hq, db_q, logits,
                                      Hx[1:].reshape(T * B, H), _dev(Y).reshape(T * B),
                                      D["W_hq"], D["b_q"], scale)
    grads = _backward_device(D, X, Xd, Hx, dHs, act, k, xi)
    grads["W_hq"] = dW_hq
    grads["b_q"] = db_q
    return loss, {name: out(v) for name, v in grads.items()}, out(Hx[T])


def loss(P, X, Y, h0, act):
    """(Σ of the T·B cross-entropy terms, h_T), forward only, as ``_cpu.loss``."""
    D = to_device(P)
    Hx, _ = _forward_device(D, X, h0, act)
    T, B, H = Hx.shape[0] - 1, Hx.shape[1], Hx.shape[2]
    logits = cuda.device_array((T * B, D["W_hq"].shape[1]), Hx.dtype)
    total = head_loss_cuda(logits, Hx[1:].reshape(T * B, H), _dev(Y).reshape(T * B), D["W_hq"], D["b_q"])
    return total, _results(P)(Hx[T])


# --------------------------------------------------- arrays (for api.py's validation)
# The same functions as in _cpu; host arrays are handled as there, device arrays here.

@cuda.jit
def _cast_cuda(out, src):
    """out = src with out's dtype, elementwise (1-D views)"""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, out.shape[0], stride):
        out[i] = src[i]


@cuda.jit
def _count_nonfinite_cuda(count, a):
    """count[0] += the number of NaN/inf in a (1-D view)"""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, a.shape[0], stride):
        if not math.isfinite(a[i]):
            cuda.atomic.add(count, 0, 1)


@cuda.jit
def _id_range_cuda(lohi, ids):
    """lohi = (min, max) of ids (1-D view), by atomics"""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, ids.shape[0], stride):
        cuda.atomic.min(lohi, 0, ids[i])
        cuda.atomic.max(lohi, 1, ids[i])


def as_array(name, a):
    """A numpy array, or a CUDA-array-interface object (numba, CuPy, torch) wrapped zero-copy."""
    if isinstance(a, np.ndarray) or cuda.devicearray.is_cuda_ndarray(a):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        return cuda.as_cuda_array(a)                 # zero-copy view of CuPy/torch memory
    try:
        return np.asarray(a)
    except Exception as e:
        raise TypeError(f"{name}: expected an array, got {type(a).__name__} ({e})") from None


def normalized(name, a, dtype, copy=False):
    """Host arrays as in _cpu; a device array must be C-contiguous, and is cast (or copied when
    asked) on the device."""
    if not _on_device(a):
        from ._host import normalized as host_normalized
        return host_normalized(name, a, dtype, copy)
    if not a.is_c_contiguous():
        raise TypeError(f"{name}: a CUDA array must be C-contiguous (copy it on the device first)")
    if a.dtype == dtype and not copy:
        return a
    out = cuda.device_array(a.shape, dtype)
    if a.size:
        _cast_cuda[_grid(a.size)](out.reshape(a.size), a.reshape(a.size))
    return out


def first_nonfinite(a):
    if not _on_device(a):
        from ._host import first_nonfinite as host_first_nonfinite
        return host_first_nonfinite(a)
    count = cuda.to_device(np.zeros(1, np.int64))
    _count_nonfinite_cuda[_grid(a.size)](count, a.reshape(a.size))
    n = int(count.copy_to_host()[0])
    return None if n == 0 else f"{n} NaN/inf values on the device"


def id_range(ids):
    if not _on_device(ids):
        return int(ids.min()), int(ids.max())
    lohi = cuda.to_device(np.array([np.iinfo(np.int64).max, np.iinfo(np.int64).min], np.int64))
    _id_range_cuda[_grid(ids.size)](lohi, ids.reshape(ids.size))
    lo, hi = lohi.copy_to_host()
    return int(lo), int(hi)


def stack_states(h0, Hs):
    """Hx (T+1,B,H) = h_0, h_1..h_T (on the device when either is)."""
    if not (_on_device(h0) or _on_device(Hs)):
        return np.concatenate([h0[None], Hs])
    Hx = cuda.device_array((Hs.shape[0] + 1,) + tuple(Hs.shape[1:]), Hs.dtype)
    Hx[0].copy_to_device(h0)
    Hx[1:].copy_to_device(Hs)
    return Hx
