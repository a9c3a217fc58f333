"""The GRU cell ("gru") on the CPU engine, in PyTorch's (and cuDNN's) form: gates r, z, n,
the reset applied after the recurrent product.

    forward   r_t = σ(xr_t + h_{t-1} W_hr),  z_t = σ(xz_t + h_{t-1} W_hz)      x·_t = x_t W_x· + b_·
              hn_t = h_{t-1} W_hn + b_hn,     n_t = tanh(xn_t + r_t ⊙ hn_t)
              h_t = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t-1}
    backward  a_t = dHs_t + ξ_{t+1} (dR_{t+1} W_hhᵀ + a_{t+1} ⊙ z_{t+1})     (the adjoint of h_t)
              dn = a ⊙ (1 − z) ⊙ (1 − n²),   dz = a ⊙ (h_{t-1} − n) ⊙ z (1 − z),
              dr = dn ⊙ hn ⊙ r (1 − r)
              dP_t = [dr, dz, dn]  (the input side's pre-activations: ∂W_xh, ∂b_h)
              dR_t = [dr, dz, dn ⊙ r]  (the recurrent product's: ∂W_hh, ∂b_hn, the chain)

Shapes: x_t (B,D), h_t (B,H); W_xh (D,3H), W_hh (H,3H), b_h (3H,), b_hn (H,) with the column
blocks [r | z | n].  Inside the engine the 3H columns are grouped by lanes
(``products.interleaved``) so that a lane's units own every gate of theirs.

What the forward keeps for the backward, and why: Z_t = [r_t, z_t, hn_t] (the gates, and hn,
which dr needs and which cannot be recovered from h), N_t = n_t, and h_0..h_T (h_{t-1} for dz
and for ∂W_hh).  The pre-activations are not kept: σ' and tanh' are written with the gates.
A step's product adds h_{t-1} W_hh to Z_t, which holds [xr, xz, b_hn] (N_t holds xn); the
pointwise part then turns Z_t and N_t into the gates in place.
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

G = 3
STATES = ("S",)            # the record's state arrays: h_0..h_T


# ------------------------------------------------------------------------ pointwise
@njit(cache=True, fastmath=FASTMATH_POINTWISE, error_model="numpy")
def forward_point(Z, N, hp, h, u0, u1):
    """a lane's units [u0, u1) of one step, every row:  Z [xr + h W_hr, xz + h W_hz,
    h W_hn + b_hn] → [r, z, hn];  N xn → n;  h = (1 − z) n + z hp

    Z (rows,3H) interleaved, the lane's gates in columns [3·u0, 3·u1) · N, hp, h (rows,H)"""
    one = N.dtype.type(1)
    c, m = G * u0, u1 - u0
    if m > 0:
        for b in range(N.shape[0]):
            zr, zz, hn = Z[b, c:c + m], Z[b, c + m:c + 2 * m], Z[b, c + 2 * m:c + 3 * m]
            nn, hpb, hb = N[b, u0:u1], hp[b, u0:u1], h[b, u0:u1]
            for j in range(m):
                r = sigmoid(zr[j])
                z = sigmoid(zz[j])
                n = tanh(nn[j] + r * hn[j])
                zr[j], zz[j], nn[j] = r, z, n
                hb[j] = (one - z) * n + z * hpb[j]


