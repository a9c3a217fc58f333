"""CPU kernels (numba): forward/backward pairs for a one-layer RNN and its softmax head.

The math (design notes §1), batch-major inside each time step::

    z_t = x_t W_xh + h_{t-1} W_hh + b_h          x_t (B,D)   h_t (B,H)
    h_t = φ(z_t)                                  φ: 0=tanh 1=relu 2=identity
    o_t = h_t W_hq + b_q                          o_t (B,Q)
    L   = scale · Σ_t Σ_b CE(softmax(o_t[b]), y_t[b])

    a_t  = ∂l/∂h_t (direct) + ξ_{t+1} · dz_{t+1} W_hhᵀ
    dz_t = a_t ⊙ φ'(z_t)          (tanh: 1 - h_t²,  relu: [h_t > 0],  identity: 1)

Conventions (as in llm.c): outputs first, then inputs, then weights.  Buffers are
allocated by the caller or once per call, never inside the per-time-step loop; no
kernel validates (``fastbptt.api`` does, once).  Only the recurrence is sequential:
the input projection, the head and every weight gradient are one product over all
T·B rows.  ``fastbptt._cuda`` mirrors this module function for function.
"""
import functools
import importlib
import sys
import threading

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .config import (ACTIVATIONS, CPU_BLAS_STEP_MACS, CPU_KC, CPU_MC, CPU_MIN_COLS,
                     CPU_SERIAL_MACS, CPU_SPLIT_BYTES, CPU_WAIT_SPINS, CPU_YIELD_SPINS,
                     FASTMATH)

TANH, RELU, IDENTITY = (ACTIVATIONS[name] for name in ("tanh", "relu", "identity"))
NO_POST, ACTIVATE, DERIVATIVE = 0, 1, 2     # the elementwise pass after a product
_0 = np.int64(0)    # a 0 that types as int64, not Literal[int](0): one compilation per kernel

# --------------------------------------------------------------------------- tanh
# float32: Eigen's rational approximation (odd degree-13 polynomial over an even
# degree-6 one in x, input clamped to ±7.9053111), max abs error ≈ 2.5e-7, branch
# free so the step loop vectorizes; numba's np.tanh is a scalar libm call.
# float64: np.tanh (exact to 1 ulp; the float64 path is the accurate one).
_CLAMP = np.float32(7.90531110763549805)
_A1, _A3, _A5, _A7 = (np.float32(4.89352455891786e-03), np.float32(6.37261928875436e-04),
                      np.float32(1.48572235717979e-05), np.float32(5.12229709037114e-08))
_A9, _A11, _A13 = (np.float32(-8.60467152213735e-11), np.float32(2.00018790482477e-13),
                   np.float32(-2.76076847742355e-16))
_B0, _B2, _B4, _B6 = (np.float32(4.89352518554385e-03), np.float32(2.26843463243900e-03),
                      np.float32(1.18534705686654e-04), np.float32(1.19825839466702e-06))


def _fast_float32(numpy_fn, float32_fn):
    """numpy_fn, usable inside @njit code, where a float32 argument takes float32_fn, a
    branch-free approximation that vectorizes (numba's own call is a scalar libm call)."""
    def fn(x):
        return numpy_fn(x)

    @overload(fn, jit_options={"fastmath": FASTMATH, "error_model": "numpy"})
    def _fn(x):
        return float32_fn if x == types.float32 else (lambda x: numpy_fn(x))

    fn.__name__ = fn.__qualname__ = numpy_fn.__name__
    fn.__doc__ = f"{numpy_fn.__name__}(x), fast for float32 (see the module notes)"
    return fn


def _tanh_f32(x):
    x = _CLAMP if x > _CLAMP else x
    x = -_CLAMP if x < -_CLAMP else x
    x2 = x * x
    p = x2 * _A13 + _A11
    p = p * x2 + _A9
    p = p * x2 + _A7
    p = p * x2 + _A5
    p = p * x2 + _A3
    p = p * x2 + _A1
    q = x2 * _B6 + _B4
    q = q * x2 + _B2
    q = q * x2 + _B0
    return x * p / q


tanh = _fast_float32(np.tanh, _tanh_f32)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def tanh_cpu(out, x):
    """out = tanh(x), elementwise (the kernels' tanh, exposed for tests) · out, x (N,)"""
    for i in range(x.shape[0]):
        out[i] = tanh(x[i])


# ---------------------------------------------------------------------------- exp
# float32 (the softmax): Cephes' expf, branch free so the row loop vectorizes (numba's
# np.exp is a scalar libm call; softmax and logsumexp of 1120 rows of 28 on one thread:
# 75 µs against 127 with np.exp, same run):
# x = n·ln2 + r, |r| <= ln2/2, e^r by a degree-7 polynomial, 2^n from its exponent bits;
# x clamped to [-87.3, 88.3], where 2^n stays a normal float32.  float64: np.exp.
_EXP_LO, _EXP_HI = np.float32(-87.33654), np.float32(88.37626)
_LOG2E, _LN2_HI, _LN2_LO = np.float32(1.44269504088896341), np.float32(0.693359375), np.float32(-2.12194440e-4)
_E0, _E1, _E2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_E3, _E4, _E5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)


@intrinsic
def _pow2(typingctx, n):
    """2^n for an integral float32 n in [-126, 127]: the float32 with exponent bits n + 127"""
    def codegen(context, builder, sig, args):
        bits = builder.shl(builder.add(builder.fptosi(args[0], ir.IntType(32)), ir.IntType(32)(127)),
                           ir.IntType(32)(23))
        return builder.bitcast(bits, ir.FloatType())
    return types.float32(types.float32), codegen


def _exp_f32(x):
    x = _EXP_HI if x > _EXP_HI else x
    x = _EXP_LO if x < _EXP_LO else x
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - n * _LN2_HI - n * _LN2_LO
    p = r * _E0 + _E1
    p = p * r + _E2
    p = p * r + _E3
    p = p * r + _E4
    p = p * r + _E5
    p = p * (r * r) + r + np.float32(1)
    return p * _pow2(n)


exp = _fast_float32(np.exp, _exp_f32)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def exp_cpu(out, x):
    """out = exp(x), elementwise (the kernels' exp, exposed for tests) · out, x (N,)"""
    for i in range(x.shape[0]):
        out[i] = exp(x[i])


