"""The LSTM cell ("lstm") on the CPU engine, in PyTorch's (and cuDNN's) form: gates i, f, g, o
and an (h, c) state.

    forward   [i, f, g, o]_t = [σ, σ, tanh, σ](x_t W_xh + b_h + h_{t-1} W_hh)
              c_t = f ⊙ c_{t-1} + i ⊙ g,   h_t = o ⊙ tanh(c_t)
    backward  a_t = dHs_t + ξ_{t+1} dZ_{t+1} W_hhᵀ                  (the adjoint of h_t)
              e_t = ξ_{t+1} e'_{t+1} + dCs_t + a_t ⊙ o ⊙ (1 − tanh²c_t)   (the adjoint of c_t;
                           e'_{t+1} = e_{t+1} ⊙ f_{t+1} is the carry, dCs_t c_t's direct term)
              dZ_t = [e g i(1−i), e c_{t-1} f(1−f), e i (1−g²), a tanh(c_t) o(1−o)]

Shapes: x_t (B,D), h_t, c_t (B,H); W_xh (D,4H), W_hh (H,4H), b_h (4H,) with the column blocks
[i | f | g | o].  Inside the engine the 4H columns are grouped by lanes
(``products.interleaved``) so that a lane's units own every gate of theirs.

What the forward keeps for the backward, and why: Z_t = the gates (σ' and tanh' are written
with them), c_0..c_T (c_{t-1} for df, c_t for tanh(c_t), recomputed rather than kept) and
h_0..h_T (h_{t-1} for ∂W_hh).  dZ_t serves the input side and the recurrent product alike
(one bias), so dP and dR are one array.
"""
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
from numba import njit, prange

from ..config import FASTMATH, FASTMATH_POINTWISE
from .fastmath import sigmoid, tanh
from .lanes import cell_steps, run_lanes
from .plan import probe_inputs
from .products import ADD, NO_POST, _0, chunk, matmul_k

G = 4
STATES = ("S", "C")        # the record's state arrays: h_0..h_T, c_0..c_T


# ------------------------------------------------------------------------ pointwise
@njit(cache=True, fastmath=FASTMATH_POINTWISE, error_model="numpy")
def forward_point(Z, cp, c, h, u0, u1):
    """a lane's units [u0, u1) of one step, every row:  Z pre-activations → [i, f, g, o];
    c = f cp + i g;  h = o tanh(c)

    Z (rows,4H) interleaved, the lane's gates in columns [4·u0, 4·u1) · cp, c, h (rows,H)"""
    k, m = G * u0, u1 - u0
    if m > 0:
        for b in range(c.shape[0]):
            zi, zf = Z[b, k:k + m], Z[b, k + m:k + 2 * m]
            zg, zo = Z[b, k + 2 * m:k + 3 * m], Z[b, k + 3 * m:k + 4 * m]
            cpb, cb, hb = cp[b, u0:u1], c[b, u0:u1], h[b, u0:u1]
            for j in range(m):
                i = sigmoid(zi[j])
                f = sigmoid(zf[j])
                g = tanh(zg[j])
                o = sigmoid(zo[j])
                zi[j], zf[j], zg[j], zo[j] = i, f, g, o
                cj = f * cpb[j] + i * g
                cb[j] = cj
                hb[j] = o * tanh(cj)


