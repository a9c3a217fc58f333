"""The LSTM cell ("lstm") on the CUDA engine, in PyTorch's (and cuDNN's) form: gates i, f, g, o
and an (h, c) state.

    forward   [i, f, g, o]_t = [σ, σ, tanh, σ](x_t W_xh + b_h + h_{t-1} W_hh)
              c_t = f ⊙ c_{t-1} + i ⊙ g,   h_t = o ⊙ tanh(c_t)
    backward  a_t = dHs_t + ξ_{t+1} dZ_{t+1} W_hhᵀ                  (the adjoint of h_t)
              e_t = ξ_{t+1} e'_{t+1} + dCs_t + a_t ⊙ o ⊙ (1 − tanh²c_t)   (the adjoint of c_t;
                           e'_{t+1} = e_{t+1} ⊙ f_{t+1} is the carry, dCs_t c_t's direct term)
              dZ_t = [e g i(1−i), e c_{t-1} f(1−f), e i (1−g²), a tanh(c_t) o(1−o)]

Shapes: x_t (B,D), h_t, c_t (B,H); W_xh (D,4H), W_hh (H,4H), b_h (4H,) with the column blocks
[i | f | g | o], kept in that natural layout on the device.  The math is the CPU cell's
(:mod:`fastbptt._cpu.lstm`).

What the forward keeps for the backward, and why: Z_t = the gates (σ' and tanh' are written
with them), c_0..c_T (c_{t-1} for df, c_t for tanh(c_t), recomputed rather than kept) and
h_0..h_T (h_{t-1} for ∂W_hh).  dZ_t serves the input side and the recurrent product alike
(one bias), so dP and dR are one array.

On the device: the input projection of all steps is one GEMM (a gather for token ids)
before the loop, into Z.  Each forward step is one GEMM (Z_t += h_{t-1} W_hh) then the
pointwise kernel :func:`forward_point` (one thread per (row, unit)); each backward step the
pointwise kernel :func:`backward_point` then the GEMM A_{t-1} += ξ_t dZ_t W_hhᵀ (skipped
when ξ_t = 0).  The weight gradients are one GEMM each after the loop.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from numba import cuda

from .products import gemm, launch, scaled, sigmoid

G = 4
STATES = ("S", "C")        # the record's state arrays: h_0..h_T, c_0..c_T


# ------------------------------------------------------------------------ pointwise
@cuda.jit
def forward_point(Z, cp, c, h):
    """one step, every (row, unit):  Z pre-activations → [i, f, g, o];  c = f cp + i g;
    h = o tanh(c)

    Z (rows,4H) · cp, c, h (rows,H)"""
    rows, H = c.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, rows * H, stride):
        b, j = idx // H, idx % H
        i = sigmoid(Z[b, j])
        f = sigmoid(Z[b, H + j])
        g = math.tanh(Z[b, 2 * H + j])
        o = sigmoid(Z[b, 3 * H + j])
        Z[b, j] = i
        Z[b, H + j] = f
        Z[b, 2 * H + j] = g
        Z[b, 3 * H + j] = o
        cj = f * cp[b, j] + i * g
        c[b, j] = cj
        h[b, j] = o * math.tanh(cj)


@cuda.jit
def backward_point(A, carry, xi, D, Z, cp, c, dZ):
    """one step (or a block of chains), every (row, unit):  A the adjoint of h;
    e = ξ carry + d + a o (1 − tanh²c);  dZ as in the module notes;  carry ← e ⊙ f (what
    crosses to c_{t-1})

    A, carry, cp, c (rows,H) · D (rows,H) c's direct terms d, or (1,H): the same for every row
    (zeros: none) · Z [i, f, g, o], dZ (rows,4H) · xi a scalar"""
    rows, H = c.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, rows * H, stride):
        b, j = idx // H, idx % H
        i, f, g, o = Z[b, j], Z[b, H + j], Z[b, 2 * H + j], Z[b, 3 * H + j]
        a = A[b, j]
        tc = math.tanh(c[b, j])
        e = xi * carry[b, j] + D[min(b, D.shape[0] - 1), j] + a * o * (1 - tc * tc)
        dZ[b, j] = e * g * i * (1 - i)
        dZ[b, H + j] = e * cp[b, j] * f * (1 - f)
        dZ[b, 2 * H + j] = e * i * (1 - g * g)
        dZ[b, 3 * H + j] = a * tc * o * (1 - o)
        carry[b, j] = e * f


# ---------------------------------------------------------------------------- sweeps
def forward_cuda(S, C, Z, W_hh):
    """the steps t = 1..T of the module notes' forward

    S, C (T+1,B,H) in: h_0, c_0; out: h_0..h_T, c_0..c_T · Z (T,B,4H) in: x_t W_xh + b_h,
    out: the gates · W_hh (H,4H)"""
    T, B, H = Z.shape[0], S.shape[1], S.shape[2]
    g = launch(B * H)
    for t in range(T):
        gemm(Z[t], S[t], W_hh, beta=1.0)
        forward_point[g](Z[t], C[t], C[t + 1], S[t + 1])


def backward_cuda(A, carry, dC, C, Z, dZ, W_hh, xi):
    """the steps t = T..1 of the module notes' backward

    A (T,B,H) in: the direct terms dHs; out: the adjoints a_t · carry (B,H) in: ∂L/∂c_T from
    beyond the sweep (zero: none), out: e_1 ⊙ f_1 · dC (T,B,H) the direct terms dCs, or
    (1,1,H) zeros for none · C, Z: the forward's · dZ (T,B,4H) out · W_hh (H,4H) · xi (T,)
    host array of ξ_1..ξ_T (a zero skips that crossing's product)"""
    T, B, H = A.shape
    g = launch(B * H)
    for t in range(T - 1, -1, -1):
        x = float(xi[t + 1]) if t + 1 < T else 1.0        # at T: the carry from beyond, as it is
        D = dC[min(t, dC.shape[0] - 1)]
        backward_point[g](A[t], carry, x, D, Z[t], C[t], C[t + 1], dZ[t])
        if t > 0 and xi[t] != 0:
            gemm(A[t - 1], dZ[t], W_hh, tb=True, alpha=float(xi[t]), beta=1.0)


# --------------------------------------------------------------- the graph's calls
# fastbptt._model calls these with a run (fastbptt._cuda.Run); l is the layer.

def forward(run, l, X, state0, act):
    """the layer's forward over the T steps from state0 = (h_0, c_0); X its input (T,B) ids or
    (T,B,D).  Returns what the backward needs: S, C (T+1,B,H), Z."""
    T, B, H = run.T, run.B, run.H
    S, C, Z = run.record(f"lstm{l}", [(T + 1, B, H), (T + 1, B, H), (T, B, G * H)])
    S[0].copy_to_device(state0[0])
    C[0].copy_to_device(state0[1])
    run.project(X, Z.reshape(T * B, G * H), run.key("W_xh", l), run.param("b_h", l))
    forward_cuda(S, C, Z, run.param("W_hh", l))
    return SimpleNamespace(S=S, C=C, Z=Z)


def given(run, l, X, S, state0, act):
    """the forward's record for the caller's states S: the gates and c are not in S, so the
    forward runs again from X and state0"""
    return forward(run, l, X, state0, act)


def backward(run, l, X, lay, A, act, xi, want_dx, end=None, dC=None):
    """the full (or randomized) reverse sweep of the layer, given the direct terms A (T,B,H)
    (overwritten with the adjoints a_t), ``end`` = (∂L/∂h_T, ∂L/∂c_T) from the steps after
    T, or None, and c's direct terms dC (T,B,H), or None.  Returns (its parameter gradients,
    (∂L/∂h_0, ∂L/∂c_0), ∂L/∂X or None)"""
    T, B, H = A.shape
    dZ, = run.scratch(f"lstm{l}d", [(T, B, G * H)])
    carry = run.zeros(f"lstm{l}carry", (B, H))
    if end is not None:
        run.add(A[-1], end[0])
        run.add(carry, end[1])
    W_hh = run.param("W_hh", l)
    dC = run.zeros("lstm none", (1, 1, H)) if dC is None else dC
    backward_cuda(A, carry, dC, lay.C, lay.Z, dZ, W_hh, xi)
    dc0 = scaled(float(xi[0]), carry)
    return (weight_grads(run, l, X, lay, dZ, dZ), (run.cross(dZ[0], W_hh, xi[0]), dc0),
            run.input_adjoint(l, dZ, G) if want_dx else None)


def adjoints(run, l, X, lay, A, act):
    """(T+1,B,H): ∂L/∂h_0, then the adjoints a_1..a_T that the full sweep leaves in A"""
    _, d0, _ = backward(run, l, X, lay, A, act, np.ones(A.shape[0], A.dtype), False)
    return run.prepended(d0[0], A)


def weight_grads(run, l, X, lay, dP, dR):
    """∂W_xh = Σ x_tᵀ dZ_t, ∂W_hh = Σ h_{t-1}ᵀ dZ_t, ∂b_h = Σ dZ_t (dP and dR are the same dZ)"""
    dW_xh, dW_hh, db_h, _ = run.weight_grads(X, lay.S, dP, dR)
    return {"W_xh": dW_xh, "W_hh": dW_hh, "b_h": db_h}


def chains(run, l, lay):
    """truncation's per-layer buffers: A the chains' adjoints, C their carry, dP = dR a depth's
    outputs, gP = gR their sums (A, C and the sums zero), none a (1,H) row of zeros (the
    pointwise part's direct terms of c: the chains' start in their carry)"""
    T, B, H = run.T, run.B, run.H
    A, C = run.zeros(f"lstm{l}A", (T, B, H)), run.zeros(f"lstm{l}C", (T, B, H))
    gZ = run.zeros(f"lstm{l}g", (T, B, G * H))
    dZ, = run.scratch(f"lstm{l}c", [(T, B, G * H)])
    return SimpleNamespace(A=A, C=C, dP=dZ, dR=dZ, gP=gZ, gR=gZ, none=run.zeros(f"lstm{l}none", (1, H)))


def chain_point(run, l, lay, c, n, act):
    """the pointwise backward of the n live chains (steps 0..n-1) of a depth (ξ = 1; their
    direct terms of c start in their carry)"""
    B, H = run.B, run.H
    rows = n * B
    backward_point[launch(rows * H)](
        c.A[:n].reshape(rows, H), c.C[:n].reshape(rows, H), 1.0, c.none,
        lay.Z[:n].reshape(rows, G * H), lay.C[:n].reshape(rows, H), lay.C[1:n + 1].reshape(rows, H),
        c.dP[:n].reshape(rows, G * H))


def initial_grads(dh0, carry):
    """the state's gradients from the crossing of step 1: the product's dh0, and the carry"""
    return (dh0, carry)