# -------------------------------------------------------------------------- products
# Every product of a loss_and_grad, C (M,N) += α · A (M,K) B (K,N), runs here on numba's
# threads.  (numba's np.dot calls scipy's OpenBLAS, whose threads and numba's spin-wait
# for work after each call; alternating the two pools made each steal the cores the
# other needed: 24 ms per call at d2l-scratch, where its parts timed alone took 14 ms.
# The one BLAS call left, _step_product, is a step small enough for OpenBLAS to keep
# on the calling thread.)
#
# The product is built from one register tile, as in BLAS (_outer_tile, in LLVM IR): a
# tile of 4 rows x 4 vectors of C (64 float32 columns with AVX-512; 4 x 2 vectors of 8
# with AVX2's 16 registers) stays in vector registers for all of K; each k adds the outer product of 4 broadcast elements of A and 4 vectors of
# B's row k, 16 FMAs per 8 loads, and no horizontal sums.  One core, GFLOP/s, against
# dot products of rows in 4x4 blocks (the previous form; same run): (32,512)x(512,256)
# 112.8 vs 101.6, (32,256)x(256,128) 108.8 vs 90.7, the head's (560,28)x(28,512) 105.8
# vs 35.3; one OpenBLAS sgemm call of (32,512)x(512,512): 79.5.  Cache blocking: K in
# slices of at most CPU_KC, rows in panels of CPU_MC.  Callers split the output columns
# (or rows) into one chunk per thread (the sweeps: see "recurrence").

@functools.cache
def _vector_shape():
    """(bytes per vector register, registers) of the CPU numba compiles for (its features,
    as numba's code generator reads them): AVX-512 64 and 32, AVX 32 and 16, NEON 16 and
    32, else 16 and 16."""
    features = numba.config.CPU_FEATURES
    if features is None:
        features = llvm.get_host_cpu_features().flatten()
    features = set(features.split(","))
    if "+avx512f" in features:
        return 64, 32
    if "+avx" in features:
        return 32, 16
    return 16, 32 if "+neon" in features else 16


def _lanes(fty, context):
    """elements per vector register: 16 float32 with AVX-512, 8 with AVX2, ..."""
    return _vector_shape()[0] // context.get_abi_sizeof(fty)


@intrinsic
def _vector_lanes(typingctx, a):
    """the elements of a's dtype per vector register (a compile-time constant)"""
    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, _lanes(context.get_value_type(a.dtype), context))
    return types.intp(a), codegen


@intrinsic
def _tile_vectors(typingctx):
    """vectors per row of a full register tile: 4 (16 accumulators) with 32 registers,
    2 with 16"""
    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, 4 if _vector_shape()[1] >= 32 else 2)
    return types.intp(), codegen


@intrinsic
def _outer_tile(typingctx, C, A, B, alpha, r0, j0, w, ka, K, R, NV):
    """C[r0:r0+R, j0:j0+w] += α · A[r0:r0+R, ka:ka+K] B[:K, j0:j0+w]

    R (rows) and NV (vectors per row) literal ints, (NV-1)·L < w <= NV·L with L the lanes
    of a vector register (_lanes: 16 float32 with AVX-512); the last vector of each row is
    loaded and stored under a mask of its w - (NV-1)·L valid lanes.  C, A, B: 2-D, rows
    contiguous.  The R·NV accumulators live in registers for all of K.
    """
    if not isinstance(R, types.IntegerLiteral) or not isinstance(NV, types.IntegerLiteral):
        return None                            # numba retries with the literal values
    nrow, nvec = R.literal_value, NV.literal_value

    def codegen(context, builder, sig, args):
        cty, aty, bty = sig.args[:3]
        fty = context.get_value_type(cty.dtype)
        L, size = _lanes(fty, context), context.get_abi_sizeof(fty)
        vty, i32 = ir.VectorType(fty, L), ir.IntType(32)
        cary, aary, bary = (context.make_array(t)(context, builder, v)
                            for t, v in zip(sig.args[:3], args[:3]))
        alpha = context.cast(builder, args[3], sig.args[3], cty.dtype)
        r0, j0, w, ka, K = (context.cast(builder, args[i], sig.args[i], types.intp)
                            for i in range(4, 9))
        fma = _vector_intrinsic(builder, "fma", vty, [vty] * 3)
        zero = ir.Constant(vty, None)
        rest = builder.trunc(builder.sub(w, w.type((nvec - 1) * L)), i32)
        mask = builder.icmp_signed("<", ir.Constant(ir.VectorType(i32, L), list(range(L))),
                                   _splat(builder, rest, L))
        mload = _vector_intrinsic(builder, "masked.load", vty, [vty.as_pointer(), i32, mask.type, vty])
        mstore = _vector_intrinsic(builder, "masked.store", vty, [vty, vty.as_pointer(), i32, mask.type])

        def vector(ty, ary, r, v):             # pointer to vector v of row r, from column j0
            p = cgutils.get_item_pointer(context, builder, ty, ary, [r, builder.add(j0, j0.type(v * L))])
            return builder.bitcast(p, vty.as_pointer())

        def load(p, v):
            if v < nvec - 1:
                return builder.load(p, align=size)
            return builder.call(mload, [p, i32(size), mask, zero])

        rows = [builder.add(r0, r0.type(r)) for r in range(nrow)]
        arow = [cgutils.get_item_pointer(context, builder, aty, aary, [r, ka]) for r in rows]
        # for k < K:  acc[r][v] += A[r0+r, ka+k] * B[k, j0+v·L : j0+(v+1)·L]
        entry = builder.basic_block
        head, body, done = (builder.append_basic_block(f"tile.{n}") for n in ("head", "body", "done"))
        builder.branch(head)
        builder.position_at_end(head)
        k = builder.phi(K.type)
        acc = [builder.phi(vty) for _ in range(nrow * nvec)]
        builder.cbranch(builder.icmp_signed("<", k, K), body, done)
        builder.position_at_end(body)
        b = [load(vector(bty, bary, k, v), v) for v in range(nvec)]
        a = [_splat(builder, builder.load(builder.gep(p, [k]), align=size), L) for p in arow]
        new = [builder.call(fma, [a[r], b[v], acc[r * nvec + v]]) for r in range(nrow) for v in range(nvec)]
        k.add_incoming(K.type(0), entry)
        k.add_incoming(builder.add(k, K.type(1)), body)
        for phi, x in zip(acc, new):
            phi.add_incoming(zero, entry)
            phi.add_incoming(x, body)
        builder.branch(head)
        # C += α · acc
        builder.position_at_end(done)
        alpha = _splat(builder, alpha, L)
        for r in range(nrow):
            for v in range(nvec):
                p = vector(cty, cary, rows[r], v)
                x = builder.call(fma, [alpha, acc[r * nvec + v], load(p, v)])
                if v < nvec - 1:
                    builder.store(x, p, align=size)
                else:
                    builder.call(mstore, [x, p, i32(size), mask])
        return context.get_dummy_value()

    return types.void(C, A, B, alpha, r0, j0, w, ka, K, R, NV), codegen


