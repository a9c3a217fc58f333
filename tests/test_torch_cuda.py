"""fastbptt.torch on CUDA tensors: the bridge's CUDA path (fastbptt's CUDA backend, the tensors
shared through the CUDA array interface) against torch.nn and against the bridge's CPU path.

Without a GPU these run under the numba-cuda simulator (``make test-cuda-sim`` sets
NUMBA_ENABLE_CUDASIM=1): torch holds no CUDA tensor there, so the bridge's CUDA placement is
given CPU tensors, copied to and from the simulator's device arrays in place of the zero-copy
interface; everything else (the params made by torch ops, the backend's kept forward and
backward, the gradients' layout) is the path a GPU runs.  Tests marked ``gpu`` need a CUDA GPU
and run on real CUDA tensors.
"""
import contextlib
import functools
import os

import pytest

torch = pytest.importorskip("torch")
cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install fastbptt[cuda])")
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
GPU = not SIM and cuda.is_available() and torch.cuda.is_available()
if not (SIM or GPU):
    pytest.skip("no CUDA GPU here; the simulator tests run under NUMBA_ENABLE_CUDASIM=1 "
                "(make test-cuda-sim, part of make test)", allow_module_level=True)

import fastbptt  # noqa: E402
import fastbptt.torch as ft  # noqa: E402
from fastbptt import config  # noqa: E402
from test_torch_bridge import H, KINDS, assert_same, inputs, pair, run  # noqa: E402

sim_only = pytest.mark.skipif(not SIM, reason="simulator-sized case")
gpu = pytest.mark.skipif(not GPU, reason="needs a real CUDA GPU and torch built with CUDA")


class SimCuda(ft._Cuda):
    """the bridge's CUDA placement on the simulator: CPU tensors in, copied to its device arrays
    and back (a GPU shares them zero-copy instead)"""

    def __init__(self):
        super().__init__(torch.device("cpu"), "test")

    def running(self):
        return contextlib.nullcontext()

    def array(self, t):
        return cuda.to_device(t.detach().contiguous().numpy())

    def tensor(self, a):
        return torch.from_numpy(a.copy_to_host())


def use_sim(mp):
    """CPU tensors run through the bridge's CUDA path, on the simulator with small blocks (one
    block per persistent launch: the simulator has no grid-wide sync across blocks); returns
    the placements made"""
    mp.setattr(config, "CUDA_BLOCK", 8)
    mp.setattr(config, "CUDA_PERSIST_THREADS", 8)
    mp.setattr(config, "CUDA_PERSIST_COLS", 8)
    places = []
    mp.setattr(ft, "_place", lambda tensors, name: places.append(SimCuda()) or places[-1])
    return places


def on_sim(monkeypatch, go):
    """go()'s result through the bridge's CUDA path on the simulator (which must have run)"""
    with monkeypatch.context() as mp:
        places = use_sim(mp)
        got = go()
    assert places, "the CUDA path did not run"
    return got


@sim_only
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("L", [1, 2])
def test_cuda_path_same_as_torch_nn(kind, L, monkeypatch):
    """outputs, states and every gradient equal torch.nn's (float64), for batch_first, bias and
    hx on and off"""
    for batch_first, bias, with_hx in ((False, True, True), (True, False, False)):
        m, r = pair(kind, L, batch_first=batch_first, bias=bias)
        X, hx, Wo, Wh = inputs(L, batch_first, torch.float64, m, with_hx)
        got = on_sim(monkeypatch, lambda: run(m, X, hx, Wo, Wh))
        assert_same(got, run(r, X, hx, Wo, Wh), torch.float64)


@sim_only
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_cuda_path_same_as_cpu_path(kind, monkeypatch):
    """token ids, float32, and truncation (Truncated(1), Randomized): the same as the bridge's
    CPU path"""
    m, _ = pair(kind, 2, torch.float32, input_size=5)
    ids = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(0))
    hx = None
    Wo = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(1))
    for truncation in (None, fastbptt.Truncated(1), fastbptt.Randomized(0.5, seed=2)):
        go = functools.partial(run, m, ids, hx, Wo, None, truncation=truncation)
        assert_same(on_sim(monkeypatch, go), go(), torch.float32)


@sim_only
@pytest.mark.parametrize("kind", list(KINDS))
def test_cuda_path_lets_nan_and_inf_flow_as_the_cpu_path(kind, monkeypatch):
    """a NaN in the input and an inf in the output's gradient reach the same outputs and
    gradients as on the CPU path (which is torch.nn's: test_torch_bridge), the rest equal"""
    m, r = pair(kind, 2)
    X, hx, Wo, _ = inputs(2, False, torch.float64, r, True)
    X = X.clone()
    X[2, 1, 3] = float("nan")
    Wo = Wo.clone()
    Wo[3, 2, 1] = float("inf")
    cpu = run(m, X, hx, Wo, None)
    got = on_sim(monkeypatch, lambda: run(m, X, hx, Wo, None))

    def flat(r):
        out, hn, grads = r
        return [out, *(hn if isinstance(hn, tuple) else (hn,)), *grads]
    got, cpu = flat(got), flat(cpu)
    assert len(got) == len(cpu) and not all(torch.isfinite(t).all() for t in cpu)
    for a, b in zip(got, cpu):
        ok = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), ok)
        torch.testing.assert_close(a[ok], b[ok], atol=1e-9, rtol=1e-9)


