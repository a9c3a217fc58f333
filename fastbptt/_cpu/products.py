"""Products of the CPU engine: C (M,N) += α · A (M,K) B (K,N), or C = α · A B (OVERWRITE: C's old
values never read, so an output needs no zeroing pass first), from one register tile.

Every product of a call runs here, on numba's threads: callers split the output columns
(or rows) into one chunk per thread.  The right factor B always arrives *packed*
(:func:`pack_cpu`): cut into panels of PANEL columns, each panel's K rows contiguous,
so that a tile streams B from a few contiguous runs whatever N is.  Read in place, the
rows of B are N·4 bytes apart; at N = 512 or 1024 they fall into the same cache sets
and pages, and the tile's speed depended on the matrix's leading dimension.  W_hh and
W_hhᵀ, the B of every step of a sweep, are packed once per call.

The tile (``_outer_tile``, LLVM IR, as in BLAS): R rows x NV vectors of C stay in vector
registers for all of a K slice; each k adds the outer product of R broadcast elements
of A and NV vectors of B's row k (no horizontal sums).  The vector width and the tile
follow the CPU numba compiles for: with 32 vector registers (AVX-512: 16 float32 lanes;
NEON: 4) 8 rows x 3 vectors, 24 accumulators, so that each vector of B loaded serves 8
FMAs (docs/performance.md, "the tile's shape"); with 16 (AVX2: 8 lanes; SSE: 4) 4 x 2.
K runs in slices of ``kc``, rows in panels of ``mc`` (the plan's blocking,
:mod:`fastbptt._cpu.plan`).

After the last K slice of a tile column, an *epilogue* runs on it while it is in L1:
:func:`epilogue` is a stub that each user of the engine overloads for its own
namedtuple type (a cell's activation, or :data:`NO_POST`), so the engine calls code it
does not know, resolved at compile time and kept in numba's on-disk cache.
"""
import functools
import math
from collections import namedtuple

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..config import FASTMATH

#: columns per packed panel of B: a multiple of every vector width (16 float32 lanes with
#: AVX-512), so that no vector of a tile straddles two panels
PANEL = 16
_0 = np.int64(0)    # a 0 that types as int64, not Literal[int](0): one compilation per kernel


# ------------------------------------------------------------------------ the CPU's vectors
@functools.cache
def vector_shape():
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
    return vector_shape()[0] // context.get_abi_sizeof(fty)


@intrinsic
def vector_lanes(typingctx, a):
    """the elements of a's dtype per vector register (a compile-time constant)"""
    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, _lanes(context.get_value_type(a.dtype), context))
    return types.intp(a), codegen


def full_tile():
    """(rows, vectors per row) of a full register tile: 8 x 3 with 32 vector registers (24
    accumulators), 4 x 2 with 16 (8)"""
    return (8, 3) if vector_shape()[1] >= 32 else (4, 2)


@intrinsic
def _tile_vectors(typingctx):
    """vectors per row of a full register tile (full_tile), a compile-time constant"""
    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, full_tile()[1])
    return types.intp(), codegen


@intrinsic
def _tall_tiles(typingctx):
    """whether a full register tile is 8 rows tall, not 4 (full_tile), a compile-time constant"""
    def codegen(context, builder, sig, args):
        return context.get_constant(types.boolean, full_tile()[0] == 8)
    return types.boolean(), codegen


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


