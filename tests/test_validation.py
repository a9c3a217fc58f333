"""Bad input: a clear ValueError/TypeError/KeyError naming the argument, never a crash."""
import numpy as np
import pytest

import fastbptt
from helpers import make_case


@pytest.fixture
def case(rng):
    return make_case(rng, T=4, B=3, D=5, H=6, Q=7)


def call(params, X, Y, h0=None, **kw):
    return fastbptt.loss_and_grad(params, X, Y, h0, **kw)


def test_token_out_of_range_message(case):
    params, X, Y, h0 = case
    X = X.copy()
    X[1, 2] = 31
    with pytest.raises(ValueError, match=r"X: token id 31 out of range \[0, 5\)"):
        call(params, X, Y)
    X[1, 2] = -1
    with pytest.raises(ValueError, match=r"X: token id -1 out of range"):
        call(params, X, Y)
    X = X.astype(np.uint64) * 0
    X[1, 2] = 2**63 + 5                                 # past int64: not read as a negative id
    with pytest.raises(ValueError, match=r"X: token id 2\*\*63 or more out of range"):
        call(params, X, Y)


def test_target_out_of_range(case):
    params, X, Y, h0 = case
    Y = Y.copy()
    Y[0, 0] = 7
    with pytest.raises(ValueError, match=r"Y: token id 7 out of range \[0, 7\)"):
        call(params, X, Y)


@pytest.mark.parametrize("mutate, exc, pattern", [
    (lambda p: p.pop("W_hh"), KeyError, "W_hh"),
    (lambda p: p.update(extra=np.zeros(3)), ValueError, "extra"),
    (lambda p: p.update(W_hh=p["W_hh"][:, :5]), ValueError, "W_hh"),
    (lambda p: p.update(b_h=np.zeros(5)), ValueError, "b_h"),
    (lambda p: p.update(W_hq=np.zeros((5, 7))), ValueError, "W_hq"),
    (lambda p: p.update(b_q=np.zeros(6)), ValueError, "b_q"),
    (lambda p: p.update(W_xh=np.zeros(6)), ValueError, "W_xh"),
    (lambda p: p.update(W_xh=np.zeros((5, 6), np.int64)), TypeError, "W_xh"),
    (lambda p: p.update(W_xh=np.zeros((5, 6), np.float16)), TypeError, "W_xh"),
    (lambda p: p["W_hh"].__setitem__((0, 0), np.nan), ValueError, "W_hh.*non-finite"),
    (lambda p: p["b_q"].__setitem__(0, np.inf), ValueError, "b_q.*non-finite"),
])
def test_bad_params(case, mutate, exc, pattern):
    params, X, Y, h0 = case
    params = {k: v.copy() for k, v in params.items()}
    mutate(params)
    with pytest.raises(exc, match=pattern):
        call(params, X, Y)


def test_params_not_a_dict(case):
    _, X, Y, _ = case
    with pytest.raises(TypeError, match="params"):
        call([1, 2], X, Y)


@pytest.mark.parametrize("make_X, exc, pattern", [
    (lambda X: X[:, :, None], ValueError, "X"),
    (lambda X: X[0], ValueError, "X"),
    (lambda X: X[:0], ValueError, "X: empty"),
    (lambda X: X.astype(bool), TypeError, "X"),
    (lambda X: X.astype(np.float64), ValueError, "X: dense input must have shape"),
    (lambda X: np.zeros((4, 3, 4)), ValueError, "X: dense input has D=4"),
    (lambda X: np.full((4, 3, 5), np.nan), ValueError, "X: non-finite"),
    (lambda X: X.astype(str), TypeError, "X"),
])
def test_bad_X(case, make_X, exc, pattern):
    params, X, Y, _ = case
    with pytest.raises(exc, match=pattern):
        call(params, make_X(X), Y)


@pytest.mark.parametrize("make_Y, exc, pattern", [
    (lambda Y: Y[:3], ValueError, r"Y: expected shape \(4, 3\)"),
    (lambda Y: Y.astype(np.float32), TypeError, "Y"),
    (lambda Y: Y[..., None], ValueError, "Y"),
])
def test_bad_Y(case, make_Y, exc, pattern):
    params, X, Y, _ = case
    with pytest.raises(exc, match=pattern):
        call(params, X, make_Y(Y))


@pytest.mark.parametrize("h0, exc, pattern", [
    (np.zeros((3, 5)), ValueError, "h0: expected shape"),
    (np.zeros((3, 6), np.int64), TypeError, "h0"),
    (np.full((3, 6), np.inf), ValueError, "h0: non-finite"),
])
def test_bad_h0(case, h0, exc, pattern):
    params, X, Y, _ = case
    with pytest.raises(exc, match=pattern):
        call(params, X, Y, h0)