def _vector_intrinsic(builder, name, vty, argtys):
    """declare llvm.<name> for vectors vty (its result vty, or void for a store)"""
    suffix = f"v{vty.count}f{vty.element.intrinsic_name[1:]}"
    if name.startswith("masked."):
        suffix += f".p0{suffix}"
    ret = ir.VoidType() if name.endswith("store") else vty
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, argtys),
                                          f"llvm.{name}.{suffix}")


def _splat(builder, x, n):
    v = builder.insert_element(ir.Constant(ir.VectorType(x.type, n), None), x, ir.IntType(32)(0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n))


@njit(inline="always")
def _tile_rows(C, A, B, alpha, m0, m1, j, w, ka, K, NV):
    """rows [m0, m1) of C's tile column [j, j+w): 4 rows at a time, then one by one"""
    r = m0
    while r + 4 <= m1:
        _outer_tile(C, A, B, alpha, r, j, w, ka, K, 4, NV)
        r += 4
    for i in range(r, m1):
        _outer_tile(C, A, B, alpha, i, j, w, ka, K, 1, NV)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _matmul_acc(C, A, B, alpha, j0, j1, ka):
    """C[:, j0:j1] += α · A[:, ka:ka+K] B[:, j0:j1]   (see _matmul_then)"""
    _matmul_then(C, A, B, alpha, j0, j1, ka, C, NO_POST, IDENTITY)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _matmul_then(C, A, B, alpha, j0, j1, ka, Y, post, act):
    """C[:, j0:j1] += α · A[:, ka:ka+K] B[:, j0:j1], then, tile by tile as each is final,
    post = ACTIVATE: C ← φ(C);  post = DERIVATIVE: C ⊙= φ'(z) with Y = φ(z) (M,N);
    NO_POST: nothing  (act 0=tanh 1=relu 2=identity)

    C (M,N) · A (M, >= ka+K) · B (K,N).  Tiles of 4 rows x 4 vectors (_outer_tile), the
    columns left over in a tile of fewer vectors; K in equal slices of at most CPU_KC and
    M in panels of CPU_MC rows, so that a panel of A and the slice of B under a tile
    column stay in L2 (best of KC in {512, 1024, 2048} x MC in {32, 64, 128} measured at
    the benchmark shapes).  The elementwise pass runs on each tile column while it is in
    L1: one lane's (32,256)x(256,128) step with tanh took 21.4 µs so, 21.9 with tanh as a
    second pass over its columns, 20.2 without tanh (one thread, same run).
    """
    M, K = C.shape[0], B.shape[0]
    L = _vector_lanes(C)
    W = _tile_vectors() * L                         # columns of a full tile
    nk = (K + CPU_KC - 1) // CPU_KC
    for s in range(nk):
        k0, k1 = K * s // nk, K * (s + 1) // nk
        Bs = B[k0:k1]
        for m0 in range(0, M, CPU_MC):
            m1 = min(m0 + CPU_MC, M)
            for j in range(j0, j1, W):
                w = min(W, j1 - j)
                nv = (w + L - 1) // L                   # vectors in this tile column
                if nv == 4:
                    _tile_rows(C, A, Bs, alpha, m0, m1, j, w, ka + k0, k1 - k0, 4)
                elif nv == 3:
                    _tile_rows(C, A, Bs, alpha, m0, m1, j, w, ka + k0, k1 - k0, 3)
                elif nv == 2:
                    _tile_rows(C, A, Bs, alpha, m0, m1, j, w, ka + k0, k1 - k0, 2)
                else:
                    _tile_rows(C, A, Bs, alpha, m0, m1, j, w, ka + k0, k1 - k0, 1)
                if s == nk - 1:
                    _post(C[m0:m1], Y[m0:m1], j, j + w, post, act)


@njit(inline="always")
def _post(C, Y, j0, j1, post, act):
    if post == ACTIVATE:
        _activate(C, j0, j1, act)
    elif post == DERIVATIVE:
        _dphi(C, Y, j0, j1, act)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _step_product(C, A, B, alpha, rec, Y, post, act):
    """C += α · A B, then the post pass of _matmul_then, on the calling thread, for a
    recurrent step too small to share: through BLAS while M·K·N <= CPU_BLAS_STEP_MACS,
    under OpenBLAS's threshold for threads, so the call stays on this thread (measured
    at (1,256)x(256,256): 2.41 µs against 2.61 for the own kernel then), else
    _matmul_then.  rec (M,N): scratch."""
    if A.shape[0] * B.shape[0] * B.shape[1] <= CPU_BLAS_STEP_MACS:
        np.dot(A, B, rec)
        for i in range(C.shape[0]):
            for j in range(C.shape[1]):
                C[i, j] += alpha * rec[i, j]
        _post(C, Y, _0, C.shape[1], post, act)
    else:
        _matmul_then(C, A, B, alpha, _0, C.shape[1], _0, Y, post, act)


@njit(inline="always")
def _chunk(N, c, n):
    """columns [j0, j1) of chunk c of n, starts multiples of 16 (whole vectors for every
    vector width of _lanes, float32 or float64)"""
    j0 = N * c // n // 16 * 16
    j1 = N if c == n - 1 else N * (c + 1) // n // 16 * 16
    return j0, j1


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _activate(h, j0, j1, act):
    """h[:, j0:j1] ← φ(h[:, j0:j1]).  Loops run over a slice from 0 so that they vectorize
    (a loop from j0 keeps numba's negative-index check and does not)."""
    zero = h.dtype.type(0)
    for b in range(h.shape[0]):
        z = h[b, j0:j1]
        if act == TANH:
            for j in range(z.shape[0]):
                z[j] = tanh(z[j])
        elif act == RELU:
            for j in range(z.shape[0]):
                z[j] = z[j] if z[j] > zero else zero


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _dphi(dz, h, j0, j1, act):
    """dz[:, j0:j1] ⊙= φ'(z) written with h = φ(z):  tanh: 1 - h²,  relu: [h > 0],  identity: 1"""
    zero = h.dtype.type(0)
    one = h.dtype.type(1)
    for b in range(h.shape[0]):
        d = dz[b, j0:j1]
        y = h[b, j0:j1]
        if act == TANH:
            for j in range(d.shape[0]):
                d[j] *= one - y[j] * y[j]
        elif act == RELU:
            for j in range(d.shape[0]):
                d[j] = d[j] if y[j] > zero else zero


