"""The products over all T·B rows around a sweep on the CUDA engine: the input projection
before it, the weight gradients after it.  Each is one GEMM (a gather or an atomic
scatter-add for token ids) or one elementwise kernel, never a loop over time steps.
A cell's pre-activations are G·H wide (G gates, natural column blocks [gate0 | gate1 | ...]).

    P = X W_xh + b                        X (T·B,D) or ids (T,B)   P (T·B,G·H)
    ∂W_xh = Xᵀ dP,  ∂W_hh = Σ_t h_{t-1}ᵀ dR_t,  ∂b = Σ_t Σ_b dR_t        dP, dR (T·B,G·H)
"""
from numba import cuda

from .products import column_sums_cuda, gemm, launch


# ------------------------------------------------------------------ input projection
@cuda.jit
def embed_tokens_cuda(pre, X, W_xh, b_h):
    """pre[t,b] = W_xh[X[t,b]] + b_h (row gather) · pre (T,B,GH) · X (T,B) int64 · W_xh (D,GH) · b_h (GH,)"""
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
    """pre = X W_xh + b_h over all T·B rows (one GEMM) · pre (T·B,GH) · X (T·B,D)"""
    gemm(pre, X, W_xh)
    _add_bias_cuda[launch(pre.size)](pre, b_h)


# ------------------------------------------------------------------ weight gradients
@cuda.jit
def embed_tokens_backward_cuda(dW_xh, dZ, X):
    """dW_xh[X[t,b]] += dz_t[b] (scatter-add, atomic) · dW_xh (D,GH) zeroed · dZ (T,B,GH) · X (T,B)"""
    T, B, H = dZ.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, T * B * H, stride):
        t, r = idx // (B * H), idx % (B * H)
        b, j = r // H, r % H
        cuda.atomic.add(dW_xh, (X[t, b], j), dZ[t, b, j])


def embed_dense_backward_cuda(dW_xh, dZ, X):
    """∂W_xh = Xᵀ dZ over all T·B rows (one GEMM) · dZ (T·B,GH) · X (T·B,D)"""
    gemm(dW_xh, X, dZ, ta=True)


def recurrent_grads_cuda(dW_hh, db, dR, Hx):
    """∂W_hh = Σ_t h_{t-1}ᵀ dR_t (one GEMM over T·B rows), ∂b = Σ_t Σ_b dR_t

    dW_hh (H,GH) out · db (GH,) out · dR (T,B,GH) · Hx (T+1,B,H) h_0..h_T
    """
    T, B, GH = dR.shape
    H = Hx.shape[2]
    dR2 = dR.reshape(T * B, GH)
    gemm(dW_hh, Hx[:T].reshape(T * B, H), dR2, ta=True)
    column_sums_cuda[launch(GH)](db, dR2)
