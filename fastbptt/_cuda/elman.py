"""The Elman cell ("rnn") on the CUDA engine: its pointwise φ and φ', and its sweeps.

    forward   z_t = pre_t + h_{t-1} W_hh,   h_t = φ(z_t)            pre_t = x_t W_xh + b_h
    backward  a_t = dHs_t + ξ_{t+1} dz_{t+1} W_hhᵀ,   dz_t = a_t ⊙ φ'(z_t)
              φ' written with h = φ(z): tanh 1 − h²,  relu [h > 0],  identity 1

The math is the CPU cell's (:mod:`fastbptt._cpu.elman`).  Only the recurrence is
sequential; it has two paths, chosen by ``config.CUDA_RECURRENCE`` ("auto": persistent
when B <= config.CUDA_PERSIST_MAX_B and H fits, else step; :func:`use_persistent`):

- **step**: one fused kernel launch per time step (recurrent product + bias + φ;
  backward: dz_t = a_t ⊙ φ' then a_{t-1} = dz_t W_hhᵀ);
- **persistent**: one cooperative launch for all T steps; block c keeps its slice of
  W_hh (config.CUDA_PERSIST_COLS columns) in shared memory for the whole sweep and
  the grid synchronizes once per step (twice backward).  Largest H:
  :func:`persistent_max_hidden` (48 KiB of shared memory per block).

What the backward needs is h_t alone (φ' is a function of it), so the forward keeps
h_0..h_T and nothing else.  Per-term truncation (Truncated(k)) is the graph's
(``fastbptt._model.truncated``, for every cell): this cell gives it the pointwise backward
of all live chains of a depth at once (:func:`chain_cuda`).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from numba import cuda

from .. import config
from ..config import ACTIVATIONS
from .products import launch

TANH, RELU, IDENTITY = (ACTIVATIONS[name] for name in ("tanh", "relu", "identity"))
_SHARED_BYTES = 48 * 1024


# ------------------------------------------------------------------------ pointwise
@cuda.jit(device=True)
def _phi(z, act):
    if act == TANH:
        return math.tanh(z)
    if act == RELU:                         # NaN stays NaN, as in torch.relu
        return z * 0 if z < 0 else z
    return z


@cuda.jit(device=True)
def _times_dphi(a, h, act):
    """a ⊙ φ'(z) written with h = φ(z); relu's a select, as torch's threshold_backward: 0 where
    h ≤ 0 (h · 0: a zero of h's type) even for an infinite a, a where h is NaN"""
    if act == TANH:
        return a * (1 - h * h)
    if act == RELU:
        return h * 0 if h <= 0 else a
    return a


# ---------------------------------------------------------------------- step path
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
        dZ[s, b, j] = _times_dphi(a, Hx[s + 1, b, j], act)


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


# ---------------------------------------------------------------- persistent path
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
        carry = dz_t W_hhᵀ phases of each step (t > 1: the crossing into h_0 is Run.cross)."""
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
                    dZ[s, b, j] = _times_dphi(a, Hx[s + 1, b, j], act)
            grid.sync()
            if s == 0:
                break
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


# ---------------------------------------------------------------------------- sweeps
def forward_cuda(Hx, W_hh, act):
    """h_t = φ(pre_t + h_{t-1} W_hh), t = 1..T · Hx (T+1,B,H) in: h_0, pre; out: h_0..h_T"""
    T, B, H = Hx.shape[0] - 1, Hx.shape[1], Hx.shape[2]
    if use_persistent(B, H, Hx.dtype):
        kernel, _ = _persistent_kernels(Hx.dtype.type)
        _persistent_launch(kernel, H, Hx.dtype)(Hx, W_hh, act)
        return
    for t in range(1, T + 1):
        rnn_step_cuda[launch(B * H)](Hx, t, W_hh, act)


def backward_cuda(dZ, Hx, W_hh, xi, act):
    """Reverse sweep: a_t = dHs_t + ξ_{t+1} dz_{t+1} W_hhᵀ, dz_t = a_t ⊙ φ'(h_t) (the crossing
    into h_0, ξ_1 · dz_1 W_hhᵀ, is the caller's: Run.cross)

    dZ (T,B,H) device, in: dHs, out: dz · Hx (T+1,B,H) · W_hh (H,H) ·
    xi (T,) host array of ξ_1..ξ_T (a zero skips that step's product)
    """
    T, B, H = dZ.shape
    carry = cuda.device_array((B, H), dZ.dtype)
    if use_persistent(B, H, dZ.dtype):
        _, kernel = _persistent_kernels(dZ.dtype.type)
        _persistent_launch(kernel, H, dZ.dtype)(dZ, carry, Hx, W_hh, cuda.to_device(xi), act)
    else:
        g = launch(B * H)
        for s in range(T - 1, -1, -1):
            x = float(xi[s + 1]) if s + 1 < T else 0.0
            _dz_step_cuda[g](dZ, s, carry, x, Hx, act)
            if s > 0 and xi[s] != 0:
                _carry_cuda[g](carry, dZ, s, W_hh)


@cuda.jit
def chain_cuda(A, h, dZ, act):
    """every row of a block of steps at once (truncation's chains): dZ = A ⊙ φ'(h)

    A, h, dZ (rows,H), one thread per (row, unit)"""
    rows, H = A.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, rows * H, stride):
        r, j = idx // H, idx % H
        dZ[r, j] = _times_dphi(A[r, j], h[r, j], act)


# --------------------------------------------------------------- the graph's calls
# fastbptt._model calls these with a run (fastbptt._cuda.Run): the params on the device;
# l is the layer.
G = 1
STATES = ("S",)            # the record's state arrays: h_0..h_T


def forward(run, l, X, state0, act):
    """the layer's forward over the T steps from state0 = (h_0,); X its input (T,B) ids or
    (T,B,D).  Returns what the backward needs: S (T+1,B,H) h_0..h_T."""
    T, B, H = run.T, run.B, run.H
    S, = run.record(f"rnn{l}", [(T + 1, B, H)])
    S[0].copy_to_device(state0[0])
    run.project(X, S[1:].reshape(T * B, H), run.key("W_xh", l), run.param("b_h", l))
    forward_cuda(S, run.param("W_hh", l), act)
    return SimpleNamespace(S=S)


def given(run, l, X, S, state0, act):
    """the forward's record from the caller's states S (T+1,B,H) h_0..h_T (on the device)"""
    return SimpleNamespace(S=S)


def backward(run, l, X, lay, dZ, act, xi, want_dx, end=None):
    """the full (or randomized) reverse sweep of the layer: dZ (T,B,H) in: the direct terms
    ∂l_t/∂h_t; out: dz_t.  ``end``: (∂L/∂h_T,) from the steps after T, or None.  Returns (its
    parameter gradients, (∂L/∂h_0,), ∂L/∂X or None)"""
    if end is not None:
        run.add(dZ[-1], end[0])
    W_hh = run.param("W_hh", l)
    backward_cuda(dZ, lay.S, W_hh, xi, act)
    return (weight_grads(run, l, X, lay, dZ, dZ), (run.cross(dZ[0], W_hh, xi[0]),),
            run.input_adjoint(l, dZ, G) if want_dx else None)


def weight_grads(run, l, X, lay, dP, dR):
    """∂W_xh = Σ x_tᵀ dz_t, ∂W_hh = Σ h_{t-1}ᵀ dz_t, ∂b_h = Σ dz_t (dP and dR are the same dz)"""
    dW_xh, dW_hh, db_h, _ = run.weight_grads(X, lay.S, dP, dR)
    return {"W_xh": dW_xh, "W_hh": dW_hh, "b_h": db_h}


def adjoints(run, l, X, lay, dZ, act):
    """A (T+1,B,H) = ∂L/∂h_0..∂L/∂h_T of the full gradient: a_t = dHs_t + dz_{t+1} W_hhᵀ"""
    T, B, H = dZ.shape
    A = run.zeros(f"rnn{l}A", (T + 1, B, H))
    A[1:].copy_to_device(dZ)                         # before the sweep overwrites dZ
    backward_cuda(dZ, lay.S, run.param("W_hh", l), np.ones(T, dZ.dtype), act)
    run.recurrent_adjoint(l, dZ, G, out=A[:T])
    return A


def chains(run, l, lay):
    """truncation's per-layer buffers: A the chains' adjoints, dP = dR a depth's outputs,
    gP = gR their sums (A and the sums zero); no carry"""
    T, B, H = run.T, run.B, run.H
    A, gZ = run.zeros(f"rnn{l}A", (T, B, H)), run.zeros(f"rnn{l}g", (T, B, H))
    dZ, = run.scratch(f"rnn{l}c", [(T, B, H)])
    return SimpleNamespace(A=A, C=None, dP=dZ, dR=dZ, gP=gZ, gR=gZ)


def chain_point(run, l, lay, c, n, act):
    """the pointwise backward of the n live chains (steps 0..n-1) of a depth"""
    rows = n * run.B
    chain_cuda[launch(rows * run.H)](c.A[:n].reshape(rows, run.H), lay.S[1:n + 1].reshape(rows, run.H),
                                     c.dP[:n].reshape(rows, run.H), act)


def initial_grads(dh0, carry):
    return (dh0,)
