"""Products of the CUDA engine: C (M,N) = op(A) op(B) + β·C on the device, and the
elementwise kernels every product's user shares (zeros, column sums, the launch grid).

Every product over all T·B rows (the input projection, the head, the weight gradients)
runs here: CuPy's cuBLAS when CuPy is installed (and not under the simulator, nor with
``config.CUDA_USE_CUPY`` off), else :func:`_gemm_kernel`, a plain numba-cuda GEMM with
one thread per element of C.  Elementwise kernels are grid-stride loops launched over
:func:`launch` (``config.CUDA_BLOCK`` threads a block, at most ``config.CUDA_MAX_GRID``
blocks).
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
def _gemm_kernel(C, A, B, ta, tb, beta):
    """C = op(A) op(B) + beta·C, one thread per element of C (the fallback without CuPy)

    C (M,N) · A (M,K) or (K,M) if ta · B (K,N) or (N,K) if tb
    """
    M, N = C.shape
    K = A.shape[0] if ta else A.shape[1]
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, M * N, stride):
        i, j = idx // N, idx % N
        acc = 0.0                    # accumulate in float64; C may hold garbage when beta = 0
        if beta != 0:
            acc = beta * C[i, j]
        for k in range(K):
            a = A[k, i] if ta else A[i, k]
            b = B[j, k] if tb else B[k, j]
            acc += a * b
        C[i, j] = acc


def _cupy():
    if SIMULATOR or not config.CUDA_USE_CUPY:
        return None
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def gemm(C, A, B, ta=False, tb=False, beta=0.0):
    """C = op(A) op(B) + beta·C on the device (cuBLAS through CuPy when installed)."""
    cp = _cupy()
    if cp is not None:
        a, b, c = cp.asarray(A), cp.asarray(B), cp.asarray(C)
        prod = cp.matmul(a.T if ta else a, b.T if tb else b)
        if beta:
            c *= beta
            c += prod
        else:
            c[...] = prod
        return
    _gemm_kernel[launch(C.shape[0] * C.shape[1])](C, A, B, ta, tb, beta)


# ------------------------------------------------------------------------ elementwise
@cuda.jit
def zero_cuda(out):
    """out = 0 (2-D)"""
    N, M = out.shape
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for idx in range(start, N * M, stride):
        out[idx // M, idx % M] = 0


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