@njit(cache=True, fastmath=FASTMATH_POINTWISE, error_model="numpy")
def backward_point(A, carry, xi, D, Z, cp, c, dZ, u0, u1):
    """a lane's units [u0, u1) of one step, every row:  A the adjoint of h;  e = ξ carry + d +
    a o (1 − tanh²c);  dZ as in the module notes;  carry ← e ⊙ f (what crosses to c_{t-1})

    A, carry, cp, c (rows,H) · D (rows,H) c's direct terms d, or (1,H): the same for every row
    (zeros: none) · Z [i, f, g, o], dZ (rows,4H) interleaved, the lane's gates in columns
    [4·u0, 4·u1) · xi a scalar"""
    one = c.dtype.type(1)
    k, m = G * u0, u1 - u0
    if m > 0:
        for b in range(c.shape[0]):
            zi, zf = Z[b, k:k + m], Z[b, k + m:k + 2 * m]
            zg, zo = Z[b, k + 2 * m:k + 3 * m], Z[b, k + 3 * m:k + 4 * m]
            di, df = dZ[b, k:k + m], dZ[b, k + m:k + 2 * m]
            dg, do = dZ[b, k + 2 * m:k + 3 * m], dZ[b, k + 3 * m:k + 4 * m]
            ab, cab = A[b, u0:u1], carry[b, u0:u1]
            cpb, cb, db = cp[b, u0:u1], c[b, u0:u1], D[min(b, D.shape[0] - 1), u0:u1]
            for j in range(m):
                i, f, g, o = zi[j], zf[j], zg[j], zo[j]
                a = ab[j]
                tc = tanh(cb[j])
                e = xi * cab[j] + db[j] + a * o * (one - tc * tc)
                di[j] = e * g * i * (one - i)
                df[j] = e * cpb[j] * f * (one - f)
                dg[j] = e * i * (one - g * g)
                do[j] = a * tc * o * (one - o)
                cab[j] = e * f


# ---------------------------------------------------------------------------- steps
Forward = namedtuple("LSTMForward", "S C Z Wp blk zero0")
Backward = namedtuple("LSTMBackward", "A carry xi dC C Z dZ WTp blk")


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _forward_step(ctx, s, r0, r1, j0, j1, k0, k1, last):
    """step s ((h, c)_{s+1} from (h, c)_s) on rows [r0, r1) and units [j0, j1): adds
    h_s[:, k0:k1] W_hh[k0:k1] to the units' gate columns (none at s = 0 when h_0 = 0); with
    last, then the pointwise part"""
    Z = ctx.Z[s][r0:r1]
    if s > 0 or not ctx.zero0:
        matmul_k(Z, ctx.S[s][r0:r1], ctx.Wp, ctx.S.dtype.type(1), G * j0, G * j1, _0, k0, k1, NO_POST, ctx.blk,
                 ADD)
    if last:
        forward_point(Z, ctx.C[s][r0:r1], ctx.C[s + 1][r0:r1], ctx.S[s + 1][r0:r1], j0, j1)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _backward_step(ctx, s, r0, r1, j0, j1, k0, k1, last):
    """step t = T-1-s (0-based) on rows [r0, r1) and units [j0, j1): adds
    ξ dZ_{t+1}[:, units k0:k1] W_hhᵀ to A_t; with last, then the pointwise part.  ξ = 0
    skips the product.  At t = T-1 the carry is ∂L/∂c_T from beyond the sweep, taken as it
    is (ξ = 1).  dC: c's direct terms (T,B,H), or (1,1,H) zeros for none."""
    T = ctx.A.shape[0]
    t = T - 1 - s
    x = ctx.xi[t + 1] if t + 1 < T else ctx.A.dtype.type(1)
    A = ctx.A[t][r0:r1]
    if t + 1 < T and x != 0:
        matmul_k(A, ctx.dZ[t + 1][r0:r1], ctx.WTp, x, j0, j1, _0, G * k0, G * k1, NO_POST, ctx.blk, ADD)
    if last:
        D = ctx.dC[min(t, ctx.dC.shape[0] - 1)]
        D = D[r0:r1] if D.shape[0] > 1 else D                 # (1,H): every row's
        backward_point(A, ctx.carry[r0:r1], x, D, ctx.Z[t][r0:r1], ctx.C[t][r0:r1], ctx.C[t + 1][r0:r1],
                       ctx.dZ[t][r0:r1], j0, j1)