# ------------------------------------------------------------------------------ the tile
@intrinsic
def _outer_tile(typingctx, C, A, Bp, alpha, r0, j0, w, ka, kb, K, fresh, R, NV):
    """C[r0:r0+R, j0:j0+w] += α · A[r0:r0+R, ka:ka+K] B[kb:kb+K, j0:j0+w]; with ``fresh``,
    C's tile = α · A B, its old values never read (a product that overwrites C needs no
    zeroing pass first: α·acc + 0 is the same sum, to the bit)

    Bp: B packed (:func:`pack_cpu`), Bp[j // PANEL, k, j % PANEL] = B[k, j], zero past N.
    R (rows) and NV (vectors per row) literal ints, (NV-1)·L < w <= NV·L with L the lanes
    of a vector register, j0 a multiple of L; C's last vector of each row is loaded and
    stored under a mask of its w - (NV-1)·L valid lanes (B's panels are padded with
    zeros).  C, A: 2-D, rows contiguous.  The R·NV accumulators live in registers for
    all of K.
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
        r0, j0, w, ka, kb, K = (context.cast(builder, args[i], sig.args[i], types.intp)
                                for i in range(4, 10))
        fresh = context.cast(builder, args[10], sig.args[10], types.boolean)
        fma = _vector_intrinsic(builder, "fma", vty, [vty] * 3)
        zero = ir.Constant(vty, None)
        rest = builder.trunc(builder.sub(w, w.type((nvec - 1) * L)), i32)
        mask = builder.icmp_signed("<", ir.Constant(ir.VectorType(i32, L), list(range(L))),
                                   _splat(builder, rest, L))
        mload = _vector_intrinsic(builder, "masked.load", vty, [vty.as_pointer(), i32, mask.type, vty])
        mstore = _vector_intrinsic(builder, "masked.store", vty, [vty, vty.as_pointer(), i32, mask.type])
        panel = j0.type(PANEL)

        def cvector(r, v):                     # pointer to C's vector v of row r, from column j0
            p = cgutils.get_item_pointer(context, builder, cty, cary, [r, builder.add(j0, j0.type(v * L))])
            return builder.bitcast(p, vty.as_pointer())

        def cload(p, v):
            if v < nvec - 1:
                return builder.load(p, align=size)
            return builder.call(mload, [p, i32(size), mask, zero])

        rows = [builder.add(r0, r0.type(r)) for r in range(nrow)]
        # C's tile is read only after the K loop: ask for its lines now, so that a C the
        # tile has not touched yet (a sweep's pre-activations) arrives while the FMAs run
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32]),
            "llvm.prefetch.p0i8")
        for r in rows:
            for v in range(nvec):
                builder.call(prefetch, [builder.bitcast(cvector(r, v), ir.IntType(8).as_pointer()),
                                        i32(1), i32(3), i32(1)])
        arow = [cgutils.get_item_pointer(context, builder, aty, aary, [r, ka]) for r in rows]
        bcol = []                              # B's vector v at row kb: bcol[v] + k·PANEL is row kb + k
        for v in range(nvec):
            j = builder.add(j0, j0.type(v * L))
            bcol.append(cgutils.get_item_pointer(context, builder, bty, bary,
                                                 [builder.sdiv(j, panel), kb, builder.srem(j, panel)]))
        # for k < K:  acc[r][v] += A[r0+r, ka+k] * B[kb+k, j0+v·L : j0+(v+1)·L]
        entry = builder.basic_block
        head, body, done = (builder.append_basic_block(f"tile.{n}") for n in ("head", "body", "done"))
        builder.branch(head)
        builder.position_at_end(head)
        k = builder.phi(K.type)
        acc = [builder.phi(vty) for _ in range(nrow * nvec)]
        builder.cbranch(builder.icmp_signed("<", k, K), body, done)
        builder.position_at_end(body)
        kp = builder.mul(k, k.type(PANEL))
        b = [builder.load(builder.bitcast(builder.gep(p, [kp]), vty.as_pointer()), align=size)
             for p in bcol]
        a = [_splat(builder, builder.load(builder.gep(p, [k]), align=size), L) for p in arow]
        new = [builder.call(fma, [a[r], b[v], acc[r * nvec + v]]) for r in range(nrow) for v in range(nvec)]
        k.add_incoming(K.type(0), entry)
        k.add_incoming(builder.add(k, K.type(1)), body)
        for phi, x in zip(acc, new):
            phi.add_incoming(zero, entry)
            phi.add_incoming(x, body)
        builder.branch(head)
        # C = α · acc + (C, or 0 when fresh)
        builder.position_at_end(done)
        alpha = _splat(builder, alpha, L)

        def store_all(old):
            for r in range(nrow):
                for v in range(nvec):
                    p = cvector(rows[r], v)
                    x = builder.call(fma, [alpha, acc[r * nvec + v], old(p, v)])
                    if v < nvec - 1:
                        builder.store(x, p, align=size)
                    else:
                        builder.call(mstore, [x, p, i32(size), mask])
        with builder.if_else(fresh) as (overwrite, accumulate):
            with overwrite:
                store_all(lambda p, v: zero)
            with accumulate:
                store_all(cload)
        return context.get_dummy_value()

    return types.void(C, A, Bp, alpha, r0, j0, w, ka, kb, K, fresh, R, NV), codegen


@njit(inline="always")
def _tile_rows(C, A, Bp, alpha, m0, m1, j, w, ka, kb, K, fresh, NV):
    """rows [m0, m1) of C's tile column [j, j+w): 8 rows at a time (with 32 registers),
    then 4, then one by one.  Every row's sums are the same in a tile of any height."""
    r = m0
    if _tall_tiles():
        while r + 8 <= m1:
            _outer_tile(C, A, Bp, alpha, r, j, w, ka, kb, K, fresh, 8, NV)
            r += 8
    while r + 4 <= m1:
        _outer_tile(C, A, Bp, alpha, r, j, w, ka, kb, K, fresh, 4, NV)
        r += 4
    for i in range(r, m1):
        _outer_tile(C, A, Bp, alpha, i, j, w, ka, kb, K, fresh, 1, NV)


