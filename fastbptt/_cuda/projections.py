"""The products over all T·B rows around a sweep on the CUDA engine: the input projection
before it, the weight gradients after it.  Each is one GEMM (a gather or an atomic
scatter-add for token ids) or one elementwise kernel, never a loop over time steps.

    pre = X W_xh + b_h                    X (T·B,D) or ids (T,B)   pre (T·B,H)
    ∂W_xh = Xᵀ dZ,  ∂W_hh = Σ_t h_{t-1}ᵀ dz_t,  ∂b_h = Σ_t Σ_b dz_t      dZ (T·B,H)
"""
from numba import cuda

from .products import column_sums_cuda, gemm, launch


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
    _add_bias_cuda[launch(pre.size)](pre, b_h)


# ------------------------------------------------------------------ weight gradients
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


def recurrent_grads_cuda(dW_hh, db_h, dZ, Hx):
    """∂W_hh = Σ_t h_{t-1}ᵀ dz_t (one GEMM over T·B rows), ∂b_h = Σ_t Σ_b dz_t

    dW_hh (H,H) out · db_h (H,) out · dZ (T,B,H) · Hx (T+1,B,H) h_0..h_T
    """
    T, B, H = dZ.shape
    dZ2 = dZ.reshape(T * B, H)
    gemm(dW_hh, Hx[:T].reshape(T * B, H), dZ2, ta=True)
    column_sums_cuda[launch(H)](db_h, dZ2)