cell_steps(Forward, _forward_step, Backward, _backward_step)


# ---------------------------------------------------------------------------- sweeps
@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def forward_cpu(S, C, Z, W_hhp, blk, n, threads, zero0):
    """the steps t = 1..T of the module notes' forward

    S, C (T+1,B,H) in: h_0, c_0; out: h_0..h_T, c_0..c_T · Z (T,B,4H) in: x_t W_xh + b_h,
    out: the gates · W_hhp: W_hh (H,4H) interleaved, packed · blk (kc, mc) · n lanes ·
    threads (1: the lanes on this thread, the same sums in the same order) · zero0: h_0 = 0,
    the first step has no product (see elman.forward_cpu)"""
    run_lanes(Forward(S, C, Z, W_hhp, blk, zero0), Z.shape[0], S.shape[1], S.shape[2], n, threads)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def backward_cpu(A, carry, dC, C, Z, dZ, W_hhTp, xi, blk, n, threads):
    """the steps t = T..1 of the module notes' backward

    A (T,B,H) in: the direct terms dHs; out: the adjoints a_t · carry (B,H) in: ∂L/∂c_T from
    beyond the sweep (zero: none); out: e_1 ⊙ f_1 · dC (T,B,H) the direct terms dCs, or
    (1,1,H) zeros for none · C, Z: the forward's · dZ (T,B,4H) out · W_hhTp: W_hhᵀ (4H,H),
    rows interleaved, packed · xi (T,) ξ_1..ξ_T · blk · n lanes · threads"""
    run_lanes(Backward(A, carry, xi, dC, C, Z, dZ, W_hhTp, blk), A.shape[0], A.shape[1], A.shape[2], n,
              threads)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def chain_cpu(A, carry, Z, cp, c, dZ, none, lanes, n):
    """every row of a block of steps at once (truncation's chains, whose direct terms of c
    start in their carry): backward_point with ξ = 1, each lane's units in turn

    A, carry, cp, c (rows,H) · Z, dZ (rows,4H) · none (1,H) zeros · the lanes of the column
    order · n row chunks"""
    rows, H = A.shape
    for k in prange(n):
        r0, r1 = rows * k // n, rows * (k + 1) // n
        for o in range(lanes):
            u0, u1 = chunk(H, o, lanes)
            backward_point(A[r0:r1], carry[r0:r1], A.dtype.type(1), none, Z[r0:r1], cp[r0:r1], c[r0:r1],
                           dZ[r0:r1], u0, u1)


# --------------------------------------------------------------- the graph's calls
# fastbptt._model calls these with a run (fastbptt._cpu.Run); l is the layer.

def forward(run, l, X, state0, act):
    """the layer's forward over the T steps from state0 = (h_0, c_0); X its input (T,B) ids or
    (T,B,D).  Returns what the backward needs: S, C (T+1,B,H), Z."""
    T, B, H = run.T, run.B, run.H
    cols = run.columns(G)
    S, C, Z = run.record(f"lstm{l}", [(T + 1, B, H), (T + 1, B, H), (T, B, G * H)])
    S[0], C[0] = state0
    run.project(X, Z.reshape(T * B, G * H), run.key("W_xh", l), run.param("b_h", l), cols)
    lanes, blk = run.sweep(B, H)
    forward_cpu(S, C, Z, run.packed(run.key("W_hh", l), cols=cols), blk, lanes, run.n, not S[0].any())
    return SimpleNamespace(S=S, C=C, Z=Z)