# -------------------------------------------------------------------------- epilogues
def epilogue(post, C, m0, m1, j0, j1):
    """Runs on C[m0:m1, j0:j1] once its product is final.  A stub: each user overloads it
    for its own namedtuple type ``post`` (see :data:`NO_POST`, and the cells)."""


def of_type(ty, cls):
    """whether the numba type ``ty`` is the namedtuple class ``cls`` (how an overload of an
    engine stub picks its user's own types)"""
    return isinstance(ty, types.BaseNamedTuple) and ty.instance_class is cls


NoPost = namedtuple("NoPost", "unused")
#: the epilogue that does nothing
NO_POST = NoPost(0)


@overload(epilogue, jit_options={"cache": True})
def _no_post(post, C, m0, m1, j0, j1):
    if of_type(post, NoPost):
        return lambda post, C, m0, m1, j0, j1: None


# --------------------------------------------------------------------------- the product
#: a product's last argument: add to C, or overwrite it (C's old values never read, so C
#: needs no zeroing pass first; the sums are the same bits as onto zeros)
ADD, OVERWRITE = False, True


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def matmul(C, A, Bp, alpha, j0, j1, ka, post, blk, fresh):
    """C[:, j0:j1] (+)= α · A[:, ka:ka+K] B[:, j0:j1], then epilogue(post) on each tile column

    C (M,N) · A (M, >= ka+K) · Bp: B (K,N) packed · j0 a multiple of PANEL · blk = (kc,
    mc) int64 array · fresh: ADD or OVERWRITE (see matmul_k).
    """
    matmul_k(C, A, Bp, alpha, j0, j1, ka, 0, Bp.shape[1], post, blk, fresh)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def matmul_k(C, A, Bp, alpha, j0, j1, ka, k0, k1, post, blk, fresh):
    """C[:, j0:j1] += α · A[:, ka+k0:ka+k1] B[k0:k1, j0:j1] (fresh = ADD) or = it (OVERWRITE),
    then epilogue(post) on each tile column: the product over rows [k0, k1) of B only (a
    sweep's step adds its K ranges one after another, the epilogue with the last)

    blk = (kc, mc) int64 array: [k0, k1) in equal slices of at most kc, rows in panels of
    mc, so that a panel of A and the slice of B under a tile column stay in cache.  Tiles of
    8 (or 4) rows x the tile's vectors (_tile_rows, _outer_tile), the columns left over in a
    tile of fewer vectors.  OVERWRITE applies to the first K slice; the others add.
    """
    M, K = C.shape[0], k1 - k0
    kc, mc = blk[0], blk[1]
    L = vector_lanes(C)
    W = _tile_vectors() * L                         # columns of a full tile
    nk = (K + kc - 1) // kc
    if nk == 0 and j1 > j0:                         # an empty K range: the epilogue alone
        if fresh:
            C[:, j0:j1] = 0
        epilogue(post, C, 0, M, j0, j1)
    for s in range(nk):
        ks, ke = k0 + K * s // nk, k0 + K * (s + 1) // nk
        first = fresh and s == 0
        for m0 in range(0, M, mc):
            m1 = min(m0 + mc, M)
            for j in range(j0, j1, W):
                w = min(W, j1 - j)
                nv = (w + L - 1) // L                   # vectors in this tile column
                if nv == 3:
                    _tile_rows(C, A, Bp, alpha, m0, m1, j, w, ka + ks, ks, ke - ks, first, 3)
                elif nv == 2:
                    _tile_rows(C, A, Bp, alpha, m0, m1, j, w, ka + ks, ks, ke - ks, first, 2)
                else:
                    _tile_rows(C, A, Bp, alpha, m0, m1, j, w, ka + ks, ks, ke - ks, first, 1)
                if s == nk - 1:
                    epilogue(post, C, m0, m1, j, j + w)


