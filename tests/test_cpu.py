"""Kernel-level properties of the CPU engine (fastbptt._cpu) not visible through the API."""
import numpy as np
import pytest

import reference
from fastbptt import _host
from fastbptt._cpu import arrays, elman, fastmath, head, products
from fastbptt._cpu.products import NO_POST, packed

BLK = np.array([64, 32])          # small K slices and row panels, so that shapes cross them
KC, MC = (int(x) for x in BLK)


def test_float32_tanh_is_accurate_everywhere():
    x = np.concatenate([np.linspace(-20, 20, 400001), [0.0, 1e-30, -1e-8, 7.9, 7.91, 100.0, -100.0]])
    x = x.astype(np.float32)
    out = np.empty_like(x)
    fastmath.tanh_cpu(out, x)
    err = np.abs(out.astype(np.float64) - np.tanh(x.astype(np.float64)))
    assert err.max() < 1e-6
    assert np.all(np.abs(out) <= 1.0)
    assert np.all(np.sign(out) == np.sign(x))
    # saturated: exactly ±1 (1 − tanh² = 0) from where tanh rounds to ±1 in float32 (9.010914)
    x = np.array([9.010914, 9.5, 20.0, 1e30, np.inf, -9.010914, -np.inf], np.float32)
    out = np.empty_like(x)
    fastmath.tanh_cpu(out, x)
    np.testing.assert_array_equal(out, np.sign(x))
    fastmath.tanh_cpu(out[:1], np.array([np.nan], np.float32))
    assert np.isnan(out[0])


def test_float64_tanh_is_numpy():
    x = np.linspace(-10, 10, 1001)
    out = np.empty_like(x)
    fastmath.tanh_cpu(out, x)
    np.testing.assert_allclose(out, np.tanh(x), rtol=1e-15, atol=1e-16)


def test_float32_exp_is_accurate_everywhere():
    # the softmax's arguments are <= 0; the rest of float32's range for good measure
    x = np.concatenate([np.linspace(-87, 88, 1750001), [0.0, -0.0, 1e-30, -1e-8]]).astype(np.float32)
    out = np.empty_like(x)
    fastmath.exp_cpu(out, x)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - want) / want) < 5e-7
    assert out[-4] == out[-3] == 1.0
    tiny = np.array([-87.5, -200.0, -np.inf], np.float32)    # clamped: tiny, never 0 or NaN
    fastmath.exp_cpu(out[:3], tiny)
    assert np.all((out[:3] > 0) & (out[:3] < 1.3e-38))
    fastmath.exp_cpu(out[:17], np.full(17, np.nan, np.float32))  # NaN stays NaN (vector and tail)
    assert np.all(np.isnan(out[:17]))


def test_float32_sigmoid_is_accurate_relative_to_itself_everywhere():
    # relative to σ on both sides: a closed gate (σ of a large negative x) is near 0, so that
    # z·h and f·c of a large state vanish as they should (½ + ½ tanh(x/2) stopped at 1.2e-7)
    x = np.concatenate([np.linspace(-87, 88, 1750001), [0.0, -0.0, 1e-30, -1e-8, -100.0, 100.0]])
    x = x.astype(np.float32)
    out = np.empty_like(x)
    fastmath.sigmoid_cpu(out, x)
    want = 1 / (1 + np.exp(-x.astype(np.float64)))
    inside = x >= -87                                       # beyond, e^x is clamped at 1.2e-38
    assert np.max(np.abs(out - want)[inside] / want[inside]) < 1e-6
    assert np.all((out >= 0) & (out <= 1))
    assert out[-6] == out[-5] == np.float32(0.5) and out[-1] == 1.0 and out[-2] == 0.0
    fastmath.sigmoid_cpu(out[:3], np.array([-np.inf, np.inf, -87.5], np.float32))
    np.testing.assert_array_equal(out[:3], [0.0, 1.0, 0.0])
    fastmath.sigmoid_cpu(out[:17], np.full(17, np.nan, np.float32))   # NaN stays NaN (vector and tail)
    assert np.all(np.isnan(out[:17]))


def test_float64_exp_is_numpy():
    x = np.linspace(-700, 700, 1001)
    out = np.empty_like(x)
    fastmath.exp_cpu(out, x)
    np.testing.assert_allclose(out, np.exp(x), rtol=1e-15)