# ------------------------------------------------------------------ input projection
@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def embed_tokens_cpu(pre, X, W_xh, b_h, n):
    """pre_t = x_t W_xh + b_h for one-hot x_t: a row gather, pre[t,b] = W_xh[X[t,b]] + b_h

    pre (T,B,H) out · X (T,B) int64 token ids · W_xh (D,H) · b_h (H,) · n row chunks
    """
    T, B, H = pre.shape
    rows, ids = pre.reshape(T * B, H), X.reshape(T * B)
    for c in prange(n):
        for r in range(T * B * c // n, T * B * (c + 1) // n):
            src = W_xh[ids[r]]
            dst = rows[r]
            for j in range(H):
                dst[j] = src[j] + b_h[j]


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def embed_dense_cpu(pre, X, W_xh, b_h, n):
    """pre = X W_xh + b_h over all T·B rows at once (one product)

    pre (T·B,H) out · X (T·B,D) · W_xh (D,H) · b_h (H,) · n row chunks
    """
    N, H = pre.shape
    one = pre.dtype.type(1)
    for c in prange(n):
        r0, r1 = N * c // n, N * (c + 1) // n
        for r in range(r0, r1):
            pre[r] = b_h
        _matmul_acc(pre[r0:r1], X[r0:r1], W_xh, one, _0, H, _0)


# ------------------------------------------------------------------------ recurrence
# A sweep runs its T steps in one parallel region.  Each thread owns a chunk of the
# output columns ("lane"), so its slice of W_hh stays in its own L2 for all T steps, and
# applies φ (or φ') to its chunk as the product finishes it; between steps the threads
# meet at a spin barrier on atomics (≈0.2 µs) instead of a region per step (≈1.1 µs,
# and a worker woken per step).  Per (1,256)·(256,256) step: 1.95 µs on two threads
# against 2.91 on one (BLAS) and 3.04 with a region per step; (32,256)·(256,256):
# 27.6 vs 28.7 µs with a region per step (measured with the products of then).
#
# Nothing may assume that the threading layer runs the lanes at the same time (tbb may
# run them one after another on one thread): steps are claimed with a compare-and-swap,
# and a thread that has waited CPU_WAIT_SPINS polls for a lane whose thread has not
# started claims and computes that lane's step itself (from then on without waiting,
# while that lane has not started).  Each step is computed exactly once either way.  A
# thread that has waited CPU_YIELD_SPINS polls for a lane that has started yields its
# core between polls: with more threads than cores, that lane may be waiting for it.

@intrinsic
def _load_acquire(typingctx, flags, i):
    """flags[i], an atomic load with acquire ordering (flags: 1-D int64)"""
    def codegen(context, builder, sig, args):
        return builder.load_atomic(_flag_ptr(context, builder, sig, args), "acquire", 8)
    return types.int64(flags, i), codegen


@intrinsic
def _store_release(typingctx, flags, i, value):
    """flags[i] = value, an atomic store with release ordering"""
    def codegen(context, builder, sig, args):
        value = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(value, _flag_ptr(context, builder, sig, args), "release", 8)
        return context.get_dummy_value()
    return types.void(flags, i, value), codegen


@intrinsic
def _claim(typingctx, flags, i, expected):
    """atomically flags[i] += 1 if flags[i] == expected; True when this call did it"""
    def codegen(context, builder, sig, args):
        old = context.cast(builder, args[2], sig.args[2], types.int64)
        pair = builder.cmpxchg(_flag_ptr(context, builder, sig, args), old,
                               builder.add(old, old.type(1)), "acq_rel", "acquire")
        return builder.extract_value(pair, 1)
    return types.boolean(flags, i, expected), codegen


@intrinsic
def _yield_thread(typingctx):
    """let the OS run another thread on this core (sched_yield; SwitchToThread on Windows)"""
    def codegen(context, builder, sig, args):
        name = "SwitchToThread" if sys.platform == "win32" else "sched_yield"
        builder.call(cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(32), []), name), [])
        return context.get_dummy_value()
    return types.void(), codegen


def _flag_ptr(context, builder, sig, args):
    ary = context.make_array(sig.args[0])(context, builder, args[0])
    i = context.cast(builder, args[1], sig.args[1], types.intp)
    return cgutils.get_item_pointer(context, builder, sig.args[0], ary, [i])