def backward(run, l, X, lay, A, act, xi, want_dx, end=None, dC=None):
    """the full (or randomized) reverse sweep of the layer, given the direct terms A (T,B,H)
    (overwritten with the adjoints a_t), ``end`` = (∂L/∂h_T, ∂L/∂c_T) from the steps after
    T, or None, and c's direct terms dC (T,B,H), or None.  Returns (its parameter gradients,
    (∂L/∂h_0, ∂L/∂c_0), ∂L/∂X or None)"""
    T, B, H = A.shape
    dZ, carry = run.scratch(f"lstm{l}d", [(T, B, G * H), (B, H)])
    carry[:] = 0
    if end is not None:
        run.add(A[-1], end[0])
        run.add(carry, end[1])
    lanes, blk = run.sweep(B, H)
    W_hhTp = run.packed(run.key("W_hh", l), transposed=True, cols=run.columns(G))
    dC = run.zeros("lstm none", (1, 1, H)) if dC is None else dC        # units in their own order
    backward_cpu(A, carry, dC, lay.C, lay.Z, dZ, W_hhTp, xi, blk, lanes, run.n)
    dc0 = xi[0] * carry
    return (weight_grads(run, l, X, lay, dZ, dZ), (run.cross(dZ[0], W_hhTp, xi[0]), dc0),
            run.input_adjoint(l, dZ, G) if want_dx else None)


def sweep_probe(dt, B, H, T, rng):
    """fn(blk, lanes, threads): a forward sweep of T steps of B x H on random data, for the
    plan to time (fastbptt._cpu.plan.measure_sweep)"""
    Wp, pre, S, Z = probe_inputs(dt, B, G, H, T, rng)
    C = np.zeros_like(S)

    def fn(blk, lanes, threads):
        Z[:] = pre
        forward_cpu(S, C, Z, Wp, blk, lanes, threads, False)
    return fn


def given(run, l, X, S, state0, act):
    """the forward's record: the gates are not the caller's to give, so the forward runs again"""
    return forward(run, l, X, state0, act)


def adjoints(run, l, X, lay, A, act):
    """(T+1,B,H): ∂L/∂h_0, then the adjoints a_1..a_T that the full sweep leaves in A"""
    _, d0, _ = backward(run, l, X, lay, A, act, np.ones(A.shape[0], A.dtype), False)
    return np.concatenate([d0[0][None], A])


def weight_grads(run, l, X, lay, dP, dR):
    """∂W_xh = Σ x_tᵀ dZ_t, ∂W_hh = Σ h_{t-1}ᵀ dZ_t, ∂b_h = Σ dZ_t, back in the natural column
    order (dP and dR are the same dZ)"""
    cols = run.columns(G)
    dW_xh, dW_hh, db_h, _ = run.weight_grads(X, lay.S, dP, dR, cols)
    return {"W_xh": dW_xh, "W_hh": dW_hh, "b_h": db_h}


def chains(run, l, lay):
    """truncation's per-layer buffers: A the chains' adjoints, C their carry, dP = dR a depth's
    outputs, gP = gR their sums (A, C and the sums zero), none a (1,H) row of zeros (the
    pointwise part's direct terms of c: the chains' start in their carry)"""
    T, B, H = run.T, run.B, run.H
    A, C, dZ, gZ = run.scratch(f"lstm{l}c", [(T, B, H)] * 2 + [(T, B, G * H)] * 2)
    for a in (A, C, gZ):
        a[:] = 0
    return SimpleNamespace(A=A, C=C, dP=dZ, dR=dZ, gP=gZ, gR=gZ, none=run.zeros(f"lstm{l}none", (1, H)))


def chain_point(run, l, lay, c, n, act):
    """the pointwise backward of the n live chains (steps 0..n-1) of a depth"""
    B, H = run.B, run.H
    rows = n * B
    chain_cpu(c.A[:n].reshape(rows, H), c.C[:n].reshape(rows, H), lay.Z[:n].reshape(rows, G * H),
              lay.C[:n].reshape(rows, H), lay.C[1:n + 1].reshape(rows, H),
              c.dP[:n].reshape(rows, G * H), c.none, run.lanes, run.n)


def initial_grads(dh0, carry):
    """the state's gradients from the crossing of step 1: the product's dh0, and the carry"""
    return (dh0, carry)