# ------------------------------------------------------------- the validation's scans
SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-310, 5e-324, -1e300, 3.0e38, 1.0, -7.5]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 7, 16, 33, 1000])
def test_nonfinite_count_is_numpys(dtype, n):
    rng = np.random.default_rng(n)
    with np.errstate(over="ignore"):
        values = np.array(SPECIALS, dtype)
    for _ in range(20):
        a = rng.standard_normal(n).astype(dtype)
        picks = rng.integers(0, n, rng.integers(0, 4))
        a[picks] = rng.choice(values, picks.size)
        for shaped in (a, a.reshape(1, n), a.reshape(n, 1, 1)):
            assert arrays.count_nonfinite_cpu(shaped) == np.count_nonzero(~np.isfinite(shaped))
            assert arrays.first_nonfinite(shaped) == _host.first_nonfinite(shaped)


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_nonfinite_count_split_between_threads_is_numpys(n):
    rng = np.random.default_rng(n)
    for dtype in (np.float32, np.float64):
        a = rng.standard_normal(arrays.PARALLEL_SCAN + 37).astype(dtype)
        assert arrays.count_nonfinite_par(a, n) == 0
        a[rng.integers(0, a.size, 5)] = [np.nan, np.inf, -np.inf, np.nan, np.inf]
        a[-1] = np.nan                                           # in the last chunk
        assert arrays.count_nonfinite_par(a, n) == np.count_nonzero(~np.isfinite(a))
        assert arrays.first_nonfinite(a.reshape(-1, 1)) == _host.first_nonfinite(a.reshape(-1, 1))


def test_first_nonfinite_of_any_array_is_hosts():
    a = np.arange(12.0).reshape(3, 4)
    a[2, 1] = np.inf
    for view in (a, a.T, a[:, ::2], a.astype(np.float16), np.empty((0, 3))):
        assert arrays.first_nonfinite(view) == _host.first_nonfinite(view)
    assert arrays.first_nonfinite(a) == "inf at index (2, 1)"