_LINE = 16                  # int64 flags per lane: [started, claimed steps, done steps], padded
_STARTED, _CLAIMED, _DONE = 0, 1, 2


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _step_chunk(S, Hx, M, xi, s, j0, j1, act, backward, rec):
    """Step s (0-based, in sweep order) of a sweep, columns [j0, j1):
    forward (S = Hx, M = W_hh):   h_t = φ(pre_t + h_{t-1} W_hh) with t = s + 1;
    backward (S = dZ, M = W_hhᵀ): dz_t = (dHs_t + ξ_{t+1} dz_{t+1} W_hhᵀ) ⊙ φ'(z_t), t = T-1-s.
    A whole step (j0 = 0, j1 = H) goes through _step_product (rec: its scratch)."""
    whole = j0 == 0 and j1 == S.shape[2]
    if backward:
        t = S.shape[0] - 1 - s
        x = xi[t + 1] if t + 1 < S.shape[0] else S.dtype.type(0)
        if x == 0:                                          # ξ = 0 skips the product
            _dphi(S[t], Hx[t + 1], j0, j1, act)
        elif whole:
            _step_product(S[t], S[t + 1], M, x, rec, Hx[t + 1], DERIVATIVE, act)
        else:
            _matmul_then(S[t], S[t + 1], M, x, j0, j1, _0, Hx[t + 1], DERIVATIVE, act)
    else:
        t = s + 1
        if whole:
            _step_product(S[t], S[t - 1], M, S.dtype.type(1), rec, S[t], ACTIVATE, act)
        else:
            _matmul_then(S[t], S[t - 1], M, S.dtype.type(1), j0, j1, _0, S[t], ACTIVATE, act)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def _sweep(S, Hx, M, xi, act, backward, n):
    """Every step of a sweep (see _step_chunk), each on n column chunks: on this thread
    when n = 1, else in one parallel region, one lane per chunk, step s + 1 of any
    lane starting once every lane has done step s."""
    steps = S.shape[0] if backward else S.shape[0] - 1
    H = S.shape[2]
    rec = np.empty(S.shape[1:], S.dtype)      # the one-thread step's scratch
    if n == 1:
        for s in range(steps):
            _step_chunk(S, Hx, M, xi, s, 0, H, act, backward, rec)
        return
    flags = np.zeros(n * _LINE, np.int64)
    for c in prange(n):
        _store_release(flags, c * _LINE + _STARTED, 1)
        patient = True
        for s in range(steps):
            for o in range(n):                 # wait until every lane has done step s - 1
                f = o * _LINE
                spins = 0
                while _load_acquire(flags, f + _DONE) < s:
                    spins += 1
                    if _load_acquire(flags, f + _STARTED) == 0:
                        if not patient or spins > CPU_WAIT_SPINS:
                            patient = False
                            if _claim(flags, f + _CLAIMED, s - 1):
                                j0, j1 = _chunk(H, o, n)
                                _step_chunk(S, Hx, M, xi, s - 1, j0, j1, act, backward, rec)
                                _store_release(flags, f + _DONE, s)
                    elif spins > CPU_YIELD_SPINS:      # the lane's thread may be waiting for
                        _yield_thread()                # this core (more threads than cores)
            f = c * _LINE
            if _claim(flags, f + _CLAIMED, s):
                j0, j1 = _chunk(H, c, n)
                _step_chunk(S, Hx, M, xi, s, j0, j1, act, backward, rec)
                _store_release(flags, f + _DONE, s + 1)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def rnn_forward_cpu(Hx, W_hh, act, n):
    """h_t = φ(pre_t + h_{t-1} W_hh),  t = 1..T   (pre_t = x_t W_xh + b_h, precomputed)

    Hx (T+1,B,H) in: h_0, pre_1..pre_T; out: h_0..h_T · W_hh (H,H) ·
    act 0=tanh 1=relu 2=identity · n column chunks, one per thread (1: on this thread).
    h_0 sits in front of h_1..h_T so that ∂W_hh is one product over Hx[:T].
    """
    _sweep(Hx, Hx, W_hh, np.empty(0, Hx.dtype), act, False, n)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def rnn_backward_cpu(dZ, dh0, Hx, W_hhT, xi, act, n):
    """Reverse sweep, t = T..1:  a_t = dHs_t + ξ_{t+1} dz_{t+1} W_hhᵀ,  dz_t = a_t ⊙ φ'(h_t);
    then ∂L/∂h_0 = ξ_1 · dz_1 W_hhᵀ.

    dZ (T,B,H) in: dHs (the head's ∂L/∂h_t), out: dz_t · dh0 (B,H) out · Hx (T+1,B,H)
    h_0..h_T · W_hhT (H,H) = W_hhᵀ · xi (T,) ξ_1..ξ_T (all ones: full gradient;
    {0, 1/p}: randomized truncation, a zero skips that step's product) · act 0=tanh 1=relu
    2=identity · n column chunks (1: on this thread).
    """
    _sweep(dZ, Hx, W_hhT, xi, act, True, n)
    _h0_grad(dh0, dZ[0], W_hhT, xi[0], n)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def _h0_grad(dh0, dz1, W_hhT, x, n):
    """∂L/∂h_0 = x · dz_1 W_hhᵀ  (x = 0: zeros) · dh0 (B,H) out · dz1 (B,H) · n column chunks"""
    dh0[:] = 0
    if x != 0:
        for c in prange(n):
            j0, j1 = _chunk(dh0.shape[1], c, n)
            _matmul_acc(dh0, dz1, W_hhT, x, j0, j1, _0)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def rnn_backward_truncated_cpu(dZ, dh0, Hx, W_hhT, k, act, n):
    """Per-term truncation after k steps:  dz_s = Σ_{t=s}^{min(s+k-1,T)} (l_t's adjoint at z_s),
    ∂L/∂h_0 = dz_1 W_hhᵀ (only the terms with t <= k reach step 1).

    The chains of all loss terms advance together, one depth d = 0..k-1 at a time:
    C_t ← C_t ⊙ φ'(h_{t-d}) is added into dz_{t-d}, then C_t ← C_t W_hhᵀ for all t > d in
    one product over (T-d-1)·B rows.  Cost: min(k,T) - 1 products of at most T·B rows.

    dZ (T,B,H) in: dHs (direct terms), out: dz_t · dh0 (B,H) out · Hx (T+1,B,H)
    h_0..h_T · W_hhT (H,H) = W_hhᵀ · k >= 1 · act 0=tanh 1=relu 2=identity · n
    column chunks
    """
    T, B, H = dZ.shape
    chain = dZ.copy()                          # C_t for every loss term t
    nxt = np.empty_like(dZ)
    zero = dZ.dtype.type(0)
    one = dZ.dtype.type(1)
    dZ[:] = zero
    depth = min(k, T)
    for d in range(depth):
        for t in prange(d, T):                 # C_t sits at step s = t - d (one chain per s)
            _dphi(chain[t], Hx[t - d + 1], 0, H, act)
            dst = dZ[t - d].reshape(B * H)
            src = chain[t].reshape(B * H)
            for i in range(B * H):
                dst[i] += src[i]
        if d + 1 < depth:                      # move every live chain one step back
            rows = chain.reshape(T * B, H)[(d + 1) * B:]
            out = nxt.reshape(T * B, H)[(d + 1) * B:]
            out[:] = zero
            for c in prange(n):
                j0, j1 = _chunk(H, c, n)
                _matmul_acc(out, rows, W_hhT, one, j0, j1, _0)
            chain, nxt = nxt, chain
    _h0_grad(dh0, dZ[0], W_hhT, one, n)