@sim_only
@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_cuda_path_bidirectional_with_dropout(kind, monkeypatch):
    """bidirectional, two layers, dropout between them in training mode (the same seed): the
    same as the bridge's CPU path"""
    m, _ = pair(kind, 2, bidirectional=True, dropout=0.3)
    X = torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Wo = torch.randn(4, 3, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def go():
        torch.manual_seed(5)                          # the same dropout masks on both paths
        return run(m, X, None, Wo, None)
    assert_same(on_sim(monkeypatch, go), go(), torch.float64)


@sim_only
@pytest.mark.parametrize("proj_size", [0, 2])
def test_cuda_path_packed_sequence(proj_size, monkeypatch):
    """a bidirectional LSTM on a PackedSequence (unsorted lengths; c_n read off the cell states),
    and with proj_size: the same as the CPU path"""
    m, _ = pair("lstm", 1, bidirectional=True, proj_size=proj_size)
    X = torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = torch.nn.utils.rnn.pack_padded_sequence(X, [2, 4, 3], enforce_sorted=False)

    def go():
        out, (h_n, c_n) = m(p)
        grads = torch.autograd.grad(torch.tanh(out.data).sum() + h_n.sum() + c_n.sum(), list(m.parameters()))
        return out.data, (h_n, c_n), list(grads)
    assert_same(on_sim(monkeypatch, go), go(), torch.float64)


@sim_only
@pytest.mark.parametrize("truncation", [fastbptt.Truncated(2), fastbptt.Randomized(0.5, seed=3)],
                         ids=["truncated", "randomized"])
def test_cuda_path_proj_size_with_truncation(truncation, monkeypatch):
    """LSTM(proj_size) with hx under truncation (weight_hr's recurrent gradient from a second
    call): the same as the CPU path"""
    m, _ = pair("lstm", 1, proj_size=2)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 3, 4, generator=g, dtype=torch.float64)
    hx = tuple(torch.randn(1, 3, n, generator=g, dtype=torch.float64) for n in (2, H))
    Wo = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    go = functools.partial(run, m, X, hx, Wo, None, truncation=truncation)
    assert_same(on_sim(monkeypatch, go), go(), torch.float64)


# ----------------------------------------------------------------- a real GPU
@pytest.fixture
def no_tf32(monkeypatch):
    """torch.nn's float32 on the GPU in full float32 (cuDNN may otherwise use TF32), as
    fastbptt's CUDA kernels and CuPy's cuBLAS compute it"""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def close(got, want, tol):
    """each tensor's largest difference within tol of its largest value (float32 sums in
    another order)"""
    for a, b in zip(got, want):
        assert float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-30)


def to(x, device):
    """a tensor, a tuple or list of them, or None, on ``device``"""
    if x is None:
        return None
    return type(x)(to(a, device) for a in x) if isinstance(x, (tuple, list)) else x.to(device)


@gpu
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cuda_tensors_same_as_torch_nn(kind, L, dtype, no_tf32):
    for batch_first, bias, with_hx in ((False, True, True), (True, False, False)):
        m, r = pair(kind, L, dtype, batch_first=batch_first, bias=bias)
        m, r = m.cuda(), r.cuda()
        X, hx, Wo, Wh = to(inputs(L, batch_first, dtype, m, with_hx), "cuda")
        got = run(m, X, hx, Wo, Wh)
        assert got[0].is_cuda and all(g.is_cuda for g in got[2])
        assert_same(got, run(r, X, hx, Wo, Wh), dtype)


@gpu
def test_cuda_d2l_lstm_step_and_devices():
    """the book's concise LSTM shape, token ids, on the GPU equal to the bridge on the CPU; a
    tensor on another device is refused"""
    torch.manual_seed(0)
    m = ft.LSTM(28, 256)
    ids = torch.randint(0, 28, (35, 32))
    Wo = torch.randn(35, 32, 256)
    cpu = run(m, ids, None, Wo, None)
    out, (h_n, c_n), grads = to(run(m.cuda(), ids.cuda(), None, Wo.cuda(), None), "cpu")
    close([out, h_n, c_n, *grads], [cpu[0], *cpu[1], *cpu[2]], 1e-4)
    with pytest.raises(RuntimeError, match="one device"):
        m(torch.randn(35, 32, 28))
