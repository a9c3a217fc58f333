"""The softmax cross-entropy head of the CPU engine, over all N = T·B rows at once.

    o = H W_hq + b_q                      H (N,H)  o (N,Q)
    L = scale · Σ_n (logsumexp(o_n) − o_n[y_n])
    do = scale · (softmax(o) − onehot(y));  ∂W_hq = Hᵀ do,  ∂b_q = Σ_n do_n,  dH = do W_hqᵀ

Rows are independent: each thread takes a chunk of rows through the logits, the fused
softmax-CE and dH, and packs its rows of do for ∂W_hq, which is then one product over
all rows.  Each row's loss is kept and summed in row order, so the loss does not depend
on how the rows were split (the caller sums them: numba would split a sum in a
parallel kernel by thread).
"""
import numpy as np
from numba import njit, prange

from ..config import FASTMATH
from .fastmath import exp
from .products import NO_POST, OVERWRITE, PANEL, _0, chunk, column_sums, matmul, row_chunk


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _softmax_row(o, b_q):
    """o ← exp(o + b_q - m) with m = max(o + b_q); returns (m, Σ exp) so logsumexp = m + log Σ

    o (Q,) in/out · b_q (Q,)
    """
    Q = o.shape[0]
    m = o[0] + b_q[0]
    for q in range(Q):
        o[q] += b_q[q]
        m = o[q] if o[q] > m else m
    s = 0.0
    for q in range(Q):
        e = exp(o[q] - m)
        o[q] = e
        s += e
    return m, s


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _head_rows(row_loss, logits, Hs, Y, W_hqp, b_q, scale, grad, blk):
    """logits ← o = Hs W_hq for a chunk of rows, row_loss ← logsumexp(o_n) - o_n[y_n]; with
    grad, logits ← scale · (softmax(o) - onehot(y))"""
    matmul(logits, Hs, W_hqp, logits.dtype.type(1), _0, logits.shape[1], _0, NO_POST, blk, OVERWRITE)
    for r in range(logits.shape[0]):
        o = logits[r]
        y = Y[r]
        o_y = o[y] + b_q[y]
        m, s = _softmax_row(o, b_q)
        row_loss[r] = m + np.log(s) - o_y
        if grad:
            inv = o.dtype.type(scale / s)
            for q in range(o.shape[0]):
                o[q] *= inv
            o[y] -= scale


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _pack_rows(dop, do, r0, r1):
    """rows [r0, r1) of do (N,Q) into its packed form dop (see products.packed_shape)"""
    Q = do.shape[1]
    for p in range(dop.shape[0]):
        for r in range(r0, r1):
            for l in range(PANEL):
                j = p * PANEL + l
                dop[p, r, l] = do[r, j] if j < Q else 0


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def head_forward_backward_cpu(dHs, dW_hq, db_q, logits, dop, row_loss, Hs, HsT, off, Y,
                              W_hqp, W_hqTp, b_q, scale, blk, n):
    """o = H W_hq + b_q;  L = scale · Σ_n (logsumexp(o_n) - o_n[y_n]);
    do = scale · (softmax(o) - onehot(y));  ∂W_hq = Hᵀ do,  ∂b_q = Σ_n do_n,  dHs = do W_hqᵀ

    dHs (N,H) out · dW_hq (H,Q) out · db_q (Q,) out · logits (N,Q) work, out: do ·
    dop: do packed (work) · row_loss (N,) work · Hs (N,H) · HsT (H, off+N): Hsᵀ from column
    off · Y (N,) int64 targets · W_hqp, W_hqTp: W_hq and W_hqᵀ packed · b_q (Q,) ·
    scale: 1/N or 1 · blk (kc, mc) · n chunks.  L = scale · Σ row_loss, summed by the caller
    (a sum in a parallel kernel would be split by thread).
    """
    N, Q = logits.shape
    H = Hs.shape[1]
    one = Hs.dtype.type(1)
    for c in prange(n):
        r0, r1 = row_chunk(N, c, n)
        _head_rows(row_loss[r0:r1], logits[r0:r1], Hs[r0:r1], Y[r0:r1], W_hqp, b_q, scale, True, blk)
        matmul(dHs[r0:r1], logits[r0:r1], W_hqTp, one, _0, H, _0, NO_POST, blk, OVERWRITE)      # do W_hqᵀ
        _pack_rows(dop, logits, r0, r1)
    for c in prange(n):                                               # rows of ∂W_hq
        j0, j1 = chunk(H, c, n)
        matmul(dW_hq[j0:j1], HsT[j0:j1], dop, one, _0, Q, off, NO_POST, blk, OVERWRITE)
        if c == 0:
            column_sums(db_q, logits, 0, Q)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def head_loss_cpu(logits, row_loss, Hs, Y, W_hqp, b_q, blk, n):
    """row_loss_n = logsumexp(o_n) - o_n[y_n] with o = H W_hq + b_q (forward only)

    logits (N,Q) work · row_loss (N,) float64 out · Hs (N,H) · Y (N,) int64 · W_hqp: W_hq packed ·
    b_q (Q,) · blk (kc, mc) · n row chunks
    """
    N = logits.shape[0]
    for c in prange(n):
        r0, r1 = row_chunk(N, c, n)
        _head_rows(row_loss[r0:r1], logits[r0:r1], Hs[r0:r1], Y[r0:r1], W_hqp, b_q, 1.0, False, blk)