@njit(cache=True, fastmath=FASTMATH_POINTWISE, error_model="numpy")
def backward_point(A, carry, xi, Z, N, hp, dP, dR, u0, u1):
    """a lane's units [u0, u1) of one step, every row:  a = A + ξ carry (the adjoint of h; A
    holds the direct term and the product's share, and gets a);  dP, dR as in the module
    notes;  carry ← a ⊙ z (what crosses to h_{t-1} besides the product)

    A, carry, N, hp (rows,H) · Z [r, z, hn], dP, dR (rows,3H) interleaved, the lane's gates in
    columns [3·u0, 3·u1) · xi a scalar"""
    one = N.dtype.type(1)
    c, m = G * u0, u1 - u0
    if m > 0:
        for b in range(N.shape[0]):
            zr, zz, hn = Z[b, c:c + m], Z[b, c + m:c + 2 * m], Z[b, c + 2 * m:c + 3 * m]
            pr, pz, pn = dP[b, c:c + m], dP[b, c + m:c + 2 * m], dP[b, c + 2 * m:c + 3 * m]
            rr, rz, rn = dR[b, c:c + m], dR[b, c + m:c + 2 * m], dR[b, c + 2 * m:c + 3 * m]
            ab, cb = A[b, u0:u1], carry[b, u0:u1]
            nn, hpb = N[b, u0:u1], hp[b, u0:u1]
            for j in range(m):
                a = ab[j] + xi * cb[j]
                r, z, n = zr[j], zz[j], nn[j]
                dn = a * (one - z) * (one - n * n)
                dz = a * (hpb[j] - n) * z * (one - z)
                dr = dn * hn[j] * r * (one - r)
                pr[j], pz[j], pn[j] = dr, dz, dn
                rr[j], rz[j], rn[j] = dr, dz, dn * r
                ab[j] = a
                cb[j] = a * z


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def split_cpu(Z, N, b_hn, lanes, n):
    """after the input projection Z = x W_xh + b_h (rows,3H): N ← its n columns (xn), and
    those columns of Z ← b_hn, the recurrent product's bias · the lanes of the column order ·
    n row chunks"""
    rows, H = N.shape
    for c in prange(n):
        for b in range(rows * c // n, rows * (c + 1) // n):
            for o in range(lanes):
                u0, u1 = chunk(H, o, lanes)
                k, m = G * u0, u1 - u0
                nb, zb, bb = N[b, u0:u1], Z[b, k + 2 * m:k + 3 * m], b_hn[u0:u1]
                for j in range(m):                  # loops over 1-D slices, which vectorize
                    nb[j] = zb[j]
                for j in range(m):
                    zb[j] = bb[j]


# ---------------------------------------------------------------------------- steps
Forward = namedtuple("GRUForward", "S Z N Wp blk zero0")
Backward = namedtuple("GRUBackward", "A carry xi S Z N dP dR WTp blk")


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _forward_step(ctx, s, r0, r1, j0, j1, k0, k1, last):
    """step s (h_{s+1} from h_s = S[s]) on rows [r0, r1) and units [j0, j1): adds
    h_s[:, k0:k1] W_hh[k0:k1] to the units' gate columns (none at s = 0 when h_0 = 0); with
    last, then the pointwise part"""
    Z, h = ctx.Z[s][r0:r1], ctx.S[s][r0:r1]
    if s > 0 or not ctx.zero0:
        matmul_k(Z, h, ctx.Wp, ctx.S.dtype.type(1), G * j0, G * j1, _0, k0, k1, NO_POST, ctx.blk, ADD)
    if last:
        forward_point(Z, ctx.N[s][r0:r1], h, ctx.S[s + 1][r0:r1], j0, j1)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _backward_step(ctx, s, r0, r1, j0, j1, k0, k1, last):
    """step t = T-1-s (0-based) on rows [r0, r1) and units [j0, j1): adds
    ξ dR_{t+1}[:, units k0:k1] W_hhᵀ to A_t; with last, then the pointwise part.  ξ = 0
    skips the product."""
    T = ctx.A.shape[0]
    t = T - 1 - s
    x = ctx.xi[t + 1] if t + 1 < T else ctx.A.dtype.type(0)
    A = ctx.A[t][r0:r1]
    if x != 0:
        matmul_k(A, ctx.dR[t + 1][r0:r1], ctx.WTp, x, j0, j1, _0, G * k0, G * k1, NO_POST, ctx.blk, ADD)
    if last:
        backward_point(A, ctx.carry[r0:r1], x, ctx.Z[t][r0:r1], ctx.N[t][r0:r1], ctx.S[t][r0:r1],
                       ctx.dP[t][r0:r1], ctx.dR[t][r0:r1], j0, j1)


cell_steps(Forward, _forward_step, Backward, _backward_step)


# ---------------------------------------------------------------------------- sweeps
@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def forward_cpu(S, Z, N, W_hhp, blk, n, threads, zero0):
    """the steps t = 1..T of the module notes' forward

    S (T+1,B,H) in: h_0; out: h_0..h_T · Z (T,B,3H) in: [xr, xz, b_hn], out: [r, z, hn] ·
    N (T,B,H) in: xn, out: n · W_hhp: W_hh (H,3H) interleaved, packed · blk (kc, mc) ·
    n lanes · threads (1: the lanes on this thread, the same sums in the same order) ·
    zero0: h_0 = 0, the first step has no product (see elman.forward_cpu)"""
    run_lanes(Forward(S, Z, N, W_hhp, blk, zero0), Z.shape[0], N.shape[1], N.shape[2], n, threads)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def backward_cpu(A, carry, S, Z, N, dP, dR, W_hhTp, xi, blk, n, threads):
    """the steps t = T..1 of the module notes' backward

    A (T,B,H) in: the direct terms dHs; out: the adjoints a_t · carry (B,H) out: a_1 ⊙ z_1 ·
    S, Z, N: the forward's · dP, dR (T,B,3H) out · W_hhTp: W_hhᵀ (3H,H), rows interleaved,
    packed · xi (T,) ξ_1..ξ_T · blk · n lanes · threads"""
    carry[:] = 0
    run_lanes(Backward(A, carry, xi, S, Z, N, dP, dR, W_hhTp, blk), A.shape[0], A.shape[1], A.shape[2],
              n, threads)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def chain_cpu(A, carry, Z, N, hp, dP, dR, lanes, n):
    """every row of a block of steps at once (truncation's chains): backward_point with ξ = 1,
    each lane's units in turn

    A, carry, N, hp (rows,H) · Z, dP, dR (rows,3H) · the lanes of the column order · n row
    chunks"""
    rows, H = A.shape
    for c in prange(n):
        r0, r1 = rows * c // n, rows * (c + 1) // n
        for o in range(lanes):
            u0, u1 = chunk(H, o, lanes)
            backward_point(A[r0:r1], carry[r0:r1], A.dtype.type(1), Z[r0:r1], N[r0:r1], hp[r0:r1],
                           dP[r0:r1], dR[r0:r1], u0, u1)


# --------------------------------------------------------------- the graph's calls
# fastbptt._model calls these with a run (fastbptt._cpu.Run); l is the layer.

def forward(run, l, X, state0, act):
    """the layer's forward over the T steps from state0 = (h_0,); X its input (T,B) ids or
    (T,B,D).  Returns what the backward needs: S (T+1,B,H) h_0..h_T, Z, N."""
    T, B, H = run.T, run.B, run.H
    cols = run.columns(G)
    S, Z, N = run.record(f"gru{l}", [(T + 1, B, H), (T, B, G * H), (T, B, H)])
    S[0] = state0[0]
    run.project(X, Z.reshape(T * B, G * H), run.key("W_xh", l), run.param("b_h", l), cols)
    split_cpu(Z.reshape(T * B, G * H), N.reshape(T * B, H), run.param("b_hn", l), run.lanes, run.n)
    lanes, blk = run.sweep(B, H)
    W_hhp = run.packed(run.key("W_hh", l), cols=cols)
    forward_cpu(S, Z, N, W_hhp, blk, lanes, run.n, not S[0].any())
    return SimpleNamespace(S=S, Z=Z, N=N)


def backward(run, l, X, lay, A, act, xi, want_dx, end=None):
    """the full (or randomized) reverse sweep of the layer, given the direct terms A (T,B,H)
    (overwritten with the adjoints a_t) and ``end`` = (∂L/∂h_T,) from the steps after T, or
    None.  Returns (its parameter gradients, (∂L/∂h_0,), ∂L/∂X or None)"""
    T, B, H = A.shape
    if end is not None:
        run.add(A[-1], end[0])
    dP, dR, carry = run.scratch(f"gru{l}d", [(T, B, G * H), (T, B, G * H), (B, H)])
    lanes, blk = run.sweep(B, H)
    W_hhTp = run.packed(run.key("W_hh", l), transposed=True, cols=run.columns(G))
    backward_cpu(A, carry, lay.S, lay.Z, lay.N, dP, dR, W_hhTp, xi, blk, lanes, run.n)
    dh0 = run.cross(dR[0], W_hhTp, xi[0])
    dh0 += xi[0] * carry
    return weight_grads(run, l, X, lay, dP, dR), (dh0,), run.input_adjoint(l, dP, G) if want_dx else None


def sweep_probe(dt, B, H, T, rng):
    """fn(blk, lanes, threads): a forward sweep of T steps of B x H on random data, for the
    plan to time (fastbptt._cpu.plan.measure_sweep)"""
    Wp, pre, S, Z = probe_inputs(dt, B, G, H, T, rng)
    N = rng.standard_normal((T, B, H)).astype(dt)

    def fn(blk, lanes, threads):
        Z[:] = pre
        forward_cpu(S, Z, N, Wp, blk, lanes, threads, False)
    return fn


def given(run, l, X, S, state0, act):
    """the forward's record: the gates are not the caller's to give, so the forward runs again"""
    return forward(run, l, X, state0, act)


def adjoints(run, l, X, lay, A, act):
    """(T+1,B,H): ∂L/∂h_0, then the adjoints a_1..a_T that the full sweep leaves in A"""
    _, d0, _ = backward(run, l, X, lay, A, act, np.ones(A.shape[0], A.dtype), False)
    return np.concatenate([d0[0][None], A])


def weight_grads(run, l, X, lay, dP, dR):
    """∂W_xh = Σ x_tᵀ dP_t, ∂b_h = Σ dP_t, ∂W_hh = Σ h_{t-1}ᵀ dR_t, ∂b_hn = Σ dR_t's n columns,
    back in the natural column order"""
    H = run.H
    dW_xh, dW_hh, db_h, dbR = run.weight_grads(X, lay.S, dP, dR, run.columns(G))
    return {"W_xh": dW_xh, "W_hh": dW_hh, "b_h": db_h, "b_hn": dbR[2 * H:].copy()}


def chains(run, l, lay):
    """truncation's per-layer buffers: A the chains' adjoints, C their carry, dP, dR a depth's
    outputs, gP, gR their sums (all zero)"""
    T, B, H = run.T, run.B, run.H
    A, C, dP, dR, gP, gR = run.scratch(f"gru{l}c", [(T, B, H)] * 2 + [(T, B, G * H)] * 4)
    for a in (A, C, gP, gR):
        a[:] = 0
    return SimpleNamespace(A=A, C=C, dP=dP, dR=dR, gP=gP, gR=gR)


def chain_point(run, l, lay, c, n, act):
    """the pointwise backward of the n live chains (steps 0..n-1) of a depth"""
    B, H = run.B, run.H
    rows = n * B
    chain_cpu(c.A[:n].reshape(rows, H), c.C[:n].reshape(rows, H), lay.Z[:n].reshape(rows, G * H),
              lay.N[:n].reshape(rows, H), lay.S[:n].reshape(rows, H),
              c.dP[:n].reshape(rows, G * H), c.dR[:n].reshape(rows, G * H), run.lanes, run.n)


def initial_grads(dh0, carry):
    """the state's gradients from the crossing of step 1: the product's dh0 and the carry"""
    return (dh0 + carry,)
