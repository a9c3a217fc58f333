"""The CUDA path against the CPU path (and, for every cell and depth, the float64 stack
reference of tests/reference.py).

Without a GPU these run under the CUDA simulator (``make test-cuda-sim`` sets
NUMBA_ENABLE_CUDASIM=1), with tiny shapes and a single block per persistent launch:
the simulator does not honour grid-wide sync across several blocks.  Tests marked
``gpu`` need a real CUDA GPU and run at the benchmark shapes.
"""
import os

import numpy as np
import pytest

import fastbptt
import reference
from fastbptt import config
from helpers import assert_close, make_case

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install fastbptt[cuda])")
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if not SIM and not cuda.is_available():
    pytest.skip("no CUDA GPU here; the simulator tests run under NUMBA_ENABLE_CUDASIM=1 "
                "(make test-cuda-sim, part of make test)", allow_module_level=True)

from fastbptt import _cuda  # noqa: E402

TOL = {np.float64: 1e-9, np.float32: 3e-4}
ACTS = ["tanh", "relu", "identity"]
sim_only = pytest.mark.skipif(not SIM, reason="simulator-sized case")
gpu = pytest.mark.skipif(SIM or not cuda.is_available(), reason="needs a real CUDA GPU")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Small blocks keep the simulator (a Python thread per CUDA thread) fast; one block
    of CUDA_PERSIST_COLS >= H columns makes every persistent launch a single block."""
    if SIM:
        monkeypatch.setattr(config, "CUDA_BLOCK", 8)
        monkeypatch.setattr(config, "CUDA_PERSIST_THREADS", 8)
        monkeypatch.setattr(config, "CUDA_PERSIST_COLS", 8)


@pytest.fixture
def launches(monkeypatch):
    """Counts top-level kernel launches under the simulator."""
    from numba.cuda.simulator import kernel as simkernel
    counter = {"n": 0}
    real = simkernel.FakeCUDAKernel.__call__

    def counting(self, *args):
        if not self._device and not simkernel._kernel_context:
            counter["n"] += 1
        return real(self, *args)

    monkeypatch.setattr(simkernel.FakeCUDAKernel, "__call__", counting)
    return counter


def rel_err(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))


def compare(params, X, Y, h0, **kw):
    dtype = params["W_hh"].dtype.type
    l1, g1, h1 = fastbptt.loss_and_grad(params, X, Y, h0, **kw)
    l2, g2, h2 = fastbptt.loss_and_grad(params, X, Y, h0, device="cuda", **kw)
    assert abs(l2 - l1) <= TOL[dtype] * max(1.0, abs(l1))
    assert rel_err(h2, h1) <= TOL[dtype]
    assert set(g2) == set(g1)
    for k in g1:
        assert g2[k].dtype == g1[k].dtype and g2[k].shape == g1[k].shape, k
        assert rel_err(g2[k], g1[k]) <= TOL[dtype], k


@sim_only
@pytest.mark.parametrize("path", ["step", "persistent"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("truncation", [None, fastbptt.Truncated(2), fastbptt.Randomized(0.5, seed=4)])
def test_loss_and_grad_equals_cpu(path, dtype, act, truncation, rng, monkeypatch):
    monkeypatch.setattr(config, "CUDA_RECURRENCE", path)
    params, X, Y, h0 = make_case(rng, T=4, B=2, D=5, H=6, Q=5)
    compare({k: v.astype(dtype) for k, v in params.items()}, X, Y, h0, activation=act, truncation=truncation)


@sim_only
@pytest.mark.parametrize("path", ["step", "persistent"])
def test_dense_input_sum_reduction_and_no_h0(path, rng, monkeypatch):
    monkeypatch.setattr(config, "CUDA_RECURRENCE", path)
    params, X, Y, _ = make_case(rng, T=3, B=3, D=4, H=5, Q=4, dense=True)
    compare(params, X, Y, None, reduction="sum")


@sim_only
@pytest.mark.parametrize("path", ["step", "persistent"])
def test_rnn_forward_backward_and_loss_equal_cpu(path, rng, monkeypatch):
    monkeypatch.setattr(config, "CUDA_RECURRENCE", path)
    params, X, Y, h0 = make_case(rng, T=4, B=2, D=5, H=7, Q=3)
    Hs = fastbptt.rnn_forward(params, X, h0)
    assert rel_err(fastbptt.rnn_forward(params, X, h0, device="cuda"), Hs) <= 1e-9
    dHs = rng.normal(size=Hs.shape)
    want = fastbptt.rnn_backward(params, X, Hs, dHs, h0, truncation=fastbptt.Truncated(3))
    got = fastbptt.rnn_backward(params, X, Hs, dHs, h0, truncation=fastbptt.Truncated(3), device="cuda")
    for k in want:
        assert rel_err(got[k], want[k]) <= 1e-9, k
    l1, _ = fastbptt.loss(params, X, Y, h0)
    l2, _ = fastbptt.loss(params, X, Y, h0, device="cuda")
    assert abs(l1 - l2) <= 1e-12


@sim_only
def test_persistent_path_launches_once_per_sweep(rng, monkeypatch, launches):
    params, X, Y, h0 = make_case(rng, T=6, B=2, D=5, H=6, Q=5)
    counts = {}
    for path in ("step", "persistent"):
        monkeypatch.setattr(config, "CUDA_RECURRENCE", path)
        launches["n"] = 0
        fastbptt.loss_and_grad(params, X, Y, h0, device="cuda")
        counts[path] = launches["n"]
    # step path: a forward launch per step but the first (h_0 given), a dz launch per backward
    # step and a carry launch per step but the first (the crossing into h_0 is Run.cross's
    # product on both paths); persistent path: one launch per sweep
    assert counts["step"] - counts["persistent"] == (6 - 1) + (6 + 6 - 1 - 1)
    assert counts["persistent"] > 0


def test_persistent_limits_and_auto_rule(monkeypatch):
    monkeypatch.setattr(config, "CUDA_RECURRENCE", "auto")
    hmax = _cuda.elman.persistent_max_hidden(np.float32)
    assert hmax == 48 * 1024 // (4 * config.CUDA_PERSIST_COLS)
    assert _cuda.elman.use_persistent(1, hmax, np.dtype(np.float32))
    assert not _cuda.elman.use_persistent(1, hmax + 1, np.dtype(np.float32))          # falls back to step
    assert not _cuda.elman.use_persistent(config.CUDA_PERSIST_MAX_B + 1, 64, np.dtype(np.float32))


@gpu
@pytest.mark.parametrize("shape", [(35, 32, 28, 512), (35, 32, 28, 256), (256, 1, 64, 256), (256, 4, 64, 1024)])
@pytest.mark.parametrize("path", ["step", "persistent", "auto"])
def test_gpu_matches_cpu_at_benchmark_shapes(shape, path, monkeypatch):
    from fastbptt import bench
    monkeypatch.setattr(config, "CUDA_RECURRENCE", path)
    T, B, V, H = shape
    params, X, Y, h0 = bench.workload(T, B, V, H)
    params = {k: v.astype(np.float64) for k, v in params.items()}
    compare(params, X, Y, h0)


@sim_only
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_rnn_adjoints_equal_cpu(rng, cell):
    params = fastbptt.init_params(5, 6, 3, np.float64, seed=3, cell=cell)
    X = rng.integers(0, 5, (4, 2))
    h0 = rng.normal(size=(2, 6))
    h0 = (h0, rng.normal(size=(2, 6))) if cell == "lstm" else h0
    Hs = fastbptt.rnn_forward(params, X, h0)
    dHs = rng.normal(size=Hs.shape)
    want = fastbptt.rnn_adjoints(params, X, Hs, dHs, h0)
    assert rel_err(fastbptt.rnn_adjoints(params, X, Hs, dHs, h0, device="cuda"), want) <= 1e-9


@sim_only
def test_params_on_the_device_and_device_inputs_stay_on_the_device(rng):
    params, X, Y, h0 = make_case(rng, T=4, B=2, D=5, H=6, Q=5)
    want_loss, want, want_hT = fastbptt.loss_and_grad(params, X, Y, h0)
    D = fastbptt.to_device(params)
    assert all(cuda.devicearray.is_cuda_ndarray(v) for v in D.values())
    for args in [(X, Y, h0),
                 (cuda.to_device(X.astype(np.int32)), cuda.to_device(Y), cuda.to_device(h0))]:
        loss, grads, h_T = fastbptt.loss_and_grad(D, *args, device="cuda")
        assert abs(loss - want_loss) <= 1e-12
        on_device = cuda.devicearray.is_cuda_ndarray
        assert on_device(h_T) and all(on_device(g) for g in grads.values())
        assert rel_err(h_T.copy_to_host(), want_hT) <= 1e-9
        for k in want:
            assert rel_err(grads[k].copy_to_host(), want[k]) <= 1e-9, k
    Hs = fastbptt.rnn_forward(D, cuda.to_device(X), device="cuda")
    assert cuda.devicearray.is_cuda_ndarray(Hs)
    np.testing.assert_allclose(Hs.copy_to_host(), fastbptt.rnn_forward(params, X), rtol=1e-12)


@sim_only
@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_kept_forward_on_the_device_is_not_the_callers_output(rng, cell):
    """rnn_forward(keep=True) with params on the device: the Hs and h_T it returns are arrays of
    their own, so a caller that overwrites them (a framework's in-place op) leaves the kept
    forward, and the backward from it, as they were"""
    params = fastbptt.init_params(5, 4, 5, np.float64, seed=3, cell=cell, num_layers=2)
    X = rng.integers(0, 5, (3, 2))
    D = fastbptt.to_device(params)
    dHs = rng.normal(size=(3, 2, 4))
    Hs0, _, kept0 = fastbptt.rnn_forward(params, X, cell=cell, keep=True)
    want = fastbptt.rnn_backward(params, X, Hs0, dHs, cell=cell, forward=kept0)
    Hs, h_T, kept = fastbptt.rnn_forward(D, X, device="cuda", cell=cell, keep=True)
    for a in (Hs, *(h_T if cell == "lstm" else (h_T,))):
        a.copy_to_device(np.full(a.shape, 7.0))
    got = fastbptt.api.kept_backward(kept, cuda.to_device(dHs))
    for k in want:
        assert rel_err(got[k].copy_to_host(), want[k]) <= 1e-9, k


@sim_only
def test_device_arrays_compare_as_the_host_compares_them():
    """_cuda.arrays.equal: NaN equal to NaN (what check_finite=False lets through), any other
    difference or another shape not"""
    a = np.array([1.0, np.nan, -2.0])
    eq = _cuda.arrays.equal
    assert eq(_cuda.arrays.device(a), a.copy()) and eq(a, _cuda.arrays.device(a.copy()))
    assert not eq(_cuda.arrays.device(a), np.array([1.0, np.nan, -2.5]))
    assert not eq(_cuda.arrays.device(a), np.array([1.0, 0.0, -2.0]))
    assert not eq(_cuda.arrays.device(a), a[:2].copy())


@sim_only
def test_a_kept_forward_is_compared_on_the_device(rng):
    """rnn_backward(forward=) with device params: the same values pass (host or device copies),
    a changed weight is named, and a forward kept on the device is refused on the CPU"""
    params = fastbptt.init_params(5, 4, 5, np.float64, seed=3, cell="gru")
    X = rng.integers(0, 5, (3, 2))
    dHs = rng.normal(size=(3, 2, 4))
    Hs, kept = fastbptt.rnn_forward(fastbptt.to_device(params), X, device="cuda", keep=True)[::2]
    want = fastbptt.rnn_backward(params, X, Hs.copy_to_host(), dHs)
    for P in (params, fastbptt.to_device(params)):
        got = fastbptt.rnn_backward(P, X, Hs, dHs, device="cuda", forward=kept)
        W_hh = got["W_hh"]             # on the host for host params, as their results
        assert rel_err(W_hh if isinstance(W_hh, np.ndarray) else W_hh.copy_to_host(), want["W_hh"]) <= 1e-9
    changed = dict(params, W_hh=params["W_hh"] + 1e-3)
    with pytest.raises(ValueError, match=r"other values of params\['W_hh'\]"):
        fastbptt.rnn_backward(fastbptt.to_device(changed), X, Hs, dHs, device="cuda", forward=kept)
    wider = dict(params, W_xh=np.vstack([params["W_xh"], params["W_xh"][:1]]))    # one more token id
    with pytest.raises(ValueError, match=r"other values of params\['W_xh'\]"):
        fastbptt.rnn_backward(fastbptt.to_device(wider), X, Hs, dHs, device="cuda", forward=kept)
    with pytest.raises(ValueError, match="forward: kept .* on the other device"):
        fastbptt.rnn_backward(params, X, Hs.copy_to_host(), dHs, forward=kept)


@sim_only
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("truncation", [None, fastbptt.Truncated(2)], ids=str)
def test_input_masks_equal_the_cpu(rng, cell, truncation):
    """inter-layer dropout masks (input_masks): the stack's forward and backward equal the CPU's"""
    params = fastbptt.init_params(5, 4, 5, np.float64, seed=3, cell=cell, num_layers=3)
    X = rng.integers(0, 5, (4, 2))
    masks = [rng.choice([0.0, 2.0], size=(4, 2, 4)) for _ in range(2)]
    dHs = rng.normal(size=(4, 2, 4))
    want_Hs = fastbptt.rnn_forward(params, X, cell=cell, input_masks=masks)
    want = fastbptt.rnn_backward(params, X, want_Hs, dHs, cell=cell, truncation=truncation, input_masks=masks)
    Hs, _, kept = fastbptt.rnn_forward(params, X, device="cuda", cell=cell, keep=True, input_masks=masks)
    assert rel_err(Hs, want_Hs) <= 1e-9
    got = fastbptt.api.kept_backward(kept, dHs, truncation=truncation)
    for k in want:
        assert rel_err(got[k], want[k]) <= 1e-9, k


@sim_only
def test_device_inputs_are_validated_on_the_device(rng):
    params, X, Y, h0 = make_case(rng, T=3, B=2, D=5, H=4, Q=5)
    bad = X.copy()
    bad[1, 1] = 9
    with pytest.raises(ValueError, match=r"X: token id 9 out of range \[0, 5\)"):
        fastbptt.loss_and_grad(params, cuda.to_device(bad), Y, h0, device="cuda")
    nan = params["W_hh"].copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"params\['W_hh'\]: non-finite"):
        fastbptt.loss_and_grad(dict(params, W_hh=cuda.to_device(nan)), X, Y, h0, device="cuda")


@sim_only
@pytest.mark.parametrize("path", ["step", "persistent"])
def test_randomized_with_every_crossing_dropped(path, rng, monkeypatch):
    """ξ = 0 everywhere: no carry is ever computed, and ∂L/∂h_0 must be exactly 0."""
    monkeypatch.setattr(config, "CUDA_RECURRENCE", path)
    params, X, Y, h0 = make_case(rng, T=3, B=2, D=5, H=6, Q=5)
    tr = next(fastbptt.Randomized(0.05, seed=s) for s in range(100)
              if not fastbptt.Randomized(0.05, seed=s).draw(3, np.float64).any())
    _, grads, _ = fastbptt.loss_and_grad(params, X, Y, h0, truncation=tr, device="cuda")
    assert np.all(grads["h0"] == 0)
    compare(params, X, Y, h0, truncation=tr)


# ---------------------------------------------------------------------------------------------
# Every cell and depth: the CUDA path against the CPU path and the float64 stack reference
# ---------------------------------------------------------------------------------------------
CELLS = ["rnn", "gru", "lstm"]
#: ξ of T = 4 steps with a dropped crossing and a kept one, ξ_1 kept (so ∂L/∂h_0 is not 0)
RANDOMIZED = next(fastbptt.Randomized(0.5, seed=s) for s in range(100)
                  if (lambda xi: xi[0] != 0 and not xi.all())(fastbptt.Randomized(0.5, seed=s).draw(4, np.float64)))
TRUNCATIONS = {"full": None, "truncated2": fastbptt.Truncated(2), "randomized": RANDOMIZED}


def stack_case(rng, cell, L, dense, T=4, B=2, D=4, H=4, Q=4):
    """float64 params of the cell's schema, inputs, targets and a random (h0, c0) of (L,B,H)
    (c0 None unless lstm)"""
    params = reference.init_stack(rng, cell, L, D, H, Q)
    X = rng.normal(0, 1, (T, B, D)) if dense else rng.integers(0, D, (T, B))
    Y = rng.integers(0, Q, (T, B))
    h0 = rng.normal(0, 0.5, (L, B, H))
    c0 = rng.normal(0, 0.5, (L, B, H)) if cell == "lstm" else None
    return params, X, Y, h0, c0


def api_state(cell, L, h0, c0):
    """the state as the API takes it: (B,H) for one layer, (L,B,H) above; (h0, c0) for lstm"""
    h, c = (h0[0], None if c0 is None else c0[0]) if L == 1 else (h0, c0)
    return (h, c) if cell == "lstm" else h


def reference_kw(truncation):
    if isinstance(truncation, fastbptt.Truncated):
        return {"k": truncation.k}
    if isinstance(truncation, fastbptt.Randomized):
        return {"xi": truncation.draw(4, np.float64)}
    return {}


@sim_only
@pytest.mark.parametrize("truncation", TRUNCATIONS.values(), ids=TRUNCATIONS.keys())
@pytest.mark.parametrize("dense", [False, True], ids=["tokens", "dense"])
@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_every_cell_and_depth_equals_cpu_and_reference(cell, L, dense, truncation, rng):
    params, X, Y, h0, c0 = stack_case(rng, cell, L, dense, H=5 if L == 1 else 3)
    state = api_state(cell, L, h0, c0)
    l1, g1, s1 = fastbptt.loss_and_grad(params, X, Y, state, truncation=truncation)
    l2, g2, s2 = fastbptt.loss_and_grad(params, X, Y, state, truncation=truncation, device="cuda")
    want = reference.stack_loss_and_grad(params, cell, X, Y, h0, c0, **reference_kw(truncation))
    assert isinstance(l2, float) and abs(l2 - l1) <= 1e-12 * max(1.0, abs(l1))
    assert abs(l2 - want.loss) <= 1e-12 * max(1.0, abs(want.loss))
    assert set(g2) == set(g1) == set(want.grads) - {"X"}
    for k in g1:
        assert isinstance(g2[k], np.ndarray) and g2[k].dtype == np.float64, k
        assert g2[k].shape == g1[k].shape, k
        assert rel_err(g2[k], g1[k]) <= 1e-9, k
        assert_close(g2[k], np.reshape(want.grads[k], g1[k].shape), np.float64, k)
    states = s2 if cell == "lstm" else (s2,)
    wants = (want.hT, want.cT) if cell == "lstm" else (want.hT,)
    for got, cpu, ref in zip(states, s1 if cell == "lstm" else (s1,), wants):
        assert rel_err(got, cpu) <= 1e-9
        assert_close(got, np.reshape(ref, got.shape), np.float64, "state")


@sim_only
@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gated_rnn_forward_backward_and_loss(cell, L, rng):
    """rnn_forward (with the last state), rnn_backward (dense input, ∂L/∂X, Truncated(2)) and
    loss of a gated cell on CUDA against the reference (and the CPU's forward and loss)"""
    params, X, Y, h0, c0 = stack_case(rng, cell, L, True, T=3, H=3)
    state = api_state(cell, L, h0, c0)
    rnn = {k: v for k, v in params.items() if k not in ("W_hq", "b_q")}
    Hs, last = fastbptt.rnn_forward(rnn, X, state, device="cuda", return_state=True)
    cpu_Hs, cpu_last = fastbptt.rnn_forward(rnn, X, state, return_state=True)
    assert rel_err(Hs, cpu_Hs) <= 1e-12
    for got, want in zip(last if cell == "lstm" else (last,), cpu_last if cell == "lstm" else (cpu_last,)):
        assert rel_err(got, want) <= 1e-12
    dHs = rng.normal(size=Hs.shape)
    for tr in (None, fastbptt.Truncated(2)):
        got = fastbptt.rnn_backward(rnn, X, Hs, dHs, state, truncation=tr, input_grad=True, device="cuda")
        want = reference.stack_backward(params, cell, X, dHs, h0, c0, **reference_kw(tr))
        assert set(got) == set(want)
        for k in got:
            assert_close(got[k], np.reshape(want[k], got[k].shape), np.float64, k)
    l1, s1 = fastbptt.loss(params, X, Y, state)
    l2, s2 = fastbptt.loss(params, X, Y, state, device="cuda")
    assert abs(l1 - l2) <= 1e-12 * max(1.0, abs(l1))


@sim_only
@pytest.mark.parametrize("L", [1, 2])
def test_lstm_cell_state_terms(L, rng):
    """the LSTM's cell states from a kept forward and their terms dCs in the backward (full,
    Truncated(2), Randomized) on CUDA against the reference, with params on the host and on
    the device (where the cell states stay)"""
    params, X, _, h0, c0 = stack_case(rng, "lstm", L, True, T=4, H=3)
    rnn = {k: v for k, v in params.items() if k not in ("W_hq", "b_q")}
    state = api_state("lstm", L, h0, c0)
    dHs, dCs = rng.normal(size=(2, 4, 2, 3))
    _, _, _, Cs, _, _ = reference.stack_forward(params, "lstm", X, h0, c0)
    for P in (rnn, fastbptt.to_device(rnn)):
        Hs, _, kept = fastbptt.rnn_forward(P, X, state, device="cuda", keep=True)
        got_cs = fastbptt.api.kept_cell_states(kept)
        assert cuda.devicearray.is_cuda_ndarray(got_cs) == (P is not rnn)
        assert_close(np.asarray(got_cs if P is rnn else got_cs.copy_to_host()), Cs[:, -1], np.float64, "Cs")
        for tr in TRUNCATIONS.values():
            want = reference.stack_backward(params, "lstm", X, dHs, h0, c0, dCs=dCs, **reference_kw(tr))
            got = fastbptt.api.kept_backward(kept, dHs, truncation=tr, dCs=dCs, input_grad=True)
            for k in want:
                g = got[k] if P is rnn else got[k].copy_to_host()
                assert_close(g, np.reshape(want[k], g.shape), np.float64, k)


@sim_only
def test_gated_params_on_the_device_keep_results_there(rng):
    """an LSTM stack with its params on the device: grads and (h_T, c_T) stay on the device"""
    params, X, Y, h0, c0 = stack_case(rng, "lstm", 2, False, T=3, H=3)
    want_loss, want, (want_h, want_c) = fastbptt.loss_and_grad(params, X, Y, (h0, c0),
                                                               truncation=fastbptt.Truncated(2))
    loss, grads, (h_T, c_T) = fastbptt.loss_and_grad(fastbptt.to_device(params), X, Y,
                                                     (cuda.to_device(h0), c0),
                                                     truncation=fastbptt.Truncated(2), device="cuda")
    on_device = cuda.devicearray.is_cuda_ndarray
    assert on_device(h_T) and on_device(c_T) and all(on_device(g) for g in grads.values())
    assert abs(loss - want_loss) <= 1e-12
    assert set(grads) == set(want)
    for k in want:
        assert rel_err(grads[k].copy_to_host(), want[k]) <= 1e-9, k
    assert rel_err(h_T.copy_to_host(), want_h) <= 1e-9 and rel_err(c_T.copy_to_host(), want_c) <= 1e-9


@sim_only
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gated_float32_and_no_state(cell, rng):
    """float32 params, no initial state, the sum reduction, against the CPU"""
    params, X, Y, _, _ = stack_case(rng, cell, 1, False, T=3, H=4)
    compare({k: v.astype(np.float32) for k, v in params.items()}, X, Y, None, reduction="sum")


@sim_only
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gated_randomized_with_every_crossing_dropped(cell, rng):
    """ξ = 0 everywhere: no crossing's product runs, and the state's gradients are exactly 0."""
    params, X, Y, h0, c0 = stack_case(rng, cell, 2, False, T=3, H=3)
    tr = next(fastbptt.Randomized(0.05, seed=s) for s in range(100)
              if not fastbptt.Randomized(0.05, seed=s).draw(3, np.float64).any())
    state = api_state(cell, 2, h0, c0)
    _, grads, _ = fastbptt.loss_and_grad(params, X, Y, state, truncation=tr, device="cuda")
    want = reference.stack_loss_and_grad(params, cell, X, Y, h0, c0, xi=np.zeros(3)).grads
    for k in grads:
        assert_close(grads[k], want[k], np.float64, k)
    assert np.all(grads["h0"] == 0) and (cell != "lstm" or np.all(grads["c0"] == 0))


@gpu
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_a_one_layer_state_given_as_a_device_array(cell):
    """the last state a call on device params returns, (B,H) device arrays for one layer, fed
    back as the next call's h0 (a device array cannot be indexed with None)"""
    params = fastbptt.init_params(5, 4, 5, np.float64, seed=3, cell=cell)
    X = np.arange(12).reshape(3, 4) % 5
    D = fastbptt.to_device(params)
    _, _, h_T = fastbptt.loss_and_grad(D, X, X, device="cuda")
    loss, _, _ = fastbptt.loss_and_grad(D, X, X, h0=h_T, device="cuda")
    host = tuple(h.copy_to_host() for h in h_T) if cell == "lstm" else h_T.copy_to_host()
    _, _, h_cpu = fastbptt.loss_and_grad(params, X, X)
    assert loss == pytest.approx(fastbptt.loss_and_grad(params, X, X, h0=h_cpu)[0], rel=1e-9)
    assert loss == pytest.approx(fastbptt.loss_and_grad(params, X, X, h0=host)[0], rel=1e-9)


@gpu
@pytest.mark.parametrize("truncation", [None, fastbptt.Truncated(5)], ids=["full", "truncated5"])
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_every_cell_two_layers_matches_cpu(cell, truncation):
    """two layers of every cell at a benchmark-like shape, float64, against the CPU"""
    rng = np.random.default_rng(7)
    T, B, V, H = 35, 32, 28, 256
    params = reference.init_stack(rng, cell, 2, V, H, V)
    X, Y = rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))
    h0 = rng.normal(0, 0.5, (2, B, H))
    state = (h0, rng.normal(0, 0.5, (2, B, H))) if cell == "lstm" else h0
    l1, g1, _ = fastbptt.loss_and_grad(params, X, Y, state, truncation=truncation)
    l2, g2, _ = fastbptt.loss_and_grad(params, X, Y, state, truncation=truncation, device="cuda")
    assert abs(l2 - l1) <= 1e-9 * max(1.0, abs(l1))
    for k in g1:
        assert rel_err(g2[k], g1[k]) <= 1e-9, k


@sim_only
@pytest.mark.parametrize("stored", ["sqrt", 1, 2])
@pytest.mark.parametrize("truncation", TRUNCATIONS.values(), ids=TRUNCATIONS.keys())
@pytest.mark.parametrize("cell", CELLS)
def test_stored_states_equal_storing_every_state(cell, truncation, stored, rng):
    """the memory-bounded backward on the device (runs over ranges, the adjoints carried between
    them through h and c) gives the CPU's stored-everything gradients"""
    params, X, Y, h0, c0 = stack_case(rng, cell, 2, False, H=3)
    state = api_state(cell, 2, h0, c0)
    l1, g1, s1 = fastbptt.loss_and_grad(params, X, Y, state, truncation=truncation)
    l2, g2, s2 = fastbptt.loss_and_grad(params, X, Y, state, truncation=truncation, device="cuda",
                                        stored_states=stored)
    assert abs(l2 - l1) <= 1e-12 * max(1.0, abs(l1))
    assert set(g2) == set(g1)
    for k in g1:
        assert rel_err(g2[k], g1[k]) <= 1e-9, k
    for got, cpu in zip(s2 if cell == "lstm" else (s2,), s1 if cell == "lstm" else (s1,)):
        assert rel_err(got, cpu) <= 1e-9
