"""The Elman cell ("rnn") on the CPU engine: its pointwise forward and backward, and its
sweeps, as steps handed to the engine's lane scheduler.

    forward   z_t = pre_t + h_{t-1} W_hh,   h_t = φ(z_t)            pre_t = x_t W_xh + b_h
    backward  a_t = dHs_t + ξ_{t+1} dz_{t+1} W_hhᵀ,   dz_t = a_t ⊙ φ'(z_t)
              φ' written with h = φ(z): tanh 1 − h²,  relu [h > 0],  identity 1

What the backward needs is h_t alone (φ' is a function of it), so the forward keeps
h_0..h_T and nothing else.  A step's product runs on the engine's register tile with
the packed W_hh (or W_hhᵀ); φ (or φ') is the tile's epilogue, applied to each tile
column while it is in L1.  Steps are split by hidden columns: the engine's lanes give
each thread columns [j0, j1) of every step.
"""
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
from numba import njit, prange
from numba.extending import overload

from ..config import ACTIVATIONS, FASTMATH, FASTMATH_POINTWISE
from .fastmath import tanh
from .lanes import cell_steps, run_lanes
from .plan import probe_inputs
from .products import ADD, NO_POST, of_type, _0, epilogue, matmul_k

TANH, RELU, IDENTITY = (ACTIVATIONS[name] for name in ("tanh", "relu", "identity"))


# ------------------------------------------------------------------------ pointwise
@njit(cache=True, fastmath=FASTMATH_POINTWISE, error_model="numpy")
def activate(h, j0, j1, act):
    """h[:, j0:j1] ← φ(h[:, j0:j1]).  Loops run over a slice from 0 so that they vectorize
    (a loop from j0 keeps numba's negative-index check and does not)."""
    zero = h.dtype.type(0)
    for b in range(h.shape[0]):
        z = h[b, j0:j1]
        if act == TANH:
            for j in range(z.shape[0]):
                z[j] = tanh(z[j])
        elif act == RELU:                   # NaN stays NaN, as in torch.relu
            for j in range(z.shape[0]):
                z[j] = zero if z[j] < zero else z[j]


@njit(cache=True, fastmath=FASTMATH_POINTWISE, error_model="numpy")
def dphi(dz, h, j0, j1, act):
    """dz[:, j0:j1] ⊙= φ'(z) written with h = φ(z):  tanh: 1 - h²,  relu: [h > 0],  identity: 1"""
    zero = h.dtype.type(0)
    one = h.dtype.type(1)
    for b in range(h.shape[0]):
        d = dz[b, j0:j1]
        y = h[b, j0:j1]
        if act == TANH:
            for j in range(d.shape[0]):
                d[j] *= one - y[j] * y[j]
        elif act == RELU:                   # 1 where h is NaN, as torch's threshold_backward
            for j in range(d.shape[0]):
                d[j] = zero if y[j] <= zero else d[j]


# The tile's epilogues: φ after the forward product, ⊙ φ'(h) after the backward one.
Activate = namedtuple("ElmanActivate", "act")
Derivative = namedtuple("ElmanDerivative", "h act")


@overload(epilogue, jit_options={"cache": True})
def _epilogue(post, C, m0, m1, j0, j1):
    if of_type(post, Activate):
        return lambda post, C, m0, m1, j0, j1: activate(C[m0:m1], j0, j1, post.act)
    if of_type(post, Derivative):
        return lambda post, C, m0, m1, j0, j1: dphi(C[m0:m1], post.h[m0:m1], j0, j1, post.act)


