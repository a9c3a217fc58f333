"""Products of the CUDA engine: C (M,N) = α·op(A) op(B) + β·C on the device, and the
elementwise kernels every product's user shares (zeros, sums, the launch grid).

Every product runs here: the ones over all T·B rows (the input projection, the head, the
weight gradients) and the gated cells' per-step recurrent products.  CuPy's cuBLAS when
CuPy is installed (and not under the simulator, nor with ``config.CUDA_USE_CUPY`` off),
else :func:`_gemm_kernel`, a plain numba-cuda GEMM with one thread per element of C.
Elementwise kernels are grid-stride loops launched over :func:`launch`
(``config.CUDA_BLOCK`` threads a block, at most ``config.CUDA_MAX_GRID`` blocks).
"""
import math
import os

from numba import cuda

from .. import config

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def launch(n):
    """(blocks, threads) of a grid-stride kernel over n elements"""
    return max(1, min(math.ceil(n / config.CUDA_BLOCK), config.CUDA_MAX_GRID)), config.CUDA_BLOCK


# ------------------------------------------------------------------------------ GEMM
@cuda.jit
def _gemm_kernel(C, A, B, ta, tb, alpha, beta):
    """C = alpha·op(A) op(B) + beta·C, one thread per element of C (the fallback without CuPy)

    C (M,N) · A (M,K) or (K,M) if ta · B (K,N) or (N,K) if tb
    """
    M, N = C.shape
    K = A.shape[0] if ta else A.shape[1]
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, M * N, stride):
        i, j = idx // N, idx % N
        acc = 0.0                    # accumulate in float64; C may hold garbage when beta = 0
        for k in range(K):
            a = A[k, i] if ta else A[i, k]
            b = B[j, k] if tb else B[k, j]
            acc += a * b
        acc *= alpha
        if beta != 0:
            acc += beta * C[i, j]
        C[i, j] = acc


def _cupy():
    if SIMULATOR or not config.CUDA_USE_CUPY:
        return None
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def gemm(C, A, B, ta=False, tb=False, beta=0.0, alpha=1.0):
    """C = alpha·op(A) op(B) + beta·C on the device (cuBLAS through CuPy when installed)."""
    if C.size == 0:
        return
    cp = _cupy()
    if cp is not None:
        a, b, c = cp.asarray(A), cp.asarray(B), cp.asarray(C)
        prod = cp.matmul(a.T if ta else a, b.T if tb else b)
        if alpha != 1:
            prod *= alpha
        if beta:
            c *= beta
            c += prod
        else:
            c[...] = prod
        return
    _gemm_kernel[launch(C.shape[0] * C.shape[1])](C, A, B, ta, tb, float(alpha), float(beta))


# ------------------------------------------------------------------------ elementwise
@cuda.jit(device=True)
def sigmoid(x):
    """σ(x) = 1 / (1 + e^(−x)) (the gated cells' gates)"""
    return 1 / (1 + math.exp(-x))


@cuda.jit
def zero_cuda(out):
    """out = 0 (2-D)"""
    N, M = out.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, N * M, stride):
        out[idx // M, idx % M] = 0


@cuda.jit
def _zero_flat_cuda(out):
    """out = 0 (1-D)"""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, out.shape[0], stride):
        out[i] = 0


@cuda.jit
def _axpy_cuda(y, a, x):
    """y += a·x (1-D)"""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, y.shape[0], stride):
        y[i] += a * x[i]


@cuda.jit
def _scale_cuda(out, a, x):
    """out = a·x (1-D)"""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, out.shape[0], stride):
        out[i] = a * x[i]


@cuda.jit
def _times_cuda(out, a, m):
    """out = a ⊙ m (1-D)"""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, out.shape[0], stride):
        out[i] = a[i] * m[i]


@cuda.jit
def _shift_cuda(C, n):
    """C[:n-1] = C[1:n], one thread per (row, unit), serial over the steps (in place, no race)
    · C (T,B,H)"""
    T, B, H = C.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, B * H, stride):
        b, j = idx // H, idx % H
        for t in range(n - 1):
            C[t, b, j] = C[t + 1, b, j]


@cuda.jit
def column_sums_cuda(out, Y):
    """out[j] = Σ_n Y[n, j] · out (M,) · Y (N,M)"""
    N, M = Y.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for j in range(start, M, stride):
        acc = 0.0
        for n in range(N):
            acc += Y[n, j]
        out[j] = acc


def flat(a):
    """a contiguous device array as a 1-D view"""
    return a.reshape(a.size)


def zeros(shape, dtype):
    """a new device array of zeros"""
    a = cuda.device_array(shape, dtype)
    if a.size:
        _zero_flat_cuda[launch(a.size)](flat(a))
    return a


def axpy(y, a, x):
    """y += a·x on the device (same shapes, contiguous)"""
    if y.size:
        _axpy_cuda[launch(y.size)](flat(y), a, flat(x))


def scaled(a, x):
    """a new device array a·x"""
    out = cuda.device_array(x.shape, x.dtype)
    if out.size:
        _scale_cuda[launch(out.size)](flat(out), a, flat(x))
    return out


def times(out, a, m):
    """out = a ⊙ m on the device (same shapes, contiguous)"""
    if out.size:
        _times_cuda[launch(out.size)](flat(out), flat(a), flat(m))


def shift(C, n):
    """C[:n-1] = C[1:n] on the device · C (T,B,H)"""
    if n > 1:
        _shift_cuda[launch(C.shape[1] * C.shape[2])](C, n)