@pytest.mark.parametrize("kw, exc, pattern", [
    (dict(activation="sigmoid"), ValueError, "activation"),
    (dict(activation=None), ValueError, "activation"),
    (dict(reduction="max"), ValueError, "reduction"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(reduction=np.array(["mean", "sum"])), ValueError, "reduction"),
    (dict(device=np.array(["cpu", "cpu"])), TypeError, "device"),
    (dict(truncation="partial"), ValueError, "truncation"),
    (dict(truncation=3), TypeError, "truncation"),
])
def test_bad_options(case, kw, exc, pattern):
    params, X, Y, _ = case
    with pytest.raises(exc, match=pattern):
        call(params, X, Y, **kw)


def test_cuda_without_gpu_is_a_clear_runtime_error(case):
    params, X, Y, _ = case
    try:
        import fastbptt._cuda as cu
        if cu.available():
            pytest.skip("a CUDA device is available here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match=r"device='cuda' needs numba-cuda and a CUDA GPU"):
        call(params, X, Y, device="cuda")


@pytest.mark.parametrize("ctor, exc", [
    (lambda: fastbptt.Truncated(0), ValueError), (lambda: fastbptt.Truncated(-2), ValueError),
    (lambda: fastbptt.Truncated(2.5), TypeError), (lambda: fastbptt.Truncated(True), TypeError),
    (lambda: fastbptt.Randomized(0), ValueError), (lambda: fastbptt.Randomized(-0.1), ValueError),
    (lambda: fastbptt.Randomized(1.01), ValueError), (lambda: fastbptt.Randomized("0.5"), TypeError),
    (lambda: fastbptt.Randomized(0.5, seed="x"), TypeError),
])
def test_bad_truncation_objects(ctor, exc):
    with pytest.raises(exc, match="Truncated|Randomized"):
        ctor()


def test_rnn_backward_bad_shapes(case):
    params, X, _, h0 = case
    Hs = fastbptt.rnn_forward(params, X, h0)
    with pytest.raises(ValueError, match="dHs"):
        fastbptt.rnn_backward(params, X, Hs, Hs[:2], h0)
    with pytest.raises(ValueError, match="Hs"):
        fastbptt.rnn_backward(params, X, Hs[:, :2], Hs, h0)


@pytest.mark.parametrize("args, exc", [
    ((0, 3, 4), ValueError), ((2, -1, 4), ValueError), ((2, 3.0, 4), TypeError),
])
def test_bad_init_sizes(args, exc):
    with pytest.raises(exc, match="size"):
        fastbptt.init_params(*args)


def test_init_params_bad_seed_and_sizes_too_large_to_allocate():
    with pytest.raises(ValueError, match=r"^seed: .*\(got -1\)"):
        fastbptt.init_params(2, 3, 4, seed=-1)
    with pytest.raises(TypeError, match=r"^seed: .*\(got 'x'\)"):
        fastbptt.init_params(2, 3, 4, seed="x")
    # past any address space (MemoryError, whatever the overcommit), and numpy's "array is too big"
    for sizes in ((3, 10**14, 5), (2**62, 2**62, 5)):
        with pytest.raises(ValueError, match=r"^hidden_size: .* parameters cannot be allocated here"):
            fastbptt.init_params(*sizes)


def test_bad_init_dtype():
    with pytest.raises(TypeError, match="dtype"):
        fastbptt.init_params(2, 3, 4, dtype=np.int32)


def test_cuda_array_on_the_cpu_path_is_a_type_error(case):
    params, X, Y, _ = case

    class DeviceArray:                      # anything exposing the CUDA array interface
        __cuda_array_interface__ = {"shape": (4, 3), "typestr": "<i8", "data": (0, False), "version": 3}

    with pytest.raises(TypeError, match="X: a CUDA array needs device='cuda'"):
        call(params, DeviceArray(), Y)


STRIDED = {"transposed": lambda W: np.ascontiguousarray(W.T).T,
           "every-other-row": lambda W: np.repeat(W, 2, axis=0)[::2],
           "column-slice": lambda W: np.hstack([np.ones((W.shape[0], 1)), W])[:, 1:]}


@pytest.mark.parametrize("layout", list(STRIDED))
def test_strided_weights_give_the_contiguous_result(rng, layout):
    """a strided weight (copied in blocks, ragged edges included) is its values, the caller's
    array left as it was"""
    params = fastbptt.init_params(200, 130, 7, seed=1, dtype=np.float64)
    X, Y = rng.integers(0, 200, (3, 2)), rng.integers(0, 7, (3, 2))
    want = fastbptt.loss_and_grad(params, X, Y)
    strided = dict(params, W_xh=STRIDED[layout](params["W_xh"]))
    assert not strided["W_xh"].flags.c_contiguous
    before = strided["W_xh"].copy()
    got = fastbptt.loss_and_grad(strided, X, Y)
    assert got[0] == want[0]
    for k in want[1]:
        np.testing.assert_array_equal(got[1][k], want[1][k])
    np.testing.assert_array_equal(strided["W_xh"], before)


@pytest.mark.parametrize("layout", list(STRIDED))
def test_strided_normalized_converts_dtype(rng, layout):
    from fastbptt import _host
    W = rng.standard_normal((150, 97))
    a = STRIDED[layout](W)
    got = _host.normalized("W", a, np.float32)
    assert got.flags.c_contiguous and got.flags.writeable and got.dtype == np.float32
    np.testing.assert_array_equal(got, W.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(150, 97), (16, 48), (1, 40), (33, 1)])