# ---------------------------------------------------------------------------- steps
# A sweep's context: the states, the packed recurrent weight, the tile's blocking; zero0:
# h_0 = 0, so the first step has no product.
Forward = namedtuple("ElmanForward", "Hx Wp act blk zero0")
Backward = namedtuple("ElmanBackward", "dZ Hx Wp xi act blk")


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _forward_step(ctx, s, r0, r1, j0, j1, k0, k1, last):
    """h_t = φ(pre_t + h_{t-1} W_hh) on rows [r0, r1) and columns [j0, j1), t = s + 1 (Hx[t]
    holds pre_t): adds h_{t-1}[:, k0:k1] W_hh[k0:k1]; with last, then φ (h_1 = φ(pre_1)
    alone when h_0 = 0)"""
    S, t = ctx.Hx, s + 1
    one = S.dtype.type(1)
    C, A = S[t][r0:r1], S[t - 1][r0:r1]
    if s == 0 and ctx.zero0:
        if last:
            activate(C, j0, j1, ctx.act)
    elif last:
        matmul_k(C, A, ctx.Wp, one, j0, j1, _0, k0, k1, Activate(ctx.act), ctx.blk, ADD)
    else:
        matmul_k(C, A, ctx.Wp, one, j0, j1, _0, k0, k1, NO_POST, ctx.blk, ADD)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _backward_step(ctx, s, r0, r1, j0, j1, k0, k1, last):
    """dz_t = (dHs_t + ξ_{t+1} dz_{t+1} W_hhᵀ) ⊙ φ'(h_t) on rows [r0, r1) and columns
    [j0, j1), t = T-1-s (0-based: dZ[t] holds dHs_t): adds ξ_{t+1} dz_{t+1}[:, k0:k1]
    W_hhᵀ[k0:k1]; with last, then ⊙ φ'.  ξ = 0 skips the product."""
    S = ctx.dZ
    t = S.shape[0] - 1 - s
    h = ctx.Hx[t + 1][r0:r1]
    x = ctx.xi[t + 1] if t + 1 < S.shape[0] else S.dtype.type(0)
    C = S[t][r0:r1]
    if x == 0:
        if last:
            dphi(C, h, j0, j1, ctx.act)
    elif last:
        matmul_k(C, S[t + 1][r0:r1], ctx.Wp, x, j0, j1, _0, k0, k1, Derivative(h, ctx.act), ctx.blk, ADD)
    else:
        matmul_k(C, S[t + 1][r0:r1], ctx.Wp, x, j0, j1, _0, k0, k1, NO_POST, ctx.blk, ADD)


cell_steps(Forward, _forward_step, Backward, _backward_step)