def test_id_range_is_numpys():
    rng = np.random.default_rng(0)
    for shape in [(1,), (35, 32), (3, 1)]:
        ids = rng.integers(-2**62, 2**62, shape)
        assert arrays.id_range(ids) == (ids.min(), ids.max())
    ids = np.array([[5, np.iinfo(np.int64).max], [np.iinfo(np.int64).min, 0]])
    assert arrays.id_range(ids) == (np.iinfo(np.int64).min, np.iinfo(np.int64).max)
    assert arrays.id_range(ids.T) == _host.id_range(ids.T)                 # not contiguous
    assert arrays.id_range(ids.astype(np.int32)) == _host.id_range(ids.astype(np.int32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_hot_ids_are_numpys_and_any_other_row_is_refused(dtype):
    rng = np.random.default_rng(1)
    R, D = 50, 6
    want = rng.integers(0, D, R)
    X = np.eye(D, dtype=dtype)[want]
    ids = np.full(R, -1)
    assert arrays.one_hot_ids_cpu(ids, X) and np.array_equal(ids, want)
    X[7, 3] = -0.0                                          # a negative zero is a zero
    assert arrays.one_hot_ids_cpu(ids, X) and np.array_equal(ids, want)
    for r in (0, 7, R - 1):                                 # the first, a middle and the last row
        for v in (0.5, -1.0, 2.0, np.nan, np.inf, 1.0):     # 1.0: a second 1 in the row
            Y = X.copy()
            Y[r, (want[r] + 1) % D] = v
            assert not arrays.one_hot_ids_cpu(ids, Y), (r, v)
        Y = X.copy()
        Y[r] = 0                                            # a row of zeros
        assert not arrays.one_hot_ids_cpu(ids, Y)
        Y[r, want[r]] = np.nan                              # its one nonzero not a 1
        assert not arrays.one_hot_ids_cpu(ids, Y)


def test_softmax_head_is_stable_for_huge_logits():
    Hs = np.array([[1000.0, -1000.0], [0.0, 0.0]], np.float32)
    W_hq = np.eye(2, dtype=np.float32)
    b_q = np.zeros(2, np.float32)
    Y = np.array([1, 0])
    dHs = np.empty_like(Hs)
    dW, db, logits = np.empty((2, 2), np.float32), np.empty(2, np.float32), np.empty((2, 2), np.float32)
    dop, row_loss = np.empty(products.packed_shape(2, 2), np.float32), np.empty(2)
    head.head_forward_backward_cpu(dHs, dW, db, logits, dop, row_loss, Hs, np.ascontiguousarray(Hs.T),
                                   0, Y, packed(W_hq, 1), packed(W_hq.T, 1), b_q, 1.0, BLK, 2)
    loss = row_loss.sum()
    assert np.isfinite(loss) and abs(loss - (2000.0 + np.log(2))) < 1e-2
    assert np.all(np.isfinite(dHs)) and np.all(np.isfinite(dW))


# ------------------------------------------------------------- the blocked products
# Shapes chosen to reach every branch of matmul: rows not a multiple of 4 (the one-row
# tiles), tile columns of 1 to 4 vectors, full and masked (16 float32 or 8 float64 lanes a
# vector with AVX-512), more rows than one MC panel, K over KC (two and three slices), N
# not a multiple of the packed panels' 16 columns, a column offset into A.
PRODUCT_SHAPES = [(1, 3, 1), (3, 5, 7), (5, 70, 9), (9, 130, 66), (MC + 7, 67, 13),
                  (6, KC + 37, 10), (4, 64, 4), (7, 65, 11), (8, 2 * KC + 3, 140),
                  (13, 40, 57), (4, 16, 40), (2, 9, 33), (3, 17, 1000)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("M,K,N", PRODUCT_SHAPES)
def test_products_match_numpy_in_float64(M, K, N, dtype, rng):
    ka = 3                                                  # A's columns start at ka
    A = rng.normal(size=(M, ka + K + 2)).astype(dtype)
    B = rng.normal(size=(K, N)).astype(dtype)
    C0 = rng.normal(size=(M, N)).astype(dtype)
    alpha, j0, j1 = dtype(0.75), 16 * (N > 20), N - (N > 5)  # a column range (starts: whole panels)
    want = C0.astype(np.float64)
    want[:, j0:j1] += 0.75 * A[:, ka:ka + K].astype(np.float64) @ B[:, j0:j1].astype(np.float64)
    C = C0.copy()
    products.matmul(C, A, packed(B, 2), alpha, j0, j1, ka, NO_POST, BLK, products.ADD)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(C, want, rtol=tol, atol=tol * np.sqrt(K) * np.abs(want).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("M,K,N", PRODUCT_SHAPES + [(5, 0, 9)])
def test_an_overwriting_product_never_reads_c(M, K, N, dtype, rng):
    # OVERWRITE: C's old values (NaN here) are never read, and the result is the same bits as
    # the product added onto zeros, over one K slice or several (K > KC), and 0 for K = 0
    A = rng.normal(size=(M, K)).astype(dtype)
    Bp = packed(rng.normal(size=(K, N)).astype(dtype), 2)
    j0, j1 = 16 * (N > 20), N - (N > 5)
    want = np.zeros((M, N), dtype)
    products.matmul(want, A, Bp, dtype(0.75), j0, j1, 0, NO_POST, BLK, products.ADD)
    C = np.full((M, N), np.nan, dtype)
    products.matmul(C, A, Bp, dtype(0.75), j0, j1, 0, NO_POST, BLK, products.OVERWRITE)
    assert np.array_equal(C[:, j0:j1], want[:, j0:j1])
    assert np.isnan(C[:, :j0]).all() and np.isnan(C[:, j1:]).all()     # outside the range: untouched
    G = np.full((M, N), np.nan, dtype)
    products.gemm_cpu(G, A, Bp, dtype(0.75), BLK, 2, products.OVERWRITE)
    want = np.zeros((M, N), dtype)
    products.gemm_cpu(want, A, Bp, dtype(0.75), BLK, 2, products.ADD)
    assert np.array_equal(G, want)


@pytest.mark.parametrize("act", [elman.TANH, elman.RELU, elman.IDENTITY])
@pytest.mark.parametrize("M,K,N", [(5, 70, 9), (MC + 7, KC + 37, 70)])
def test_product_then_the_cells_epilogue(M, K, N, act, rng):
    # the cell's elementwise pass runs on each tile once its last K slice is in
    phi = {elman.TANH: np.tanh, elman.RELU: lambda z: np.maximum(z, 0), elman.IDENTITY: lambda z: z}[act]
    dphi = {elman.TANH: lambda y: 1 - y * y, elman.RELU: lambda y: (y > 0) * 1.0,
            elman.IDENTITY: lambda y: np.ones_like(y)}[act]
    A, B = rng.normal(size=(M, K)) / np.sqrt(K), rng.normal(size=(K, N))
    C0, Y = rng.normal(size=(M, N)), np.tanh(rng.normal(size=(M, N)))
    j0, j1 = 16 * (N > 20), N - 1
    z = C0[:, j0:j1] + 0.5 * A @ B[:, j0:j1]
    C = C0.copy()
    products.matmul(C, A, packed(B, 1), 0.5, j0, j1, 0, elman.Activate(act), BLK, products.ADD)
    np.testing.assert_allclose(C[:, j0:j1], phi(z), rtol=1e-12, atol=1e-12)
    assert np.array_equal(C[:, :j0], C0[:, :j0]) and np.array_equal(C[:, j1:], C0[:, j1:])
    C = C0.copy()
    products.matmul(C, A, packed(B, 1), 0.5, j0, j1, 0, elman.Derivative(Y, act), BLK,
                    products.ADD)
    np.testing.assert_allclose(C[:, j0:j1], z * dphi(Y[:, j0:j1]), rtol=1e-12, atol=1e-12)


_OTHER_CPU = """
import numpy as np
from fastbptt._cpu import products
rng = np.random.default_rng(0)
for dt in (np.float32, np.float64):
    for M, K, N in [(7, 70, 45), (70, 600, 19), (1, 9, 3)]:
        A, B, C = (rng.normal(size=s).astype(dt) for s in ((M, K), (K, N), (M, N)))
        want = C + A.astype(float) @ B.astype(float)
        products.matmul(C, A, products.packed(B, 1), dt(1), 0, N, 0, products.NO_POST, np.array([128, 64]),
                        products.ADD)
        np.testing.assert_allclose(C, want, rtol=2e-5, atol=2e-5 * np.sqrt(K) * abs(want).max())
        T = np.empty((K, M), dt)
        products.transpose_cpu(T, A, 2)
        assert np.array_equal(T, A.T)
print(products.vector_shape())
"""


@pytest.mark.parametrize("cpu,features,shape", [
    ("haswell", "+avx,+avx2,+fma,+sse,+sse2,+sse3,+ssse3,+sse4.1,+sse4.2,+popcnt,+f16c", "(32, 16)"),
    ("x86-64", "+sse,+sse2", "(16, 16)")])
def test_kernels_are_exact_for_other_vector_widths(cpu, features, shape, tmp_path):
    # the IR kernels take their vector width and tile from the CPU numba compiles for:
    # compile them for an AVX2 and an SSE2 machine in a fresh process, run them here
    import os
    import subprocess
    import sys

    from llvmlite import binding
    host = binding.get_host_cpu_features().flatten().split(",")
    if binding.get_process_triple().split("-")[0] not in ("x86_64", "amd64") or any(
            f not in host for f in features.split(",")):
        pytest.skip(f"this CPU cannot run code compiled for {cpu}")
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features,
               NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _OTHER_CPU], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == shape


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_parallel_product_and_transpose_split_any_way(n, rng):
    A, B = rng.normal(size=(13, 70)), rng.normal(size=(70, 22))
    C = np.ones((13, 22))
    products.gemm_cpu(C, A, packed(B, n), 1.0, BLK, n, products.ADD)
    np.testing.assert_allclose(C, 1.0 + A @ B, rtol=1e-12, atol=1e-12)
    T_ = np.empty((70, 13))
    products.transpose_cpu(T_, A, n)
    assert np.array_equal(T_, A.T)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,H", [(1, 1), (5, 3), (16, 16), (17, 33), (40, 130), (300, 70)])
def test_transpose_is_exact_in_tiles_and_at_the_edges(N, H, dtype, rng):
    # tiles of 16 (float32) or 8 (float64) rows and columns with AVX-512, the rest element
    # by element
    src = rng.normal(size=(N, H)).astype(dtype)
    for n in (1, 2, 3):
        dst = np.full((H, N), np.nan, dtype)
        products.transpose_cpu(dst, src, n)
        assert np.array_equal(dst, src.T)


# ------------------------------------------------------------------- the sweeps' lanes
def _sweep_case(rng, T=9, B=3, H=200):
    W = (rng.normal(size=(H, H)) / np.sqrt(H)).astype(np.float64)
    Hx = rng.normal(size=(T + 1, B, H))
    dZ = rng.normal(size=(T, B, H))
    xi = np.where(rng.random(T) < 0.3, 0.0, 2.0)
    xi[T - 2] = 0.0                                        # one skipped product for sure
    return W, np.ascontiguousarray(W.T), Hx, dZ, xi


@pytest.mark.parametrize("threads,lanes", [(1, 2), (1, 3), (2, 3), (2, 2), (1, 1)])
def test_sweeps_are_exact_however_the_lanes_are_run(threads, lanes, rng):
    # with fewer threads than lanes, a lane starts only after another has finished:
    # the running one must take over the missing lane's steps instead of waiting forever
    numba = pytest.importorskip("numba")
    W, WT, Hx, dZ, xi = _sweep_case(rng)
    want_H = reference.sweep_forward(W, Hx)
    want_D, _ = reference.sweep_backward(W, Hx, dZ, xi)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        H = Hx.copy()
        elman.forward_cpu(H, packed(W, 1), elman.TANH, BLK, lanes, 2, False)
        D = dZ.copy()
        elman.backward_cpu(D, Hx, packed(WT, 1), xi, elman.TANH, BLK, lanes, 2)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_allclose(H, want_H, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(D, want_D, rtol=1e-12, atol=1e-12)
