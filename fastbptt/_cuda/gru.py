"""The GRU cell ("gru") on the CUDA engine, in PyTorch's (and cuDNN's) form: gates r, z, n,
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
blocks [r | z | n], kept in that natural layout on the device.  The math is the CPU cell's
(:mod:`fastbptt._cpu.gru`).

What the forward keeps for the backward, and why: Z_t = [r_t, z_t, hn_t] (the gates, and hn,
which dr needs and which cannot be recovered from h), N_t = n_t, and h_0..h_T (h_{t-1} for dz
and for ∂W_hh).  The pre-activations are not kept: σ' and tanh' are written with the gates.

On the device: the input projection of all steps is one GEMM (a gather for token ids)
before the loop, into Z = [xr, xz, xn]; :func:`split_cuda` moves xn to N and puts b_hn in
its place.  Each forward step is one GEMM (Z_t += h_{t-1} W_hh) then the pointwise kernel
:func:`forward_point` (one thread per (row, unit)); each backward step the pointwise
kernel :func:`backward_point` then the GEMM A_{t-1} += ξ_t dR_t W_hhᵀ (skipped when ξ_t = 0).
The weight gradients are one GEMM each after the loop.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from numba import cuda

from .products import axpy, gemm, launch, scaled, sigmoid

G = 3
STATES = ("S",)            # the record's state arrays: h_0..h_T


# ------------------------------------------------------------------------ pointwise
@cuda.jit
def forward_point(Z, N, hp, h):
    """one step, every (row, unit):  Z [xr + h W_hr, xz + h W_hz, h W_hn + b_hn] →
    [r, z, hn];  N xn → n;  h = (1 − z) n + z hp

    Z (rows,3H) · N, hp, h (rows,H)"""
    rows, H = N.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, rows * H, stride):
        b, j = idx // H, idx % H
        r = sigmoid(Z[b, j])
        z = sigmoid(Z[b, H + j])
        n = math.tanh(N[b, j] + r * Z[b, 2 * H + j])
        Z[b, j] = r
        Z[b, H + j] = z
        N[b, j] = n
        h[b, j] = (1 - z) * n + z * hp[b, j]


@cuda.jit
def backward_point(A, carry, xi, Z, N, hp, dP, dR):
    """one step (or a block of chains), every (row, unit):  a = A + ξ carry (the adjoint of h;
    A holds the direct term and the product's share, and gets a);  dP, dR as in the module
    notes;  carry ← a ⊙ z (what crosses to h_{t-1} besides the product)

    A, carry, N, hp (rows,H) · Z [r, z, hn], dP, dR (rows,3H) · xi a scalar"""
    rows, H = N.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, rows * H, stride):
        b, j = idx // H, idx % H
        a = A[b, j] + xi * carry[b, j]
        r, z, hn, n = Z[b, j], Z[b, H + j], Z[b, 2 * H + j], N[b, j]
        dn = a * (1 - z) * (1 - n * n)
        dz = a * (hp[b, j] - n) * z * (1 - z)
        dr = dn * hn * r * (1 - r)
        dP[b, j] = dr
        dP[b, H + j] = dz
        dP[b, 2 * H + j] = dn
        dR[b, j] = dr
        dR[b, H + j] = dz
        dR[b, 2 * H + j] = dn * r
        A[b, j] = a
        carry[b, j] = a * z


@cuda.jit
def split_cuda(Z, N, b_hn):
    """after the input projection Z = x W_xh + b_h (rows,3H): N ← its n columns (xn), and
    those columns of Z ← b_hn, the recurrent product's bias · N (rows,H)"""
    rows, H = N.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, rows * H, stride):
        b, j = idx // H, idx % H
        N[b, j] = Z[b, 2 * H + j]
        Z[b, 2 * H + j] = b_hn[j]


# ---------------------------------------------------------------------------- sweeps
def forward_cuda(S, Z, N, W_hh):
    """the steps t = 1..T of the module notes' forward

    S (T+1,B,H) in: h_0; out: h_0..h_T · Z (T,B,3H) in: [xr, xz, b_hn], out: [r, z, hn] ·
    N (T,B,H) in: xn, out: n · W_hh (H,3H)"""
    T, B, H = N.shape
    g = launch(B * H)
    for t in range(T):
        gemm(Z[t], S[t], W_hh, beta=1.0)
        forward_point[g](Z[t], N[t], S[t], S[t + 1])


def backward_cuda(A, carry, S, Z, N, dP, dR, W_hh, xi):
    """the steps t = T..1 of the module notes' backward

    A (T,B,H) in: the direct terms dHs; out: the adjoints a_t · carry (B,H) zero, out:
    a_1 ⊙ z_1 · S, Z, N: the forward's · dP, dR (T,B,3H) out · W_hh (H,3H) · xi (T,) host
    array of ξ_1..ξ_T (a zero skips that crossing's product)"""
    T, B, H = A.shape
    g = launch(B * H)
    for t in range(T - 1, -1, -1):
        x = float(xi[t + 1]) if t + 1 < T else 0.0
        backward_point[g](A[t], carry, x, Z[t], N[t], S[t], dP[t], dR[t])
        if t > 0 and xi[t] != 0:
            gemm(A[t - 1], dR[t], W_hh, tb=True, alpha=float(xi[t]), beta=1.0)