# ------------------------------------------------------------------ weight gradients
@intrinsic
def _transpose_tile(typingctx, dst, src, r0, j0):
    """dst[j0+c, r0+i] = src[r0+i, j0+c] for i, c < L, L the lanes of a vector register (16
    float32 with AVX-512): L rows loaded as vectors, transposed in registers by log2(L)
    rounds of two-vector shuffles, stored as L rows (dst, src: C-contiguous 2-D)"""
    def codegen(context, builder, sig, args):
        dty, sty = sig.args[0], sig.args[1]
        fty = context.get_value_type(sty.dtype)
        L, size = _lanes(fty, context), context.get_abi_sizeof(fty)
        vty, i32 = ir.VectorType(fty, L), ir.IntType(32)
        dary = context.make_array(dty)(context, builder, args[0])
        sary = context.make_array(sty)(context, builder, args[1])
        r0 = context.cast(builder, args[2], sig.args[2], types.intp)
        j0 = context.cast(builder, args[3], sig.args[3], types.intp)

        def row(ty, ary, r, c):
            p = cgutils.get_item_pointer(context, builder, ty, ary, [r, c])
            return builder.bitcast(p, vty.as_pointer())

        rows = [builder.load(row(sty, sary, builder.add(r0, r0.type(i)), j0), align=size)
                for i in range(L)]
        s = 1                                  # round s: rows i and i + s swap blocks of s
        while s < L:
            lo = [b + k + t for b in range(0, L, 2 * s) for k in (0, L) for t in range(s)]
            hi = [x + s for x in lo]
            lo, hi = (ir.Constant(ir.VectorType(i32, L), m) for m in (lo, hi))
            out = list(rows)
            for i in range(L):
                if not i & s:
                    out[i] = builder.shuffle_vector(rows[i], rows[i + s], lo)
                    out[i + s] = builder.shuffle_vector(rows[i], rows[i + s], hi)
            rows = out
            s *= 2
        for c in range(L):
            builder.store(rows[c], row(dty, dary, builder.add(j0, j0.type(c)), r0), align=size)
        return context.get_dummy_value()
    return types.void(dst, src, r0, j0), codegen


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _transpose(dst, src, j0, j1):
    """dst[j] = src[:, j] for j in [j0, j1) · dst (H,N) · src (N,H): in L x L tiles
    (_transpose_tile, L the lanes of a vector register), the edges element by element"""
    N = src.shape[0]
    L = _vector_lanes(src)
    nr, jt = N // L * L, j0 + (j1 - j0) // L * L
    for r0 in range(0, nr, L):
        for j in range(j0, jt, L):
            _transpose_tile(dst, src, r0, j)
    for r0 in range(0, N, L):                  # the columns left over, and the rows left over
        r1 = min(r0 + L, N)
        for j in range(jt if r0 < nr else j0, j1):
            d = dst[j, r0:r1]
            for i in range(d.shape[0]):
                d[i] = src[r0 + i, j]


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def gemm_cpu(C, A, B, n):
    """C += A B · C (M,N) · A (M,K) · B (K,N) · n column chunks"""
    one = C.dtype.type(1)
    for c in prange(n):
        j0, j1 = _chunk(C.shape[1], c, n)
        _matmul_acc(C, A, B, one, j0, j1, _0)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def transpose_cpu(dst, src, n):
    """dst = srcᵀ · dst (H,N) out · src (N,H) · n chunks of dst's rows"""
    for c in prange(n):
        j0, j1 = _chunk(src.shape[1], c, n)
        _transpose(dst, src, j0, j1)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def rnn_weight_grads_cpu(dW_hh, db_h, dZ, HxT, t0, n):
    """∂W_hh = Σ_{t>t0} h_{t-1}ᵀ dz_t,  ∂b_h = Σ_t Σ_b dz_t   (one product over the T·B rows, after the loop)

    dW_hh (H,H) out · db_h (H,) out · dZ (T,B,H) · HxT (H,(T+1)·B) h_0..h_T transposed
    (the product's A: row i is h[:, i] over the rows) · t0: 1 when h_0 = 0 (its term
    vanishes and is skipped), else 0 · n column chunks
    """
    T, B, H = dZ.shape
    dZ2 = dZ.reshape(T * B, H)
    k0 = t0 * B
    for c in prange(n):
        j0, j1 = _chunk(H, c, n)
        dW_hh[:, j0:j1] = 0
        _matmul_acc(dW_hh, HxT, dZ2[k0:], dZ.dtype.type(1), j0, j1, k0)
        _column_sums(db_h, dZ2, j0, j1)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _column_sums(out, A, j0, j1):
    """out[j0:j1] = Σ_r A[r, j0:j1]"""
    o = out[j0:j1]
    o[:] = 0
    for r in range(A.shape[0]):
        a = A[r, j0:j1]
        for j in range(o.shape[0]):
            o[j] += a[j]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def embed_tokens_backward_cpu(dW_xh, dZ, X):
    """∂W_xh = Σ_t x_tᵀ dz_t for one-hot x_t: a scatter-add, dW_xh[X[t,b]] += dz_t[b]

    dW_xh (D,H) out · dZ (T,B,H) · X (T,B) int64 token ids
    """
    T, B, H = dZ.shape
    dW_xh[:] = 0
    for t in range(T):
        for b in range(B):
            dst = dW_xh[X[t, b]]
            src = dZ[t, b]
            for j in range(H):
                dst[j] += src[j]


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def embed_dense_backward_cpu(dW_xh, dZ, XT, n):
    """∂W_xh = Xᵀ dZ over all T·B rows (one product)

    dW_xh (D,H) out · dZ (T·B,H) · XT (D,T·B) = Xᵀ · n column chunks
    """
    for c in prange(n):
        j0, j1 = _chunk(dW_xh.shape[1], c, n)
        dW_xh[:, j0:j1] = 0
        _matmul_acc(dW_xh, XT, dZ, XT.dtype.type(1), j0, j1, _0)


