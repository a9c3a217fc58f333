"""The softmax cross-entropy head of the CUDA engine, over all N = T·B rows at once.

    o = H W_hq + b_q                      H (N,H)  o (N,Q)
    L = scale · Σ_n (logsumexp(o_n) − o_n[y_n])
    do = scale · (softmax(o) − onehot(y));  ∂W_hq = Hᵀ do,  ∂b_q = Σ_n do_n,  dH = do W_hqᵀ

The logits are one GEMM; the softmax-CE is one kernel with a thread per row (stable via
the row max) that leaves do in place of the logits; ∂W_hq and dH are one GEMM each.
Each row's loss is kept (float64) and summed on the host, in row order.
"""
import math

import numpy as np
from numba import cuda

from .products import column_sums_cuda, gemm, launch


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
    ∂b_q = Σ do, dHs = do W_hqᵀ.  Returns L.

    dHs (N,H) out · dW_hq (H,Q) out · db_q (Q,) out · logits (N,Q) work, out: do ·
    Hs (N,H) · Y (N,) int64 targets · W_hq (H,Q) · b_q (Q,) · scale: 1/N or 1
    (as ``fastbptt._cpu.head.head_forward_backward_cpu``)
    """
    N = logits.shape[0]
    gemm(logits, Hs, W_hq)
    row_loss = cuda.device_array(N, np.float64)
    _softmax_xent_cuda[launch(N)](logits, row_loss, Y, b_q, scale, True)
    gemm(dW_hq, Hs, logits, ta=True)
    column_sums_cuda[launch(logits.shape[1])](db_q, logits)
    gemm(dHs, logits, W_hq, tb=True)
    return float(row_loss.copy_to_host().sum()) * scale


def head_loss_cuda(logits, Hs, Y, W_hq, b_q):
    """Σ_n (logsumexp(o_n) - o_n[y_n]) with o = H W_hq + b_q (forward only).

    logits (N,Q) work · Hs (N,H) · Y (N,) int64 targets · W_hq (H,Q) · b_q (Q,)
    """
    N = logits.shape[0]
    gemm(logits, Hs, W_hq)
    row_loss = cuda.device_array(N, np.float64)
    _softmax_xent_cuda[launch(N)](logits, row_loss, Y, b_q, 1.0, False)
    return float(row_loss.copy_to_host().sum())