def test_cpu_normalized_transposes_a_transposed_array(rng, dtype, shape):
    """a weight given as Wᵀ (the engine's vector transpose: whole tiles, ragged edges, one row or
    column) is its values, in a new C-contiguous array; the caller's array left as it was"""
    from fastbptt import _cpu
    W = rng.standard_normal(shape).astype(dtype)
    a = np.ascontiguousarray(W.T).T
    before = a.copy()
    got = _cpu.normalized("W", a, dtype)
    assert got.flags.c_contiguous and got.flags.writeable and got.dtype == dtype
    np.testing.assert_array_equal(got, W)
    np.testing.assert_array_equal(a, before)
    if not a.flags.c_contiguous:
        assert not np.shares_memory(got, a)


def test_transposed_weights_of_calls_in_turn_are_each_their_own(rng):
    """a transposed weight is made contiguous into a buffer kept for the next call: calls with
    other weights in turn (and another dtype between) each give their own contiguous result"""
    cases = []
    for seed, dt in [(1, np.float32), (2, np.float32), (3, np.float64)]:
        params = fastbptt.init_params(20, 40, 7, seed=seed, dtype=dt)
        X, Y = rng.integers(0, 20, (5, 3)), rng.integers(0, 7, (5, 3))
        given = {k: (np.ascontiguousarray(v.T).T if v.ndim == 2 else v) for k, v in params.items()}
        cases.append((given, X, Y, fastbptt.loss_and_grad(params, X, Y)))
    for given, X, Y, want in cases + cases[::-1]:
        got = fastbptt.loss_and_grad(given, X, Y)
        assert got[0] == want[0] and all(np.array_equal(got[1][k], want[1][k]) for k in want[1])


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_check_finite_false_lets_nan_and_inf_flow(cell, rng):
    # a framework's layers pass NaN and inf on (the bridges ask for that); by default each is an error
    p = fastbptt.init_params(5, 6, 3, cell=cell, dtype=np.float64, seed=1)
    X = rng.normal(0, 1, (4, 3, 5))
    X[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"X: non-finite value nan at index \(1, 2, 0\)"):
        fastbptt.rnn_forward(p, X, cell=cell)
    Hs, last, kept = fastbptt.rnn_forward(p, X, cell=cell, keep=True, check_finite=False)
    bad = ~np.isfinite(Hs)
    assert not bad[0].any() and bad[1:, 2].all() and not bad[:, :2].any()     # sequence 2 from step 2 on
    dHs = np.ones_like(Hs)
    dHs[0, 0, 1] = np.inf
    with pytest.raises(ValueError, match="dHs: non-finite value inf"):
        fastbptt.api.kept_backward(kept, dHs)
    g = fastbptt.api.kept_backward(kept, dHs, check_finite=False)
    assert not np.isfinite(g["W_hh"]).all() and not np.isfinite(g["h0"][0]).all()
    assert np.isfinite(g["h0"][1]).all()                                       # sequence 1 apart from both
    g2 = fastbptt.rnn_backward(p, X, Hs, dHs, cell=cell, check_finite=False)
    for k in g:
        np.testing.assert_array_equal(np.isfinite(g[k]), np.isfinite(g2[k]), err_msg=k)
    # the check is per call: the next one looks again, also after a call that failed without it
    with pytest.raises(ValueError, match="dHs: expected shape"):
        fastbptt.rnn_backward(p, X, Hs, dHs[:2], cell=cell, check_finite=False)
    with pytest.raises(ValueError, match="X: non-finite"):
        fastbptt.rnn_backward(p, X, Hs, np.ones_like(Hs), cell=cell)