# ---------------------------------------------------------------------- softmax head
# Rows n = 1..T·B are independent: each thread takes a chunk of rows through the logits,
# the softmax-CE and dHs; ∂W_hq = Hsᵀ do is then one product over all rows, from the
# transposed copy of H (made for ∂W_hh as well).

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
def _xent_rows(logits, Y, b_q, scale, grad):
    """Σ_n (logsumexp(o_n) - o_n[y_n]) over the rows of logits (o without b_q); with grad,
    logits ← scale · (softmax(o) - onehot(y))"""
    total = 0.0
    for r in range(logits.shape[0]):
        o = logits[r]
        y = Y[r]
        o_y = o[y] + b_q[y]
        m, s = _softmax_row(o, b_q)
        total += m + np.log(s) - o_y
        if grad:
            inv = o.dtype.type(scale / s)
            for q in range(o.shape[0]):
                o[q] *= inv
            o[y] -= scale
    return total


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _head_rows(logits, Hs, Y, W_hq, b_q, scale, grad):
    """logits ← o = Hs W_hq for a chunk of rows; returns their Σ (logsumexp(o_n) - o_n[y_n]),
    and with grad leaves logits ← scale · (softmax(o) - onehot(y))"""
    logits[:] = 0
    _matmul_acc(logits, Hs, W_hq, logits.dtype.type(1), _0, logits.shape[1], _0)
    return _xent_rows(logits, Y, b_q, scale, grad)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def head_forward_backward_cpu(dHs, dW_hq, db_q, logits, Hs, HsT, off, Y, W_hq, W_hqT, b_q,
                              scale, n):
    """o = H W_hq + b_q;  L = scale · Σ_n (logsumexp(o_n) - o_n[y_n]);
    do = scale · (softmax(o) - onehot(y));  ∂W_hq = Hᵀ do,  ∂b_q = Σ_n do_n,  dHs = do W_hqᵀ

    dHs (N,H) out · dW_hq (H,Q) out · db_q (Q,) out · logits (N,Q) work, out: do ·
    Hs (N,H) · HsT (H, off+N): Hsᵀ from column off · Y (N,) int64 targets · W_hq (H,Q) and
    W_hqT = W_hqᵀ · b_q (Q,) · scale: 1/N or 1 · n chunks.
    N = T·B rows; returns L (float64).  Softmax and CE fused, stable via the row max.
    """
    N, Q = logits.shape
    H = Hs.shape[1]
    part_L = np.zeros(n)
    one = Hs.dtype.type(1)
    for c in prange(n):
        r0, r1 = N * c // n, N * (c + 1) // n
        part_L[c] = _head_rows(logits[r0:r1], Hs[r0:r1], Y[r0:r1], W_hq, b_q, scale, True)
        dHs[r0:r1] = 0
        _matmul_acc(dHs[r0:r1], logits[r0:r1], W_hqT, one, _0, H, _0)      # do W_hqᵀ
    for c in prange(n):                                               # rows of ∂W_hq
        j0, j1 = _chunk(H, c, n)
        dW_hq[j0:j1] = 0
        _matmul_acc(dW_hq[j0:j1], HsT[j0:j1], logits, one, _0, Q, off)
        if c == 0:
            _column_sums(db_q, logits, 0, Q)
    return part_L.sum() * scale


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def head_loss_cpu(logits, Hs, Y, W_hq, b_q, n):
    """Σ_n (logsumexp(o_n) - o_n[y_n]) with o = H W_hq + b_q (forward only; float64 result)

    logits (N,Q) work · Hs (N,H) · Y (N,) int64 · W_hq (H,Q) · b_q (Q,) · n row chunks
    """
    N = logits.shape[0]
    part_L = np.zeros(n)
    for c in prange(n):
        r0, r1 = N * c // n, N * (c + 1) // n
        part_L[c] = _head_rows(logits[r0:r1], Hs[r0:r1], Y[r0:r1], W_hq, b_q, 1.0, False)
    return part_L.sum()


# ------------------------------------------------------- composites (called by api.py)
# Plain Python: allocate each buffer once per call and run the kernels in order.
# Inputs arrive validated, C-contiguous, writeable, in one float dtype (token ids int64).
# Every kernel splits its work into n = numba.get_num_threads() chunks, one per thread.

class _Scratch(threading.local):
    """Work buffers that never leave a call, kept for the next call of the same shapes:
    a fresh multi-MB buffer costs a page fault per 4 KiB on first touch (four fresh
    buffers of d2l-scratch's sizes: 5.5 ms to allocate and fill, 0.28 ms to refill,
    measured).  One set per thread, for the last two shape signatures."""

    def __init__(self):
        self.sets = {}

    def get(self, key, shapes, dtype):
        bufs = self.sets.pop(key, None)
        if bufs is None:
            bufs = tuple(np.empty(shape, dtype) for shape in shapes)
        self.sets[key] = bufs                   # most recent last
        while len(self.sets) > 2:
            del self.sets[next(iter(self.sets))]
        return bufs


_scratch = _Scratch()


def step_threads(B, W_hh, n):
    """Threads (lanes) for the steps of a sweep: n when each thread gets at least
    CPU_MIN_COLS columns and the step has at least CPU_SERIAL_MACS multiply-adds (B·H²) or
    W_hh (H,H) takes at least B·CPU_SPLIT_BYTES, else 1; always 1 on numba's fallback
    "workqueue" layer, whose regions cost ≈80 µs each.  Measured (whole loss_and_grad,
    T=64, ms, one thread vs two): (B,H) = (8,64) 0.30 vs 0.30, (16,64) 0.48 vs 0.47,
    (32,64) 0.91 vs 0.85, (64,32) 0.83 vs 0.81, (2,128) 0.26-0.27 vs 0.27-0.29, (3,128)
    0.37 vs 0.35, (4,128) 0.38 vs 0.34, (8,128) 0.67 vs 0.57, (2,192) 0.65 vs 0.48; T=256:
    (1,64) 0.32 vs 0.33, (1,96) 0.46 vs 0.36, (1,128) 0.63 vs 0.52-0.54, (1,256) 1.85 vs
    1.28 (a B = 1 step reads all of W_hh from L2: two threads read half each)."""
    H = W_hh.shape[0]
    if not _cheap_regions() or H // n < CPU_MIN_COLS:
        return 1
    if B * H * H < CPU_SERIAL_MACS and W_hh.nbytes < B * CPU_SPLIT_BYTES:
        return 1
    return n


@functools.cache
def _cheap_regions():
    """Whether numba's threading layer is omp or tbb (numba takes the first one it can
    load, else workqueue; it says which only after a parallel kernel ran)."""
    try:
        return numba.threading_layer() != "workqueue"
    except ValueError:
        pass
    if numba.config.THREADING_LAYER == "workqueue":
        return False
    for layer in ("tbbpool", "omppool"):
        try:
            importlib.import_module(f"numba.np.ufunc.{layer}")
            return True
        except ImportError:
            pass
    return False


def _transposed(P, n, *keys):
    """P with a C-contiguous transposed copy of each named weight added as key + "T"
    (one parallel copy in tiles per call: at 512x512 float32 0.04 ms, numpy's
    transposed copy 0.58 ms, measured)."""
    P = dict(P)
    for key in keys:
        a = P[key]
        P[key + "T"] = aT = np.empty((a.shape[1], a.shape[0]), a.dtype)
        transpose_cpu(aT, a, n)
    return P


def _embed(P, X, Hx, n):
    """Hx[0] stays h_0; Hx[1:] ← pre_t = x_t W_xh + b_h."""
    T, B, H = Hx.shape[0] - 1, Hx.shape[1], Hx.shape[2]
    if X.ndim == 2:
        embed_tokens_cpu(Hx[1:], X, P["W_xh"], P["b_h"], n)
    else:
        embed_dense_cpu(Hx[1:].reshape(T * B, H), X.reshape(T * B, -1), P["W_xh"], P["b_h"], n)


def _forward_into(P, X, h0, act, Hx, n):
    """Hx ← h_0..h_T.  With h_0 = 0 the first step has no product: h_1 = φ(pre_1)."""
    Hx[0] = h0
    _embed(P, X, Hx, n)
    lanes = step_threads(Hx.shape[1], P["W_hh"], n)
    if h0.any():
        rnn_forward_cpu(Hx, P["W_hh"], act, lanes)
    else:
        _activate(Hx[1], _0, Hx.shape[2], act)
        rnn_forward_cpu(Hx[1:], P["W_hh"], act, lanes)