@njit(inline="always")
def chunk(N, c, n):
    """columns [j0, j1) of chunk c of n, starts multiples of PANEL (whole vectors for every
    vector width, float32 or float64, and whole panels of a packed B)"""
    j0 = N * c // n // PANEL * PANEL
    j1 = N if c == n - 1 else N * (c + 1) // n // PANEL * PANEL
    return j0, j1


@njit(inline="always")
def row_chunk(M, c, n):
    """rows [r0, r1) of chunk c of n, starts multiples of the tile's 4 rows: each row then
    sits in the same kind of tile however the rows are split, and its sums round alike"""
    r0 = M * c // n // 4 * 4
    r1 = M if c == n - 1 else M * (c + 1) // n // 4 * 4
    return r0, r1


# ------------------------------------------------------------ a gated cell's columns
@functools.lru_cache(maxsize=64)
def interleaved(H, G, lanes):
    """The order in which the engine keeps the G·H columns of a gated cell's products
    (column i here is column cols[i] of the natural [gate 0 | gate 1 | ...] layout): for each
    lane's units [u0, u1) (``chunk(H, c, lanes)``), gate 0's columns, then gate 1's, ...  A
    lane then owns the contiguous columns [G·u0, G·u1) with every gate of its units, so a
    step's pointwise part needs no other lane's columns, and each gate of its units is one
    run of u1 − u0 columns: the pointwise loops run over whole runs, not groups of a vector
    (docs/performance.md, "gate columns").  One lane: the natural order.  A new array, copied
    from one made once per (H, G, lanes)."""
    return _interleaved(H, G, lanes).copy()


@functools.lru_cache(maxsize=64)
def _interleaved(H, G, lanes):
    cols = []
    for c in range(lanes):
        u0, u1 = chunk.py_func(H, c, lanes)
        for g in range(G):
            cols.extend(range(g * H + u0, g * H + u1))
    return np.array(cols, np.int64)


# ---------------------------------------------------------------------------- packing
#: bytes a buffer of the tile's is aligned to: a vector load that straddles two cache lines
#: costs two, and numpy's large arrays start 16 bytes past a page
ALIGN = 64


def empty(shape, dtype):
    """np.empty(shape, dtype), its start aligned to ALIGN bytes (a buffer of a page or less:
    as numpy gives it; the tile's loads need only the element's alignment)"""
    dtype = np.dtype(dtype)
    n = math.prod(shape)
    if n * dtype.itemsize <= 4096:
        return np.empty(shape, dtype)
    raw = np.empty(n * dtype.itemsize + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip:skip + n * dtype.itemsize].view(dtype).reshape(shape)