# --------------------------------------------------------------- the graph's calls
# fastbptt._model calls these with a run (fastbptt._cuda.Run); l is the layer.

def forward(run, l, X, state0, act):
    """the layer's forward over the T steps from state0 = (h_0,); X its input (T,B) ids or
    (T,B,D).  Returns what the backward needs: S (T+1,B,H) h_0..h_T, Z, N."""
    T, B, H = run.T, run.B, run.H
    S, Z, N = run.record(f"gru{l}", [(T + 1, B, H), (T, B, G * H), (T, B, H)])
    S[0].copy_to_device(state0[0])
    run.project(X, Z.reshape(T * B, G * H), run.key("W_xh", l), run.param("b_h", l))
    split_cuda[launch(T * B * H)](Z.reshape(T * B, G * H), N.reshape(T * B, H), run.param("b_hn", l))
    forward_cuda(S, Z, N, run.param("W_hh", l))
    return SimpleNamespace(S=S, Z=Z, N=N)


def given(run, l, X, S, state0, act):
    """the forward's record for the caller's states S: the gates are not in S, so the
    forward runs again from X and state0"""
    return forward(run, l, X, state0, act)


def backward(run, l, X, lay, A, act, xi, want_dx, end=None):
    """the full (or randomized) reverse sweep of the layer, given the direct terms A (T,B,H)
    (overwritten with the adjoints a_t) and ``end`` = (∂L/∂h_T,) from the steps after T, or
    None.  Returns (its parameter gradients, (∂L/∂h_0,), ∂L/∂X or None)"""
    T, B, H = A.shape
    if end is not None:
        run.add(A[-1], end[0])
    dP, dR = run.scratch(f"gru{l}d", [(T, B, G * H), (T, B, G * H)])
    carry = run.zeros(f"gru{l}carry", (B, H))
    W_hh = run.param("W_hh", l)
    backward_cuda(A, carry, lay.S, lay.Z, lay.N, dP, dR, W_hh, xi)
    dh0 = run.cross(dR[0], W_hh, xi[0])
    if xi[0] != 0:
        axpy(dh0, float(xi[0]), carry)
    return weight_grads(run, l, X, lay, dP, dR), (dh0,), run.input_adjoint(l, dP, G) if want_dx else None


def adjoints(run, l, X, lay, A, act):
    """(T+1,B,H): ∂L/∂h_0, then the adjoints a_1..a_T that the full sweep leaves in A"""
    _, d0, _ = backward(run, l, X, lay, A, act, np.ones(A.shape[0], A.dtype), False)
    return run.prepended(d0[0], A)


def weight_grads(run, l, X, lay, dP, dR):
    """∂W_xh = Σ x_tᵀ dP_t, ∂b_h = Σ dP_t, ∂W_hh = Σ h_{t-1}ᵀ dR_t, ∂b_hn = Σ dR_t's n columns"""
    H = dP.shape[2] // G
    dW_xh, dW_hh, db_h, dbR = run.weight_grads(X, lay.S, dP, dR)
    db_hn = cuda.device_array(H, dP.dtype)
    db_hn.copy_to_device(dbR[2 * H:])
    return {"W_xh": dW_xh, "W_hh": dW_hh, "b_h": db_h, "b_hn": db_hn}


def chains(run, l, lay):
    """truncation's per-layer buffers: A the chains' adjoints, C their carry, dP, dR a depth's
    outputs, gP, gR their sums (all zero)"""
    T, B, H = run.T, run.B, run.H
    A, C = run.zeros(f"gru{l}A", (T, B, H)), run.zeros(f"gru{l}C", (T, B, H))
    gP, gR = run.zeros(f"gru{l}gP", (T, B, G * H)), run.zeros(f"gru{l}gR", (T, B, G * H))
    dP, dR = run.scratch(f"gru{l}c", [(T, B, G * H)] * 2)
    return SimpleNamespace(A=A, C=C, dP=dP, dR=dR, gP=gP, gR=gR)


def chain_point(run, l, lay, c, n, act):
    """the pointwise backward of the n live chains (steps 0..n-1) of a depth (ξ = 1)"""
    B, H = run.B, run.H
    rows = n * B
    backward_point[launch(rows * H)](
        c.A[:n].reshape(rows, H), c.C[:n].reshape(rows, H), 1.0, lay.Z[:n].reshape(rows, G * H),
        lay.N[:n].reshape(rows, H), lay.S[:n].reshape(rows, H),
        c.dP[:n].reshape(rows, G * H), c.dR[:n].reshape(rows, G * H))


def initial_grads(dh0, carry):
    """the state's gradients from the crossing of step 1: the product's dh0 and the carry"""
    out = scaled(1.0, dh0)
    axpy(out, 1.0, carry)
    return (out,)