def forward(P, X, h0, act):
    """Hx (T+1,B,H) = h_0..h_T for token ids X (T,B) or dense X (T,B,D)."""
    T, B = X.shape[:2]
    Hx = np.empty((T + 1, B, P["W_hh"].shape[0]), P["W_hh"].dtype)
    _forward_into(P, X, h0, act, Hx, get_num_threads())
    return Hx


def _backward(P, X, Hx, HxT, dZ, act, k, xi, n):
    """The gradients of W_xh, W_hh, b_h, h0 (dZ: the direct terms, overwritten;
    P with W_hhT, HxT = h_0..h_T transposed)."""
    T, B, H = dZ.shape
    dt = dZ.dtype
    dh0 = np.empty((B, H), dt)
    if k is None:
        rnn_backward_cpu(dZ, dh0, Hx, P["W_hhT"], xi, act, step_threads(B, P["W_hh"], n))
    else:
        rnn_backward_truncated_cpu(dZ, dh0, Hx, P["W_hhT"], k, act, n)
    dW_hh = np.empty((H, H), dt)
    db_h = np.empty(H, dt)
    rnn_weight_grads_cpu(dW_hh, db_h, dZ, HxT, int(not Hx[0].any()), n)
    dW_xh = np.empty(P["W_xh"].shape, dt)
    if X.ndim == 2:
        embed_tokens_backward_cpu(dW_xh, dZ, X)
    else:
        X2 = X.reshape(T * B, -1)
        XT = np.empty((X2.shape[1], T * B), dt)
        transpose_cpu(XT, X2, n)
        embed_dense_backward_cpu(dW_xh, dZ.reshape(T * B, H), XT, n)
    return {"W_xh": dW_xh, "W_hh": dW_hh, "b_h": db_h, "h0": dh0}


def backward(P, X, Hx, dZ, act, k, xi):
    """Gradients of W_xh, W_hh, b_h and h0 given Hx = h_0..h_T and dZ = ∂L/∂h_t (direct
    terms; overwritten).  k: per-term truncation depth (Truncated(k), k < T), or None
    for the sweep with crossing factors xi (T,) (ones: full; {0, 1/p}: randomized)."""
    T, B, H = dZ.shape
    n = get_num_threads()
    HxT = np.empty((H, (T + 1) * B), dZ.dtype)
    transpose_cpu(HxT, Hx.reshape((T + 1) * B, H), n)
    return _backward(_transposed(P, n, "W_hh"), X, Hx, HxT, dZ, act, k, xi, n)


def adjoints(P, Hx, dZ, act):
    """A (T+1,B,H) = ∂L/∂h_0 … ∂L/∂h_T of the full gradient, given Hx = h_0..h_T and
    dZ = the direct terms ∂L/∂h_t (overwritten): a_t = dHs_t + dz_{t+1} W_hhᵀ, a_0 = dz_1 W_hhᵀ."""
    T, B, H = dZ.shape
    n = get_num_threads()
    P = _transposed(P, n, "W_hh")
    A = np.zeros((T + 1, B, H), dZ.dtype)
    A[1:] = dZ
    dh0 = np.empty((B, H), dZ.dtype)
    rnn_backward_cpu(dZ, dh0, Hx, P["W_hhT"], np.ones(T, dZ.dtype), act,
                     step_threads(B, P["W_hh"], n))
    gemm_cpu(A[:T].reshape(T * B, H), dZ.reshape(T * B, H), P["W_hhT"], n)
    return A


def loss_and_grad(P, X, Y, h0, act, k, xi, scale):
    """(loss, grads, h_T): forward, fused softmax-CE head, backward."""
    T, B = X.shape[:2]
    H, Q = P["W_hq"].shape
    N = T * B
    dt = P["W_hh"].dtype
    n = get_num_threads()
    P = _transposed(P, n, "W_hq", "W_hh")
    Hx, HxT, dHs, logits = _scratch.get(
        ("loss_and_grad", T, B, H, Q, dt), ((T + 1, B, H), (H, N + B), (T, B, H), (N, Q)), dt)
    _forward_into(P, X, h0, act, Hx, n)
    transpose_cpu(HxT, Hx.reshape(N + B, H), n)
    dW_hq = np.empty((H, Q), dt)
    db_q = np.empty(Q, dt)
    loss = head_forward_backward_cpu(dHs.reshape(N, H), dW_hq, db_q, logits,
                                     Hx[1:].reshape(N, H), HxT, B, Y.reshape(N), P["W_hq"],
                                     P["W_hqT"], P["b_q"], scale, n)
    grads = _backward(P, X, Hx, HxT, dHs, act, k, xi, n)
    grads["W_hq"] = dW_hq
    grads["b_q"] = db_q
    return loss, grads, Hx[T].copy()


def loss(P, X, Y, h0, act):
    """(Σ of the T·B cross-entropy terms, h_T), forward only."""
    T, B = X.shape[:2]
    H, Q = P["W_hq"].shape
    dt = P["W_hh"].dtype
    n = get_num_threads()
    Hx, logits = _scratch.get(("loss", T, B, H, Q, dt), ((T + 1, B, H), (T * B, Q)), dt)
    _forward_into(P, X, h0, act, Hx, n)
    total = head_loss_cpu(logits, Hx[1:].reshape(T * B, H), Y.reshape(T * B), P["W_hq"],
                          P["b_q"], n)
    return total, Hx[T].copy()


# --------------------------------------------------- arrays (for api.py's validation)
# api.py decides what to check; these say how on this backend's arrays.

def as_array(name, a):
    """``a`` as a numpy array; a CUDA array is an error on the CPU."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        raise TypeError(f"{name}: a CUDA array needs device='cuda'")
    try:
        return np.asarray(a)
    except Exception as e:
        raise TypeError(f"{name}: expected an array, got {type(a).__name__} ({e})") from None


def normalized(name, a, dtype, copy=False):
    """C-contiguous, writeable, of ``dtype``: ``a`` itself only if it already is all that and no
    copy is asked for."""
    if copy:
        return np.array(a, dtype=dtype, order="C", copy=True)
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.writeable else a.copy()


def first_nonfinite(a):
    """None if every value is finite, else a description of the first one that is not."""
    if np.isfinite(a).all():
        return None
    bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
    return f"{a[bad]} at index {bad}"


def id_range(ids):
    return int(ids.min()), int(ids.max())


def stack_states(h0, Hs):
    """Hx (T+1,B,H) = h_0, h_1..h_T, as the forward keeps them."""
    return np.concatenate([h0[None], Hs])