def packed_shape(K, N):
    """the shape of B (K,N) packed: (panels, K, PANEL)"""
    return (-(-N // PANEL), K, PANEL)


#: rows of B copied to every panel of a chunk before the next rows: a block reads a few
#: dozen pages of B and writes one page per panel, where a panel at a time walks every page
#: of a large B once per panel.  32: the rows a block reads at once are so many streams for
#: the CPU's prefetchers, and 64 are more than they follow (a B not in cache packed slower);
#: see docs/performance.md, "packing in blocks of rows"
PACK_ROWS = 32


@njit(inline="always")
def _is_run(cols, j0, w):
    """whether cols[j0:j0+w] are consecutive (a copy, not a gather)"""
    run = True
    for l in range(w):
        run = run and cols[j0 + l] == cols[j0] + l
    return run


@njit(inline="always")
def _copy_rows(dst, src, k0, k1, s0, w, d0=0):
    """dst[k, d0:d0+w] = src[k, s0:s0+w] for k in [k0, k1): row by row as 1-D slices, a loop
    that vectorizes (indexing src[k, s0 + l] element by element does not)"""
    for k in range(k0, k1):
        a, d = src[k, s0:s0 + w], dst[k, d0:d0 + w]
        for l in range(w):
            d[l] = a[l]


@njit(inline="always")
def _panels(Bp, N, c, n):
    """panels [p0, p1) of chunk c of n of Bp (packed, N columns), their columns past N zeroed"""
    P = Bp.shape[0]
    p0, p1 = P * c // n, P * (c + 1) // n
    for p in range(p0, p1):
        Bp[p, :, min(PANEL, N - p * PANEL):] = 0
    return p0, p1


@njit(inline="always")
def _panel(Bp, p, N):
    """(first column, width, rows) of panel p of Bp (packed, N columns)"""
    j0 = p * PANEL
    return j0, min(PANEL, N - j0), Bp[p]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _pack(Bp, B, p0, p1):
    """panels [p0, p1) of Bp ← B: Bp[p, k, l] = B[k, p·PANEL + l], 0 past B's N columns"""
    K, N = B.shape
    for p in range(p0, p1):
        Bp[p, :, min(PANEL, N - p * PANEL):] = 0
    for k0 in range(0, K, PACK_ROWS):
        for p in range(p0, p1):
            j0, w, dst = _panel(Bp, p, N)
            _copy_rows(dst, B, k0, min(k0 + PACK_ROWS, K), j0, w)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def pack_cpu(Bp, B, n):
    """Bp ← B (K,N) packed in panels of PANEL columns (see packed_shape); B of any layout
    (a transposed view packs Bᵀ) · n chunks of panels"""
    P = Bp.shape[0]
    for c in prange(n):
        _pack(Bp, B, P * c // n, P * (c + 1) // n)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def pack_columns_cpu(Bp, W, cols, transposed, n):
    """Bp ← B packed (see packed_shape), B = W[:, cols] (K = W's rows, N = len(cols)) or,
    with ``transposed``, its transpose (K = len(cols), N = W's rows): a gated cell's weight in
    the engine's column order (``interleaved``) without a permuted copy · n chunks of panels"""
    K = Bp.shape[1]
    N = W.shape[0] if transposed else cols.shape[0]
    runs = runs_of(cols[:0] if transposed else cols)      # the runs serve the plain branch only
    for c in prange(n):
        p0, p1 = _panels(Bp, N, c, n)
        if transposed:                              # B[k, j] = W[j, cols[k]]: 16 rows of W a panel
            L = vector_lanes(W)
            rows = W.strides[1] == W.itemsize                # W's rows hold whole vectors
            for p in range(p0, p1):
                j0, w, dst = _panel(Bp, p, N)
                k = 0
                while k < K:
                    if rows and w == PANEL and k + L <= K and _is_run(cols, k, L):
                        for q in range(0, PANEL, L):        # L x L blocks, transposed in registers
                            _transpose_tile(dst, W, j0 + q, cols[k], q, k)
                        k += L
                    else:
                        ck = cols[k]
                        for l in range(w):
                            dst[k, l] = W[j0 + l, ck]
                        k += 1
        else:                                       # B[k, j] = W[k, cols[j]], in blocks of rows
            j0, j1 = min(p0 * PANEL, N), min(p1 * PANEL, N)
            for k0 in range(0, K, PACK_ROWS):
                _pack_runs(Bp, W, runs, k0, min(k0 + PACK_ROWS, K), j0, j1)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def pack_rows_cpu(Bp, Wt, cols, transposed, n):
    """Bp ← B packed (see packed_shape) for a weight W given as its transpose Wt = Wᵀ (torch's
    layout), without making W: B = W[:, cols] = Wt[cols]ᵀ (K = Wt's columns, N = len(cols))
    or, with ``transposed``, B = W[:, cols]ᵀ = Wt[cols] (K = len(cols), N = Wt's columns) ·
    n chunks of panels.  The same Bp as pack_columns_cpu on W."""
    K = Bp.shape[1]
    N = Wt.shape[1] if transposed else cols.shape[0]
    for c in prange(n):
        p0, p1 = _panels(Bp, N, c, n)
        if transposed:                              # B[k, j] = Wt[cols[k], j]: rows of Wt
            for p in range(p0, p1):
                j0, w, dst = _panel(Bp, p, N)
                for k in range(K):
                    a, d = Wt[cols[k], j0:j0 + w], dst[k, :w]
                    for l in range(w):
                        d[l] = a[l]
        else:                                       # B[k, j] = Wt[cols[j], k]: 16 rows of Wt a panel
            L = vector_lanes(Wt)
            rows = Wt.strides[1] == Wt.itemsize               # Wt's rows hold whole vectors
            for p in range(p0, p1):
                j0, w, dst = _panel(Bp, p, N)
                k = 0
                if rows and w == PANEL and _is_run(cols, j0, PANEL):
                    while k + L <= K:                           # L x L blocks, transposed in registers
                        for q in range(0, PANEL, L):
                            _transpose_tile(dst, Wt, cols[j0] + q, k, q, k)
                        k += L
                for kk in range(k, K):                          # the rest element by element
                    for l in range(w):
                        dst[kk, l] = Wt[cols[j0 + l], kk]


@njit(cache=True, error_model="numpy")
def runs_of(cols):
    """the column order ``cols`` (column j of B is column cols[j] of its source) as runs of
    consecutive source columns: (R,3) int64 rows (first column j, its source column, length)"""
    N = cols.shape[0]
    R = 0
    for j in range(N):
        R += j == 0 or cols[j] != cols[j - 1] + 1
    runs = np.empty((R, 3), np.int64)
    r = -1
    for j in range(N):
        if j == 0 or cols[j] != cols[j - 1] + 1:
            r += 1
            runs[r, 0], runs[r, 1], runs[r, 2] = j, cols[j], 0
        runs[r, 2] += 1
    return runs


@functools.lru_cache(maxsize=64)
def natural_runs(H, G, lanes):
    """runs_of the natural order of G·H columns kept in the ``interleaved(H, G, lanes)``
    order: natural column j is column argsort(cols)[j] (one run with one lane)"""
    return runs_of(np.argsort(interleaved(H, G, lanes)))


@njit(inline="always")
def _clip(runs, i, j0, j1):
    """run i of ``runs`` within columns [j0, j1): (lo, hi, the source column of lo); none when
    lo >= hi"""
    c, a, w = runs[i, 0], runs[i, 1], runs[i, 2]
    lo, hi = max(c, j0), min(c + w, j1)
    return lo, hi, a + lo - c


@njit(inline="always")
def _pack_runs(Bp, D, runs, k0, k1, j0, j1):
    """rows [k0, k1) of B = D[:, cols] (cols given by its runs) into Bp's columns [j0, j1): each
    run's columns a panel's part at a time, as row copies"""
    for i in range(runs.shape[0]):
        lo, hi, a = _clip(runs, i, j0, j1)
        while lo < hi:
            w = min(PANEL - lo % PANEL, hi - lo)
            _copy_rows(Bp[lo // PANEL], D, k0, k1, a, w, lo % PANEL)
            lo, a = lo + w, a + w


#: columns summed at a time by the passes that add rows into a few (a bias gradient's sums, the
#: scatter-add of token ids' ∂W_xh): four AVX-512 vectors, so that the block's sums and the
#: rows of ∂W_xh it adds into stay in L1 while the rows stream past, and each add is its own
#: loop over the block, which vectorizes (docs/performance.md, "sums in blocks of columns")
SUM_COLS = 64


@njit(inline="always")
def add_to(dst, src, w):
    """dst[:w] += src[:w] (1-D)"""
    for j in range(w):
        dst[j] += src[j]


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def pack_sums_cpu(Bp, sums, D, runs, E, ids, n):
    """Bp ← B packed (see packed_shape), sums = Σ_k B[k] and, when E has rows, the scatter-add
    E[ids[k]] += B[k] (E zeroed first), B = D[:, cols] with cols given by its runs
    (``runs_of``; K = D's rows): a weight gradient's right factor, its bias gradient and, for
    token ids, ∂W_xh from one read of D · n chunks of panels.  Each element of sums and E
    sums over k in order, whatever n.  A block of rows is packed, then summed while in cache."""
    K = Bp.shape[1]
    N = sums.shape[0]
    for c in prange(n):
        p0, p1 = _panels(Bp, N, c, n)
        j0, j1 = min(p0 * PANEL, N), min(p1 * PANEL, N)
        sums[j0:j1] = 0
        E[:, j0:j1] = 0
        for k0 in range(0, K, PACK_ROWS):
            k1 = min(k0 + PACK_ROWS, K)
            _pack_runs(Bp, D, runs, k0, k1, j0, j1)
            for i in range(runs.shape[0]):
                lo, hi, a = _clip(runs, i, j0, j1)
                for q in range(lo, hi, SUM_COLS):       # the rows' sums, a block of columns at a time
                    w = min(SUM_COLS, hi - q)
                    aq = a + q - lo
                    s = sums[q:q + w]
                    for k in range(k0, k1):
                        add_to(s, D[k, aq:aq + w], w)
                    if E.shape[0] > 0:
                        for k in range(k0, k1):
                            add_to(E[ids[k], q:q + w], D[k, aq:aq + w], w)


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def unpermute_cpu(out, a, H, lanes, n):
    """out = a (rows, G·H) with its columns from the ``interleaved(H, G, lanes)`` order back
    to the natural one, a lane's gate at a time · n row chunks"""
    M, GH = a.shape
    G = GH // H
    for c in prange(n):
        for r in range(M * c // n, M * (c + 1) // n):
            src, dst = a[r], out[r]
            for o in range(lanes):
                u0, u1 = chunk(H, o, lanes)
                m = u1 - u0
                for g in range(G):
                    d = dst[g * H + u0:g * H + u1]
                    s = src[G * u0 + g * m:G * u0 + (g + 1) * m]
                    for l in range(m):
                        d[l] = s[l]


def packed(B, n):
    """B (K,N) packed in a new array (see pack_cpu)"""
    Bp = empty(packed_shape(*B.shape), B.dtype)
    pack_cpu(Bp, B, n)
    return Bp


# --------------------------------------------------------------------- whole products
@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def gemm_cpu(C, A, Bp, alpha, blk, n, fresh):
    """C (+)= α · A B · C (M,N) · A (M,K) · Bp: B (K,N) packed · blk (kc, mc) · n column
    chunks · fresh: ADD or OVERWRITE"""
    for c in prange(n):
        j0, j1 = chunk(C.shape[1], c, n)
        matmul(C, A, Bp, alpha, j0, j1, _0, NO_POST, blk, fresh)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def column_sums(out, A, j0, j1):
    """out[j0:j1] = Σ_r A[r, j0:j1]"""
    o = out[j0:j1]
    o[:] = 0
    for r in range(A.shape[0]):
        add_to(o, A[r, j0:j1], o.shape[0])


# -------------------------------------------------------------------------- transposes
@intrinsic
def _transpose_tile(typingctx, dst, src, r0, j0, dr0, dj0):
    """dst[dj0+c, dr0+i] = src[r0+i, j0+c] for i, c < L, L the lanes of a vector register
    (16 float32 with AVX-512): L rows loaded as vectors, transposed in registers by log2(L)
    rounds of two-vector shuffles, stored as L rows (dst, src: C-contiguous 2-D)"""
    def codegen(context, builder, sig, args):
        dty, sty = sig.args[0], sig.args[1]
        fty = context.get_value_type(sty.dtype)
        L, size = _lanes(fty, context), context.get_abi_sizeof(fty)
        vty, i32 = ir.VectorType(fty, L), ir.IntType(32)
        dary = context.make_array(dty)(context, builder, args[0])
        sary = context.make_array(sty)(context, builder, args[1])
        r0, j0, dr0, dj0 = (context.cast(builder, args[i], sig.args[i], types.intp) for i in range(2, 6))

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
            builder.store(rows[c], row(dty, dary, builder.add(dj0, dj0.type(c)), dr0), align=size)
        return context.get_dummy_value()
    return types.void(dst, src, r0, j0, dr0, dj0), codegen


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _transpose(dst, src, j0, j1):
    """dst[j] = src[:, j] for j in [j0, j1) · dst (H,N) · src (N,H): in L x L tiles
    (_transpose_tile, L the lanes of a vector register), the edges element by element"""
    N = src.shape[0]
    L = vector_lanes(src)
    nr, jt = N // L * L, j0 + (j1 - j0) // L * L
    for r0 in range(0, nr, L):
        for j in range(j0, jt, L):
            _transpose_tile(dst, src, r0, j, r0, j)
    for r0 in range(0, N, L):                  # the columns left over, and the rows left over
        r1 = min(r0 + L, N)
        for j in range(jt if r0 < nr else j0, j1):
            d = dst[j, r0:r1]
            for i in range(d.shape[0]):
                d[i] = src[r0 + i, j]


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def transpose_cpu(dst, src, n):
    """dst = srcᵀ · dst (H,N) out · src (N,H) · n chunks of dst's rows"""
    for c in prange(n):
        j0, j1 = chunk(src.shape[1], c, n)
        _transpose(dst, src, j0, j1)
