"""The products over all T·B rows around a sweep: the input projection before it, the
weight gradients after it.  Each is one product (a gather or scatter-add for token ids),
never a loop over time steps.

    pre = X W_x + b                       X (T·B,D) or ids (T,B)   pre (T·B,G·H)
    ∂W_x = Xᵀ dZ,  ∂W_h = Σ_t h_{t-1}ᵀ dz_t,  ∂b = Σ_t Σ_b dz_t      dZ (T·B,G·H)

G·H is the width of a cell's pre-activations (G = 1 for the Elman cell).
"""
from collections import namedtuple

from numba import njit, prange
from numba.extending import overload

from ..config import FASTMATH
from .products import NO_POST, OVERWRITE, SUM_COLS, _0, add_to, chunk, epilogue, matmul, matmul_k, of_type, row_chunk


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def embed_tokens_cpu(pre, X, W_xh, b_h, runs, n):
    """pre_t = x_t W_xh + b_h for one-hot x_t: a row gather, pre[t,b] = W_xh[X[t,b]] + b_h, its
    columns in the order given by ``runs`` (``products.runs_of``: a gated cell's column order,
    or one run), read from W_xh's and b_h's natural order with no permuted copy

    pre (T,B,G·H) out · X (T,B) int64 token ids · W_xh (D,G·H) · b_h (G·H,) · runs · n row chunks
    """
    T, B, N = pre.shape
    rows, ids = pre.reshape(T * B, N), X.reshape(T * B)
    for c in prange(n):
        for r in range(T * B * c // n, T * B * (c + 1) // n):
            src, dst = W_xh[ids[r]], rows[r]
            for i in range(runs.shape[0]):
                j0, a, w = runs[i, 0], runs[i, 1], runs[i, 2]
                d, s, b = dst[j0:j0 + w], src[a:a + w], b_h[a:a + w]
                for j in range(w):
                    d[j] = s[j] + b[j]


#: the epilogue that adds a row b to every row of a tile column (the input projection's bias,
#: added while the tile is in L1 instead of a pass that fills the output with it first)
AddRow = namedtuple("AddRow", "b")


@overload(epilogue, jit_options={"cache": True})
def _add_row(post, C, m0, m1, j0, j1):
    if of_type(post, AddRow):
        def add_row(post, C, m0, m1, j0, j1):
            b = post.b[j0:j1]
            for r in range(m0, m1):
                add_to(C[r, j0:j1], b, j1 - j0)
        return add_row


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def embed_dense_cpu(pre, X, W_xhp, b_h, blk, n):
    """pre = X W_xh + b_h over all T·B rows at once (one product, b_h added in its epilogue)

    pre (T·B,H) out · X (T·B,D) · W_xhp: W_xh (D,H) packed · b_h (H,) · blk (kc, mc) · n row chunks
    """
    N, H = pre.shape
    one = pre.dtype.type(1)
    for c in prange(n):
        r0, r1 = row_chunk(N, c, n)
        matmul(pre[r0:r1], X[r0:r1], W_xhp, one, _0, H, _0, AddRow(b_h), blk, OVERWRITE)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def embed_tokens_backward_cpu(dW_xh, sums, dZ, X, n):
    """∂W_xh = Σ_t x_tᵀ dz_t for one-hot x_t: a scatter-add, dW_xh[X[t,b]] += dz_t[b]; and
    sums = Σ_t Σ_b dz_t[b] (∂b) in the same read (a dZ that is also packed does both in
    its packing instead: :func:`fastbptt._cpu.products.pack_sums_cpu`)

    dW_xh (D,H) out · sums (H,) out · dZ (T,B,H) · X (T,B) int64 token ids · n column chunks
    (each element sums over (t, b) in order, whatever n)
    """
    T, B, H = dZ.shape
    for c in prange(n):
        j0, j1 = chunk(H, c, n)
        dW_xh[:, j0:j1] = 0
        sums[j0:j1] = 0
        for q in range(j0, j1, SUM_COLS):             # a block of columns at a time (SUM_COLS)
            w = min(SUM_COLS, j1 - q)
            s = sums[q:q + w]
            for t in range(T):
                for b in range(B):
                    src = dZ[t, b, q:q + w]
                    add_to(s, src, w)
                    add_to(dW_xh[X[t, b], q:q + w], src, w)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def embed_dense_backward_cpu(dW_xh, XT, dZp, blk, n):
    """∂W_xh = Xᵀ dZ over all T·B rows (one product)

    dW_xh (D,H) out · XT (D,T·B) = Xᵀ · dZp: dZ (T·B,H) packed · blk (kc, mc) · n column chunks
    """
    for c in prange(n):
        j0, j1 = chunk(dW_xh.shape[1], c, n)
        matmul(dW_xh, XT, dZp, XT.dtype.type(1), j0, j1, _0, NO_POST, blk, OVERWRITE)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def recurrent_grads_cpu(dW_hh, dZp, HxT, t0B, blk, n):
    """∂W_hh = Σ_{t>t0} h_{t-1}ᵀ dz_t   (one product over the T·B rows; ∂b_h comes with the
    packing of dZ, :func:`fastbptt._cpu.products.pack_sums_cpu`)

    dW_hh (H,G·H) out · dZp: dZ (T·B,G·H) packed · HxT (H,(T+1)·B) h_0..h_T transposed (the
    product's A: row i is h[:, i] over the rows) · t0B: B when h_0 = 0 (its term vanishes:
    the product starts at row t0B), else 0 · blk (kc, mc) · n column chunks
    """
    for c in prange(n):
        j0, j1 = chunk(dW_hh.shape[1], c, n)
        matmul_k(dW_hh, HxT, dZp, dW_hh.dtype.type(1), j0, j1, _0, t0B, dZp.shape[1], NO_POST, blk, OVERWRITE)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def add_cpu(dst, src, n):
    """dst += src (1-D) · n chunks"""
    N = dst.shape[0]
    for c in prange(n):
        for i in range(N * c // n, N * (c + 1) // n):
            dst[i] += src[i]