# ---------------------------------------------------------------------------- sweeps
@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def forward_cpu(Hx, W_hhp, act, blk, n, threads, zero0):
    """h_t = φ(pre_t + h_{t-1} W_hh),  t = 1..T   (pre_t = x_t W_xh + b_h, precomputed)

    Hx (T+1,B,H) in: h_0, pre_1..pre_T; out: h_0..h_T · W_hhp: W_hh (H,H) packed ·
    act 0=tanh 1=relu 2=identity · blk (kc, mc) · n lanes · threads: 1 runs the lanes on
    this thread (the same sums in the same order: the same results) · zero0: h_0 = 0, the
    first step has no product.  h_0 sits in front of h_1..h_T so that ∂W_hh is one product
    over Hx[:T].  (The first step is the sweep's own even then: a pointwise function called
    on its own as well would be a second copy of it in another cached library, and which
    copy runs would depend on which kernel a process loaded first.)
    """
    run_lanes(Forward(Hx, W_hhp, act, blk, zero0), Hx.shape[0] - 1, Hx.shape[1], Hx.shape[2], n, threads)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def backward_cpu(dZ, Hx, W_hhTp, xi, act, blk, n, threads):
    """Reverse sweep, t = T..1:  a_t = dHs_t + ξ_{t+1} dz_{t+1} W_hhᵀ,  dz_t = a_t ⊙ φ'(h_t)
    (the crossing into h_0, ξ_1 · dz_1 W_hhᵀ, is the caller's: Run.cross).

    dZ (T,B,H) in: dHs (the head's ∂L/∂h_t), out: dz_t · Hx (T+1,B,H) h_0..h_T · W_hhTp:
    W_hhᵀ packed · xi (T,) ξ_1..ξ_T (all ones: full gradient; {0, 1/p}: randomized
    truncation) · act · blk (kc, mc) · n lanes · threads (as forward_cpu).
    """
    run_lanes(Backward(dZ, Hx, W_hhTp, xi, act, blk), dZ.shape[0], dZ.shape[1], dZ.shape[2], n, threads)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def chain_cpu(A, h, dZ, act, n):
    """every row of a block of steps at once (truncation's chains): dZ = A ⊙ φ'(h)

    A, h, dZ (rows,H) · act · n row chunks"""
    rows, H = A.shape
    for c in prange(n):
        for r in range(rows * c // n, rows * (c + 1) // n):
            dZ[r] = A[r]
        dphi(dZ[rows * c // n:rows * (c + 1) // n], h[rows * c // n:rows * (c + 1) // n], 0, H, act)


# --------------------------------------------------------------- the graph's calls
# fastbptt._model calls these with a run (fastbptt._cpu.Run); l is the layer.
G = 1
STATES = ("S",)            # the record's state arrays: h_0..h_T


def forward(run, l, X, state0, act):
    """the layer's forward over the T steps from state0 = (h_0,); X its input (T,B) ids or
    (T,B,D).  Returns what the backward needs: S (T+1,B,H) h_0..h_T.  With h_0 = 0 the first
    step has no product: h_1 = φ(pre_1)."""
    T, B, H = run.T, run.B, run.H
    S, = run.record(f"rnn{l}", [(T + 1, B, H)])
    S[0] = state0[0]
    run.project(X, S[1:].reshape(T * B, H), run.key("W_xh", l), run.param("b_h", l))
    lanes, blk = run.sweep(B, H)
    W_hhp = run.packed(run.key("W_hh", l))
    forward_cpu(S, W_hhp, act, blk, lanes, run.n, not S[0].any())
    return SimpleNamespace(S=S)


def sweep_probe(dt, B, H, T, rng):
    """fn(blk, lanes, threads): a forward sweep of T steps of B x H on random data, for the
    plan to time (fastbptt._cpu.plan.measure_sweep)"""
    Wp, pre, Hx, _ = probe_inputs(dt, B, 1, H, T, rng)

    def fn(blk, lanes, threads):
        Hx[1:] = pre
        forward_cpu(Hx, Wp, 0, blk, lanes, threads, False)
    return fn


def given(run, l, X, S, state0, act):
    """the forward's record from the caller's states S (T+1,B,H) h_0..h_T"""
    return SimpleNamespace(S=S)


def backward(run, l, X, lay, dZ, act, xi, want_dx, end=None):
    """the full (or randomized) reverse sweep of the layer: dZ (T,B,H) in: the direct terms
    ∂l_t/∂h_t; out: dz_t.  ``end``: (∂L/∂h_T,) from the steps after T, or None.  Returns (its
    parameter gradients, (∂L/∂h_0,), ∂L/∂X or None)"""
    if end is not None:
        run.add(dZ[-1], end[0])
    W_hhTp = run.packed(run.key("W_hh", l), transposed=True)
    lanes, blk = run.sweep(dZ.shape[1], dZ.shape[2])
    backward_cpu(dZ, lay.S, W_hhTp, xi, act, blk, lanes, run.n)
    return (weight_grads(run, l, X, lay, dZ, dZ), (run.cross(dZ[0], W_hhTp, xi[0]),),
            run.input_adjoint(l, dZ, G) if want_dx else None)


def weight_grads(run, l, X, lay, dP, dR):
    """∂W_xh = Σ x_tᵀ dz_t, ∂W_hh = Σ h_{t-1}ᵀ dz_t, ∂b_h = Σ dz_t (dP and dR are the same dz)"""
    dW_xh, dW_hh, db_h, _ = run.weight_grads(X, lay.S, dP, dR)
    return {"W_xh": dW_xh, "W_hh": dW_hh, "b_h": db_h}


def adjoints(run, l, X, lay, dZ, act):
    """A (T+1,B,H) = ∂L/∂h_0..∂L/∂h_T of the full gradient: a_t = dHs_t + dz_{t+1} W_hhᵀ"""
    T, B, H = dZ.shape
    A = np.zeros((T + 1, B, H), dZ.dtype)
    A[1:] = dZ
    lanes, blk = run.sweep(B, H)
    backward_cpu(dZ, lay.S, run.packed(run.key("W_hh", l), transposed=True),
                 np.ones(T, dZ.dtype), act, blk, lanes, run.n)
    run.recurrent_adjoint(l, dZ, G, out=A[:T])
    return A


def chains(run, l, lay):
    """truncation's per-layer buffers: A the chains' adjoints, dP = dR a depth's outputs,
    gP = gR their sums (A and the sums zero); no carry"""
    T, B, H = run.T, run.B, run.H
    A, dZ, gZ = run.scratch(f"rnn{l}c", [(T, B, H)] * 3)
    A[:] = 0
    gZ[:] = 0
    return SimpleNamespace(A=A, C=None, dP=dZ, dR=dZ, gP=gZ, gR=gZ)


def chain_point(run, l, lay, c, n, act):
    """the pointwise backward of the n live chains (steps 0..n-1) of a depth"""
    rows = n * run.B
    chain_cpu(c.A[:n].reshape(rows, run.H), lay.S[1:n + 1].reshape(rows, run.H),
              c.dP[:n].reshape(rows, run.H), act, run.n)


def initial_grads(dh0, carry):
    return (dh0,)
