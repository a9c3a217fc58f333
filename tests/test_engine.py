"""The CPU engine's packing, plan, thread choice, waits under load and kernel cache."""
import errno
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import fastbptt
import reference
from fastbptt import config
from fastbptt._cpu import elman, lstm, plan, products, team
from fastbptt._cpu.products import PANEL, packed, packed_shape

BLK = np.array([64, 32])


# ----------------------------------------------------------------------------- packing
@pytest.mark.parametrize("K,N", [(1, 1), (3, 15), (5, 16), (7, 17), (2, 33), (40, 64), (9, 100)])
@pytest.mark.parametrize("view", ["C", "F", "T", "strided"])
def test_packing_keeps_every_column_and_pads_with_zeros(K, N, view, rng):
    B = rng.normal(size=(K, N))
    src = {"C": B, "F": np.asfortranarray(B), "T": np.ascontiguousarray(B.T).T,
           "strided": np.repeat(B, 2, axis=1)[:, ::2]}[view]
    for n in (1, 2, 3):
        Bp = np.full(packed_shape(K, N), np.nan)
        products.pack_cpu(Bp, src, n)
        assert Bp.shape == (-(-N // PANEL), K, PANEL)
        for j in range(Bp.shape[0] * PANEL):
            col = Bp[j // PANEL, :, j % PANEL]
            assert np.array_equal(col, B[:, j] if j < N else np.zeros(K)), (j, n)


@pytest.mark.parametrize("lanes", [1, 2, 3])
@pytest.mark.parametrize("H,G", [(1, 3), (7, 4), (16, 3), (18, 4), (40, 3), (64, 4)])
def test_gated_columns_pack_and_come_back(H, G, lanes, rng):
    # a gated cell's weight in the engine's column order: packed from W and Wᵀ without a
    # copy, each lane's units holding every gate of theirs, and the gradient's columns put back
    cols = products.interleaved(H, G, lanes)
    assert sorted(cols) == list(range(G * H))
    if lanes == 1:
        assert list(cols) == list(range(G * H))
    ends = [0] + [min(H, H * c // lanes // PANEL * PANEL) for c in range(1, lanes)] + [H]
    for u0, u1 in zip(ends, ends[1:]):
        first, m = u0 * G, u1 - u0
        for g in range(G):
            assert list(cols[first + g * m:first + (g + 1) * m]) == list(range(g * H + u0, g * H + u1))
    W = rng.normal(size=(5, G * H))
    for transposed, want in ((False, W[:, cols]), (True, W[:, cols].T)):
        for n in (1, 2, 3):
            Bp = np.full(packed_shape(*want.shape), np.nan)
            products.pack_columns_cpu(Bp, W, cols, transposed, n)
            np.testing.assert_array_equal(Bp, packed(np.ascontiguousarray(want), 1))
    back = np.full_like(W, np.nan)
    products.unpermute_cpu(back, np.ascontiguousarray(W[:, cols]), H, lanes, 2)
    np.testing.assert_array_equal(back, W)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows,H,G,lanes", [(16, 16, 3, 1), (37, 64, 4, 2), (48, 40, 3, 3), (33, 18, 4, 2)])
@pytest.mark.parametrize("order", ["interleaved", "permuted"])
def test_a_transposed_weight_packs_in_blocks_and_element_by_element(rows, H, G, lanes, order, dtype, rng):
    # Wᵀ's whole panels over runs of columns go through blocks transposed in registers, the
    # rest (a partial panel, a run broken by the order, the last columns) element by element
    W = rng.normal(size=(rows, G * H)).astype(dtype)
    cols = products.interleaved(H, G, lanes) if order == "interleaved" else rng.permutation(G * H)
    want = np.ascontiguousarray(W[:, cols].T)
    sources = (W,) if dtype == np.float32 else (W, np.repeat(W, 2, axis=1)[:, ::2])  # rows contiguous or not
    for src in sources:
        for n in (1, 2):
            Bp = np.full(packed_shape(*want.shape), np.nan, dtype)
            products.pack_columns_cpu(Bp, src, cols, True, n)
            np.testing.assert_array_equal(Bp, packed(want, 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows,H,G,lanes", [(16, 16, 3, 1), (37, 64, 4, 2), (48, 40, 3, 3), (33, 18, 4, 2),
                                            (5, 1, 1, 1)])
@pytest.mark.parametrize("order", ["interleaved", "permuted"])
def test_a_weight_given_as_its_transpose_packs_as_the_weight(rows, H, G, lanes, order, dtype, rng):
    # W given as Wt = Wᵀ (torch's layout) packs to the same panels as W itself, both ways: its
    # whole panels over runs of columns through blocks transposed in registers, the rest
    # (a partial panel, a run broken by the order, the last rows) element by element
    W = rng.normal(size=(rows, G * H)).astype(dtype)
    cols = products.interleaved(H, G, lanes) if order == "interleaved" else rng.permutation(G * H)
    Wt = np.ascontiguousarray(W.T)
    for transposed, want in ((False, W[:, cols]), (True, W[:, cols].T)):
        for n in (1, 2):
            Bp = np.full(packed_shape(*want.shape), np.nan, dtype)
            products.pack_rows_cpu(Bp, Wt, cols, transposed, n)
            np.testing.assert_array_equal(Bp, packed(np.ascontiguousarray(want), 1))


@pytest.mark.parametrize("K,N", [(1, 1), (3, 15), (5, 16), (7, 17), (40, 64), (9, 100), (70, 120)])
@pytest.mark.parametrize("order", ["natural", "interleaved", "permuted"])
@pytest.mark.parametrize("scatter", [False, True])
def test_a_gradients_packing_sums_its_columns(K, N, order, scatter, rng):
    # dZ's packing (the right factor of ∂W), its column sums (∂b) and, for token ids, the
    # scatter-add of ∂W_xh from one read: every column in its panel, zeros past N, and each
    # sum exactly numpy's sequential one, in any column order (runs of any length)
    D = rng.normal(size=(K, N))
    cols = {"natural": np.arange(N), "permuted": rng.permutation(N),
            "interleaved": np.argsort(products.interleaved(N // 4, 4, 3)) if N % 4 == 0 else np.arange(N)}[order]
    ids = rng.integers(0, 5, K)
    want, want_E = np.zeros(N), np.zeros((5 if scatter else 0, N))
    for k in range(K):                                  # summed over k in order
        want += D[k, cols]
        if scatter:
            want_E[ids[k]] += D[k, cols]
    for n in (1, 2, 3):
        Bp, sums, E = np.full(packed_shape(K, N), np.nan), np.full(N, np.nan), np.full(want_E.shape, np.nan)
        products.pack_sums_cpu(Bp, sums, D, products.runs_of(cols), E, ids, n)
        np.testing.assert_array_equal(Bp, packed(np.ascontiguousarray(D[:, cols]), 1))
        np.testing.assert_array_equal(sums, want)
        np.testing.assert_array_equal(E, want_E)


@pytest.mark.parametrize("T,B,H", [(1, 1, 1), (3, 2, 17), (5, 4, 64), (7, 3, 130)])
def test_token_ids_scatter_add_and_sums_in_order(T, B, H, rng):
    # ∂W_xh of token ids (a scatter-add of dZ's rows) and ∂b (their sums), a block of columns at
    # a time: each element exactly numpy's sum over (t, b) in order, for any chunking of the
    # columns, and rows of ids that never occur left zero
    from fastbptt._cpu import projections
    dZ = rng.normal(size=(T, B, H))
    X = rng.integers(0, 6, (T, B))
    want, want_s = np.zeros((7, H)), np.zeros(H)
    for t in range(T):
        for b in range(B):
            want[X[t, b]] += dZ[t, b]
            want_s += dZ[t, b]
    for n in (1, 2, 3):
        dW, s = np.full((7, H), np.nan), np.full(H, np.nan)
        projections.embed_tokens_backward_cpu(dW, s, dZ, X, n)
        np.testing.assert_array_equal(dW, want)
        np.testing.assert_array_equal(s, want_s)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_products_do_not_depend_on_the_leading_dimension(dtype, rng):
    # the same columns of B, from matrices of different widths: the same result, exactly
    A = rng.normal(size=(9, 50)).astype(dtype)
    B = rng.normal(size=(50, 48)).astype(dtype)
    wide = np.zeros((50, 1024), dtype)
    wide[:, 512:560] = B
    C1, C2 = np.zeros((9, 48), dtype), np.zeros((9, 1024), dtype)
    products.matmul(C1, A, packed(B, 1), dtype(1), 0, 48, 0, products.NO_POST, BLK, products.ADD)
    products.matmul(C2, A, packed(wide, 2), dtype(1), 512, 560, 0, products.NO_POST, BLK, products.ADD)
    assert np.array_equal(C1, C2[:, 512:560])
    np.testing.assert_allclose(C1, A.astype(float) @ B, rtol=2e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-4 if dtype == np.float32 else 1e-12)


# ------------------------------------------------------------------------------- plan
@pytest.fixture
def plan_dir(tmp_path, monkeypatch):
    """plans in a folder of the test's own, the products' blocking not measured"""
    monkeypatch.setattr(plan, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(config, "CPU_AUTOTUNE", False)
    plan.forget()
    yield tmp_path
    plan.forget()


def test_plan_is_measured_once_persisted_and_read_back(plan_dir):
    p = plan.current(2)
    assert not os.path.exists(p.path)
    assert p.blocking == plan.DEFAULT_BLOCKING and not p.tuned
    lanes, blk = p.sweep(elman, np.float32, 4, 96)                      # measured now, then kept
    assert lanes in (1, 2, -2) and tuple(blk) in plan.STEP_BLOCKING
    with open(p.path) as f:
        data = json.load(f)
    assert data["key"] == plan.machine_key(2)
    assert data["sweeps"] == {"elman float32 B=4 H=96": [lanes, int(blk[0]), int(blk[1])]}
    plan.forget()
    again = plan.current(2)
    assert again is not p and again.sweeps == {"elman float32 B=4 H=96": (lanes, int(blk[0]), int(blk[1]))}
    assert plan.current(1).path != again.path                   # the thread count is in the key
    again.sweeps["elman float32 B=32 H=96"] = (-2, 128, 64)           # a row split is kept as well
    again.save()
    plan.forget()
    assert plan.current(2).sweeps["elman float32 B=32 H=96"] == (-2, 128, 64)


@pytest.mark.parametrize("cell,name", [("rnn", "elman"), ("gru", "gru"), ("lstm", "lstm")])
def test_each_cell_measures_its_own_sweeps(plan_dir, cell, name, rng):
    # a gated step is a product G times as wide with a pointwise part of its own: the plan
    # times the cell's own sweep, under the cell's own key
    params = fastbptt.init_params(8, 24, 8, cell=cell, seed=0)
    fastbptt.loss_and_grad(params, rng.integers(0, 8, (3, 5)), rng.integers(0, 8, (3, 5)))
    assert list(plan.current(team.max_threads()).sweeps) == [f"{name} float32 B=5 H=24"]


def test_a_large_product_measures_its_own_blocking_once(plan_dir, monkeypatch):
    monkeypatch.setattr(config, "CPU_AUTOTUNE", True)
    monkeypatch.setattr(plan, "MEASURE_MACS", 1000)
    monkeypatch.setattr(plan, "PROBE_ROWS", 24)
    p = plan.Plan(plan.machine_key(2), str(plan_dir / "p.json"))
    grid = {(kc, mc) for kc in plan.KC_CANDIDATES for mc in plan.MC_CANDIDATES}
    assert tuple(p.blk("rows", np.float32, 4, 10, 20)) == p.blocking["rows"]        # 800 < MEASURE_MACS
    blk = p.blk("rows", np.float32, 50, 40, 20, split="rows")      # measured on 16 of its rows
    assert tuple(blk) in grid and list(p.products) == ["rows by rows float32 M=16 K=32 N=20"]
    assert p.blk("rows", np.float32, 90, 63, 20, split="rows") is blk          # the same class: kept
    p.blk("grad", np.float32, 30, 40, 20)
    assert set(p.products) == {"rows by rows float32 M=16 K=32 N=20", "grad by cols float32 M=16 K=32 N=20"}
    again = plan.Plan(p.key, p.path).load()                           # persisted, read back
    assert again.products == p.products
    monkeypatch.setattr(config, "CPU_AUTOTUNE", False)                # the documented defaults
    assert tuple(again.blk("grad", np.float32, 500, 40, 200)) == again.blocking["grad"]


@pytest.mark.parametrize("others,chosen", [(0.97, "incumbent"), (0.90, "other")])
def test_a_products_own_blocking_must_beat_its_kinds_by_the_margin(plan_dir, monkeypatch, others, chosen):
    # within this machine's noise of the kind's blocking, the kind's stays
    times = {"n": 0}

    def best_times(fns, rounds):
        times["n"] = len(fns)
        return [1.0] + [others] + [1.5] * (len(fns) - 2)           # the incumbent is measured first
    monkeypatch.setattr(plan, "_best_times", best_times)
    incumbent = (128, 64)
    got = plan.measure_product("cols", np.float32, 8, 40, 20, 2, incumbent)
    grid = [(kc, mc) for kc in plan.KC_CANDIDATES for mc in plan.MC_CANDIDATES]
    assert times["n"] == len(grid)
    second = [g for g in grid if g != incumbent][0]
    assert got == (incumbent if chosen == "incumbent" else second)


@pytest.mark.parametrize("lanes_time,want", [(0.97, -2), (0.90, 2)])
def test_a_gated_cells_column_lanes_must_win_by_the_margin(lanes_time, want):
    # column lanes put a gated cell's columns in the lanes' order, which costs outside the
    # sweep: within the margin of the row split, the row split stays; the Elman cell has no
    # such cost
    candidates = [(1, 128, 64), (2, 128, 64), (-2, 128, 64)]
    times = [1.2, lanes_time, 1.0]
    assert plan._sweep_choice(lstm, candidates, times)[0] == want
    assert plan._sweep_choice(elman, candidates, times)[0] == 2


def test_first_use_measures_the_products_blocking(plan_dir, monkeypatch):
    monkeypatch.setattr(config, "CPU_AUTOTUNE", True)
    monkeypatch.setattr(plan, "TUNE_SHAPES", {k: [(8, 40, 20)] for k in plan.DEFAULT_BLOCKING})
    p = plan.current(2)
    assert p.tuned and os.path.exists(p.path)
    grid = {(kc, mc) for kc in plan.KC_CANDIDATES for mc in plan.MC_CANDIDATES}
    assert all(b in grid for b in p.blocking.values())


def test_plan_key_names_the_machine_and_versions():
    import numba
    key = plan.machine_key(3)
    assert key["threads"] == 3 and key["numba"] == numba.__version__ and key["numpy"] == np.__version__
    assert key["cpu"] and key["cpu_name"] and key["features"]


@pytest.mark.parametrize("content", ["{not json", '{"format": FMT}', '{"format": 1, "key": KEY}',
                                     '{"format": FMT, "key": KEY, "blocking": {"rows": [0, 64], '
                                     '"grad": [128, 64]}, "sweeps": {}, "products": {}}',
                                     '{"format": FMT, "key": KEY, "blocking": {"rows": [128, 64], '
                                     '"grad": [128, 64]}, "sweeps": {"elman float32 B=1 H=8": [2]}}',
                                     '{"format": FMT, "key": KEY, "blocking": {"rows": [128, 64], '
                                     '"grad": [128, 64]}, "sweeps": {"elman float32 B=8 H=8": [-1, 128, 64]}}',
                                     '{"format": FMT, "key": KEY, "blocking": {"rows": [128, 64], '
                                     '"grad": [128, 64]}, "sweeps": {}, '
                                     '"products": {"grad by cols float32 M=1 K=1 N=1": [0, 64]}}',
                                     '{"format": FMT, "key": KEY, "blocking": {"rows": [9223372036854775808, 64], '
                                     '"grad": [128, 64]}, "sweeps": {}, "products": {}}',
                                     '{"format": FMT, "key": KEY, "blocking": {"rows": [128, 64], '
                                     '"grad": [128, 64]}, "sweeps": {}, "products": {}, '
                                     '"loaded": ["elman float32 B=1 H=8"]}'])
def test_unreadable_or_stale_plan_is_ignored_with_a_warning(plan_dir, content):
    path = plan.current(2).path
    plan.forget()
    with open(path, "w") as f:
        f.write(content.replace("KEY", json.dumps(plan.machine_key(2))).replace("FMT", str(plan.FORMAT)))
    with pytest.warns(RuntimeWarning, match="ignoring"):
        p = plan.current(2)
    assert p.blocking == plan.DEFAULT_BLOCKING and p.sweeps == {}


def test_a_plan_that_cannot_be_saved_warns_once_and_leaves_no_temporary(plan_dir):
    p = plan.current(2)
    os.mkdir(p.path)                          # a folder where the plan's file would go
    with pytest.warns(RuntimeWarning, match="cannot write the plan") as got:
        p.save()
        p.save()
    assert len(got) == 1 and os.listdir(os.path.dirname(p.path)) == [os.path.basename(p.path)]


def test_a_kernel_that_cannot_be_saved_warns_once_and_runs():
    # a full disk under the cache: the kernel is compiled and runs, and compiles again in the
    # next process; another library's kernels keep numba's own behaviour
    import contextlib
    import types
    from numba.core import caching
    from fastbptt._cpu import cache

    def full(sig, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fake(locator):
        return types.SimpleNamespace(_impl=types.SimpleNamespace(locator=locator), _save_overload=full,
                                     _guard_against_spurious_io_errors=contextlib.nullcontext)
    ours = object.__new__(cache._KernelLocator)
    save = cache._saving_or_warning(lambda self, sig, data: self._save_overload(sig, data))
    with pytest.warns(RuntimeWarning, match="cannot save a compiled kernel") as got:
        save(fake(ours), None, None)
        save(fake(ours), None, None)
    assert len(got) == 1
    with pytest.raises(OSError):
        save(fake(object()), None, None)
    assert getattr(caching.Cache.save_overload, "fastbptt", False)          # installed


_FOREIGN_INDEX = """
import glob, pickle, numba, numpy as np
from fastbptt._cpu import arrays, cache
if {write}:                                   # an index another fastbptt wrote: classes this one lacks
    index, = glob.glob(str(cache.cache_dir() / "arrays.id_range_cpu-*.nbi"))
    with open(index, "wb") as f:
        f.write(pickle.dumps(numba.__version__) + b"cfastbptt_elsewhere\\nGone\\n.")
print(arrays.id_range_cpu(np.arange(3, 9)))
"""


def test_a_kernel_index_another_fastbptt_wrote_is_read_as_stale(tmp_path):
    # two fastbptt sharing a cache folder: one's kernel index names classes the other cannot
    # import; numba would raise on each load and save of that kernel
    env = dict(os.environ, FASTBPTT_CACHE_DIR=str(tmp_path))
    for write in (False, True, False):
        got = subprocess.run([sys.executable, "-c", _FOREIGN_INDEX.format(write=write)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert got.returncode == 0 and got.stdout.strip() == "(3, 8)", got.stderr[-3000:]


def test_a_cache_folder_that_cannot_be_written_is_passed_over_with_a_warning(tmp_path, monkeypatch):
    from fastbptt._cpu import cache
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("FASTBPTT_CACHE_DIR", str(tmp_path / "afile"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache.cache_dir.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=f"FASTBPTT_CACHE_DIR: cannot write into {tmp_path}/afile; "
                                                f"fastbptt's kernels and plans go to {tmp_path}/xdg/fastbptt"):
            assert cache.cache_dir() == tmp_path / "xdg" / "fastbptt"
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "afile"))    # neither: a folder of its own
        cache.cache_dir.cache_clear()
        with pytest.warns(RuntimeWarning, match="no writable cache folder .* compile again in every process"):
            got = cache.cache_dir()
        assert got.is_dir() and got.name.startswith("fastbptt-cache-")      # removed at exit
    finally:
        cache.cache_dir.cache_clear()


def test_plan_from_another_machine_is_not_used(plan_dir):
    path = plan.current(2).path
    plan.forget()
    other = dict(plan.machine_key(2), cpu="Some Other CPU")
    with open(path, "w") as f:
        json.dump({"format": plan.FORMAT, "key": other, "tuned": True, "blocking": {k: [512, 128] for k in
                   plan.DEFAULT_BLOCKING}, "sweeps": {"elman float32 B=1 H=64": [2, 512, 64]}}, f)
    with pytest.warns(RuntimeWarning, match="made for"):
        p = plan.current(2)
    assert p.blocking == plan.DEFAULT_BLOCKING and p.sweeps == {} and not p.tuned


def test_tune_measures_every_kind_and_saves(plan_dir, monkeypatch):
    monkeypatch.setattr(plan, "TUNE_SHAPES", {k: [(8, 40, 20)] for k in plan.DEFAULT_BLOCKING})
    monkeypatch.setattr(plan, "KC_CANDIDATES", (16, 512))
    monkeypatch.setattr(plan, "MC_CANDIDATES", (4, 64))
    p = plan.tune(2, progress=False, sweeps=[(elman, np.float32, 2, 48), (lstm, np.float32, 2, 48)])
    assert p.tuned and set(p.blocking) == set(plan.DEFAULT_BLOCKING)
    assert all(b[0] in (16, 512) and b[1] in (4, 64) for b in p.blocking.values())
    with open(p.path) as f:
        data = json.load(f)
    assert data["tuned"] and {"elman float32 B=2 H=48", "lstm float32 B=2 H=48"} <= set(data["sweeps"])
    assert "tuned" in plan.describe(p)


def test_a_sweep_measured_again_keeps_each_candidates_best_time(plan_dir):
    # fastbptt tune measures a sweep in passes apart: a candidate's fast time in an earlier
    # pass counts though a busy spell slowed it in this one
    seen = {(1, 64, 64): 1e-12}
    assert plan.measure_sweep(elman, np.float32, 2, 48, 2, seen)[0] == (1, 64, 64)
    assert {(n, kc, mc) for n in (1, 2) for kc, mc in plan.STEP_BLOCKING} <= set(seen)
    assert seen[(1, 64, 64)] == 1e-12 and all(t > 1e-12 for c, t in seen.items() if c != (1, 64, 64))


def _measured(*results):
    """a measure_sweep that hands out ``results`` ((choice, waited) pairs) in turn"""
    it = iter(results)
    return lambda cell, dtype, B, H, threads, seen=None: next(it)


def test_a_sweep_measured_under_load_is_marked_kept_and_replaced_when_quiet(plan_dir, monkeypatch):
    # one lane wins while another process holds a core and loses on the quiet machine: the
    # choice stays (a run's sums do not change under it) but is marked, and measured again
    # by tune and bench; a quiet measurement replaces it
    busy, quiet = plan.LOADED_WAIT + 0.5, plan.LOADED_WAIT / 2
    monkeypatch.setattr(plan, "measure_sweep", _measured(((1, 64, 64), busy), ((2, 128, 64), busy),
                                                         ((2, 128, 64), quiet), ((2, 256, 64), quiet)))
    p = plan.current(2)
    key = "elman float32 B=1 H=96"
    assert p.sweep(elman, np.float32, 1, 96)[0] == 1 and p.loaded == {key}
    assert "1 sweep shapes measured (1 under load)" in plan.describe(p)
    plan.forget()
    p = plan.current(2)                                               # read back
    assert p.sweeps[key] == (1, 64, 64) and p.loaded == {key}
    assert p.remeasure_loaded(passes=1) == 0                          # still busy: kept
    assert p.sweeps[key] == (1, 64, 64) and p.loaded == {key}
    assert p.remeasure_loaded(passes=2) == 1                          # quiet, then the best of both passes
    assert p.sweeps[key] == (2, 256, 64) and not p.loaded
    assert p.sweep(elman, np.float32, 1, 96)[0] == 2 and "under load" not in plan.describe(p)
    plan.forget()
    assert plan.current(2).sweeps[key] == (2, 256, 64) and not plan.current(2).loaded


def test_tune_marks_a_sweep_under_load_only_when_every_pass_was(plan_dir, monkeypatch):
    monkeypatch.setattr(plan, "TUNE_SHAPES", {k: [(8, 40, 20)] for k in plan.DEFAULT_BLOCKING})
    monkeypatch.setattr(plan, "KC_CANDIDATES", (64,))
    monkeypatch.setattr(plan, "MC_CANDIDATES", (64,))
    busy, quiet = plan.LOADED_WAIT + 0.5, 0.0
    # passes over two sweeps in turn: the first quiet in its second pass, the second never
    monkeypatch.setattr(plan, "measure_sweep", _measured(*[((1, 64, 64), w) for w in
                                                           (busy, busy, quiet, busy, busy, busy)]))
    p = plan.tune(2, progress=False, sweeps=[(elman, np.float32, 1, 48), (lstm, np.float32, 1, 48)])
    assert p.loaded == {"lstm float32 B=1 H=48"}


def test_tune_of_some_cells_keeps_the_other_cells_sweeps(plan_dir, monkeypatch):
    # fastbptt tune --cell rnn measures the rnn's sweeps again, and leaves the gru's
    monkeypatch.setattr(plan, "TUNE_SHAPES", {k: [(8, 40, 20)] for k in plan.DEFAULT_BLOCKING})
    monkeypatch.setattr(plan, "KC_CANDIDATES", (64,))
    monkeypatch.setattr(plan, "MC_CANDIDATES", (64,))
    p = plan.current(2)
    p.sweeps.update({"gru float32 B=3 H=8": (1, 128, 64), "elman float32 B=3 H=8": (1, 128, 64)})
    p.loaded.add("gru float32 B=3 H=8")
    monkeypatch.setattr(plan, "measure_sweep", _measured(*[((2, 64, 64), 0.0)] * plan.TUNE_PASSES))
    p = plan.tune(2, progress=False, sweeps=[(elman, np.float32, 1, 48)])
    assert p.sweeps == {"gru float32 B=3 H=8": (1, 128, 64), "elman float32 B=1 H=48": (2, 64, 64)}
    assert p.loaded == {"gru float32 B=3 H=8"}


def test_a_key_this_version_does_not_make_is_left_as_it_is(plan_dir):
    # another version of fastbptt may share the plan file
    p = plan.current(2)
    p.sweeps["mgu float32 B=1 H=8"] = (1, 128, 64)
    p.loaded.add("mgu float32 B=1 H=8")
    assert p.remeasure_loaded(passes=1) == 0 and p.loaded == {"mgu float32 B=1 H=8"}


def test_waits_count_each_threads_own_delay(monkeypatch):
    # a thread that ends inside the block takes its delay with it, not the others'; one that
    # starts inside it counts from its start
    s = 1_000_000_000
    readings = iter([{"1": 5 * s, "2": 40 * s}, {"1": 5 * s + s // 2, "3": s // 4}])
    monkeypatch.setattr(plan, "_waited_ns", lambda: next(readings))
    with plan.waits(2) as w:
        time.sleep(0.05)
    assert 0.75 / 2 / 1.0 < w.share <= 0.75 / 2 / 0.05


def test_a_sweeps_compile_is_not_timed_as_waiting(plan_dir, monkeypatch):
    # the first call of a probe may compile its kernel (tens of seconds); the waits are taken
    # over the timed calls alone
    calls, at_enter = [], []
    probe = elman.sweep_probe
    monkeypatch.setattr(elman, "sweep_probe", lambda *a: (lambda *b, f=probe(*a): calls.append(1) or f(*b)))
    enter = plan.waits.__enter__
    monkeypatch.setattr(plan.waits, "__enter__", lambda self: at_enter.append(len(calls)) or enter(self))
    plan.measure_sweep(elman, np.float32, 2, 16, 2)
    assert at_enter == [1]


def test_waits_sees_other_processes_holding_the_cores(rng):
    # the run queue delay of this process's threads, while more busy processes than cores
    # share them: a measurement then is one under load
    if not plan._waited_ns():
        pytest.skip("this kernel does not report the run queue delay (/proc/self/task/*/schedstat)")
    params = fastbptt.init_params(16, 64, 16, seed=0)
    X, Y = rng.integers(0, 16, (64, 4)), rng.integers(0, 16, (64, 4))
    fastbptt.loss_and_grad(params, X, Y)
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(2 * len(os.sched_getaffinity(0)))]
    try:
        time.sleep(0.3)
        with plan.waits(team.max_threads()) as w:
            end = time.perf_counter() + 1.0
            while time.perf_counter() < end:
                fastbptt.loss_and_grad(params, X, Y)
    finally:
        for p in spin:
            p.kill()
    assert w.share > plan.LOADED_WAIT


def test_results_do_not_depend_on_the_thread_count_for_a_fixed_plan(rng, plan_dir):
    # the lanes fix the order of every sum (a lane adds its own K range first); one thread
    # running both lanes gives the very same bits as two threads
    import numba
    params = fastbptt.init_params(28, 100, 28, seed=1)
    params["W_hh"] *= 30
    X, Y = rng.integers(0, 28, (20, 7)), rng.integers(0, 28, (20, 7))
    before = numba.get_num_threads()
    by_lanes = {}
    try:
        for lanes in (1, 2):
            results = []
            for n in (1, 2):
                numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
                plan.current(team.max_threads()).sweeps["elman float32 B=7 H=100"] = (lanes, 128, 64)
                results.append(fastbptt.loss_and_grad(params, X, Y))
            (l1, g1, h1), (l2, g2, h2) = results
            assert l1 == l2 and np.array_equal(h1, h2)
            assert all(np.array_equal(g1[k], g2[k]) for k in g1)
            by_lanes[lanes] = results[0]
    finally:
        numba.set_num_threads(before)
    for k in by_lanes[1][1]:                             # other lanes: other rounding only
        want = by_lanes[1][1][k]
        np.testing.assert_allclose(by_lanes[2][1][k], want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("cell,name", [("rnn", "elman"), ("gru", "gru"), ("lstm", "lstm")])
def test_a_kept_forwards_backward_runs_its_sweeps_as_the_forward_did(plan_dir, rng, cell, name):
    # a gated cell's kept gates are in the column order of the forward's lanes: the backward
    # takes the forward's choices though the plan now says otherwise (its entry measured again
    # by bench or tune, or another thread count's plan when the caller changed numba's)
    import numba
    params = fastbptt.init_params(9, 40, 9, cell=cell, seed=3, dtype=np.float64)
    X = rng.standard_normal((6, 8, 9))
    dHs = rng.standard_normal((6, 8, 40))
    key = f"{name} float64 B=8 H=40"
    p = plan.current(team.max_threads())
    before = numba.get_num_threads()
    want = None
    try:
        for forward_lanes, backward_lanes in [(2, 1), (1, 2), (2, -2)]:
            p.sweeps[key] = (forward_lanes, 128, 64)
            Hs, _, kept = fastbptt.rnn_forward(params, X, keep=True, return_state=True)
            p.sweeps[key] = (backward_lanes, 128, 64)
            got = fastbptt.rnn_backward(params, X, Hs, dHs, forward=kept, input_grad=True)
            want = fastbptt.rnn_backward(params, X, Hs, dHs, input_grad=True) if want is None else want
            for k in want:
                np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-12, err_msg=k)
        if numba.config.NUMBA_NUM_THREADS >= 2:          # another thread count: another plan
            numba.set_num_threads(2)
            plan.current(team.max_threads()).sweeps[key] = (2, 128, 64)
            Hs, _, kept = fastbptt.rnn_forward(params, X, keep=True, return_state=True)
            numba.set_num_threads(1)
            plan.current(team.max_threads()).sweeps[key] = (1, 128, 64)
            got = fastbptt.rnn_backward(params, X, Hs, dHs, forward=kept, input_grad=True)
            for k in want:
                np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-12, err_msg=k)
    finally:
        numba.set_num_threads(before)


def test_threads_asking_for_the_plan_at_once_share_one(plan_dir, monkeypatch):
    # each thread's own Plan, measured apart, could run one call's forward and backward on
    # different lanes
    load = plan.Plan.load
    monkeypatch.setattr(plan.Plan, "load", lambda self: time.sleep(0.05) or load(self))
    start, got = threading.Barrier(4), []

    def ask():
        start.wait()
        got.append(plan.current(2))
    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(p is got[0] for p in got)


# ------------------------------------------------------------------------ the team
def _drive(t, cost, calls):
    seen = []
    for _ in range(calls):
        n = t.choose("k", 2)
        seen.append(n)
        t.record("k", n, 2, cost[n])
    return seen


def test_team_uses_the_faster_thread_count_and_follows_the_load(monkeypatch):
    monkeypatch.setattr(team, "CPU_TEAM_ADAPT", True)
    t = team.Team()
    seen = _drive(t, {2: 1.0, 1: 1.5}, 200)          # quiet: both threads win
    assert seen[:6] == [2, 2, 2, 1, 1, 1]            # a warm-up and two measured calls of each
    assert seen[6:].count(1) <= 12                   # the losing count is tried ever less often
    n = t.choose("k", 2)
    t.record("k", n, 2, 100.0)                       # one slow call does not flip the choice
    assert _drive(t, {2: 1.0, 1: 1.5}, 20).count(2) >= 18
    seen = _drive(t, {2: 3.0, 1: 1.5}, 100)          # load arrives: one thread, within a few calls
    assert seen[:10].count(1) >= 5                   # all the threads tried again soon after the switch,
    assert seen[-50:].count(1) >= 44                 # ... ever less often while they lose
    seen = _drive(t, {2: 1.0, 1: 1.5}, 200)          # load gone: back to both threads
    assert seen[-50:].count(2) >= 45
    assert t.choose("other", 1) == 1                 # one core: nothing to choose


def test_a_transpose_between_calls_runs_on_the_last_calls_thread_count(monkeypatch, rng):
    """a framework's weights made contiguous between calls (cpu.transposed) run on as many
    threads as this thread's last call, all of them before its first, and the transpose is
    the same whatever the count"""
    import numba

    import fastbptt._cpu as cpu
    t = team.Team()
    monkeypatch.setattr(team, "team", t)
    most = team.max_threads()
    seen = []
    real = cpu.transpose_cpu

    def spy(out, a, n):
        seen.append((n, numba.get_num_threads()))
        real(out, a, n)
    monkeypatch.setattr(cpu, "transpose_cpu", spy)
    a = rng.normal(size=(37, 70)).astype(np.float32)
    out = np.empty((70, 37), np.float32)
    assert t.recent() == most
    cpu.transposed(a, out)
    monkeypatch.setattr(t, "choose", lambda key, m: 1)          # a call the team runs on one thread
    monkeypatch.setattr(t, "record", lambda *args: None)
    with t.call(("k",)) as n:
        assert n == 1
    cpu.transposed(a, out)
    np.testing.assert_array_equal(out, a.T)
    assert seen == [(most, most), (1, 1)]
    assert numba.get_num_threads() == most


def test_max_threads_is_capped_by_the_affinity_mask():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no affinity masks on this OS")
    assert team.max_threads() <= len(os.sched_getaffinity(0))


# ------------------------------------------------------------ waits under load
@pytest.mark.parametrize("lanes,B", [(5, 3), (-3, 7)])
def test_a_lane_whose_thread_never_starts_is_taken_over(lanes, B, rng):
    # more column lanes (or row chunks) than threads: the running thread computes every step
    import numba
    W = rng.normal(size=(96, 96)) / 10
    pre = rng.normal(size=(12, B, 96))
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        S = pre.copy()
        elman.forward_cpu(S, packed(W, 1), elman.TANH, BLK, lanes, 2, False)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_allclose(S, reference.sweep_forward(W, pre), rtol=1e-12, atol=1e-12)


_BUSY = """
import sys, time
import numpy as np
import fastbptt
p = fastbptt.init_params(28, 256, 28, seed=0)
X = np.random.default_rng(0).integers(0, 28, (35, 8))
want = fastbptt.loss_and_grad(p, X, X)
t0 = time.perf_counter()
for _ in range(int(sys.argv[1])):
    got = fastbptt.loss_and_grad(p, X, X)
    assert got[0] == want[0] and all(np.array_equal(got[1][k], want[1][k]) for k in got[1])
print(time.perf_counter() - t0)
"""


def test_more_threads_than_cores_beside_a_busy_process_finishes_exactly(tmp_path):
    # 8 numba threads on this machine's cores, next to a busy loop: bounded, exact
    env = dict(os.environ, NUMBA_NUM_THREADS="8")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        runs = [subprocess.Popen([sys.executable, "-c", _BUSY, "30"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for r in runs:
            out, err = r.communicate(timeout=300)
            assert r.returncode == 0, err[-2000:]
            assert float(out.strip()) < 60
    finally:
        hog.kill()
        hog.wait()


def test_calls_from_two_python_threads_at_once_are_exact(rng):
    params = fastbptt.init_params(28, 128, 28, seed=0)
    X = rng.integers(0, 28, (30, 16))
    want = fastbptt.loss_and_grad(params, X, X)
    errors = []

    def worker():
        for _ in range(20):
            got = fastbptt.loss_and_grad(params, X, X)
            if got[0] != want[0] or not all(np.array_equal(got[1][k], want[1][k]) for k in got[1]):
                errors.append("mismatch")

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)


# ------------------------------------------------------------------------- the cache
_CACHE_HIT = """
import numpy as np, numba, fastbptt
from fastbptt._cpu import elman, gru, head, lanes, lstm, products, projections
for dt in (np.float32, np.float64):
    p = fastbptt.init_params(11, 40, 11, dtype=dt, seed=0)
    X = np.arange(12).reshape(4, 3) % 11
    fastbptt.loss_and_grad(p, X, X)
    fastbptt.loss_and_grad(p, X, X, np.ones((3, 40), dt))
    fastbptt.loss_and_grad(p, X, X, truncation=fastbptt.Truncated(2))
    fastbptt.loss_and_grad(p, np.ones((4, 3, 11), dt), X)
    fastbptt.loss(p, X, X)
    for cell in ("gru", "lstm"):
        q = fastbptt.init_params(11, 40, 11, dtype=dt, seed=0, cell=cell, num_layers=2)
        fastbptt.loss_and_grad(q, X, X)
        fastbptt.loss_and_grad(q, X, X, truncation=fastbptt.Truncated(2))
        fastbptt.rnn_forward(q, np.ones((4, 3, 11), dt))
misses = {}
for mod in (elman, gru, lstm, head, lanes, products, projections):
    for name in dir(mod):
        f = getattr(mod, name)
        if isinstance(f, numba.core.registry.CPUDispatcher):
            n = sum(f.stats.cache_misses.values())
            if n:
                misses[f"{mod.__name__}.{name}"] = n
print(sorted(misses))
"""


@pytest.mark.parametrize("threads", ["1", "2"])
def test_a_second_process_loads_every_kernel_from_the_cache(threads):
    env = dict(os.environ, NUMBA_NUM_THREADS=threads)
    first = subprocess.run([sys.executable, "-c", _CACHE_HIT], env=env, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run([sys.executable, "-c", _CACHE_HIT], env=env, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.strip() == "[]", f"compiled again in a second process: {second.stdout}"
    assert "Cannot cache" not in first.stderr + second.stderr


def test_cache_stamp_covers_every_engine_source_and_the_tunables(monkeypatch):
    from fastbptt._cpu import cache
    names = {p.name for p in cache._SOURCES}
    assert {"products.py", "lanes.py", "elman.py", "head.py", "projections.py", "fastmath.py",
            "config.py"} <= names
    before = cache.stamp()
    cache.stamp.cache_clear()
    monkeypatch.setattr(config, "CPU_STEAL_SPINS", config.CPU_STEAL_SPINS + 1)
    try:
        assert cache.stamp() != before
    finally:
        cache.stamp.cache_clear()


# ----------------------------------------------------------------- kept work buffers
def test_kept_work_buffers_never_exceed_the_cap(monkeypatch, rng):
    import fastbptt._cpu as cpu
    monkeypatch.setattr(config, "CPU_SCRATCH_BYTES", 1 << 20)
    cpu._scratch.sets.clear()
    p = fastbptt.init_params(16, 256, 16, seed=0)
    X = rng.integers(0, 16, (20, 4))                    # every set under 1 MiB: kept
    fastbptt.loss_and_grad(p, X, X)
    small = cpu._scratch.nbytes()
    assert 0 < small <= 1 << 20
    X = rng.integers(0, 16, (200, 32))                  # S alone is 6.6 MiB: nothing of it kept
    want = fastbptt.loss_and_grad(p, X, X)
    assert cpu._scratch.nbytes() <= 2 << 20          # two call shapes at most, each under the cap
    got = fastbptt.loss_and_grad(p, X, X)              # and the next call is still exact
    assert got[0] == want[0] and all(np.array_equal(got[1][k], want[1][k]) for k in got[1])


def test_kept_buffers_are_never_reused_for_another_shape(rng):
    # the same T, B, H with another Q (and D) must not reuse the previous call's head buffers
    results = {}
    for Q, D in [(5, 3), (1, 2), (5, 3), (2, 7), (1, 2)]:
        p = fastbptt.init_params(D, 6, Q, dtype=np.float64, seed=Q)
        X, Y = rng.integers(0, D, (3, 4)) * 0 + 1 % D, np.zeros((3, 4), np.int64) + (Q - 1)
        loss, grads, _ = fastbptt.loss_and_grad(p, X, Y)
        if (Q, D) in results:
            assert loss == results[Q, D][0]
            assert all(np.array_equal(grads[k], results[Q, D][1][k]) for k in grads)
        results[Q, D] = (loss, grads)
    assert results[1, 2][0] == 0.0                     # one class: every term is log 1


def test_tune_command_measures_and_prints_the_plan(plan_dir, monkeypatch, capsys):
    from fastbptt import bench, cli
    monkeypatch.setattr(plan, "TUNE_SHAPES", {k: [(8, 40, 20)] for k in plan.DEFAULT_BLOCKING})
    monkeypatch.setattr(bench, "CONFIGS", {"tiny": (4, 2, 8, 32)})
    monkeypatch.setattr(bench, "GATED_CONFIGS", {"tiny": (4, 2, 8, 32, 8, False)})
    with pytest.raises(SystemExit) as done:
        cli.main(["tune", "--batch", "1", "3", "--hidden", "16", "--cell", "rnn", "lstm", "--quiet"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "tuned" in out and "6 sweep shapes measured" in out          # 3 shapes of each cell
    assert {k.split()[0] for k in plan.current(team.max_threads()).sweeps} == {"elman", "lstm"}
    with pytest.raises(SystemExit) as done:
        cli.main(["tune", "--batch", "0", "--quiet"])
    assert done.value.code == 2 and "--batch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:                          # weights larger than memory: before any work
        cli.main(["tune", "--batch", "1", "--hidden", "99999999", "--cell", "rnn", "--quiet"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("fastbptt tune: error: --hidden: the rnn model of "
                                                   "hidden=99999999") and err.count("\n") == 1


_FORK_CHILD = """
import multiprocessing as mp, sys, numpy as np, fastbptt
P = fastbptt.init_params(5, 8, 5, seed=0)
X = np.arange(12).reshape(3, 4) % 5
if sys.argv[1] == "after":
    fastbptt.loss_and_grad(P, X, X)             # the parent's kernels open parallel regions


def child(q):
    try:
        q.put(("ok", fastbptt.loss_and_grad(P, X, X)[0]))
    except RuntimeError as e:
        q.put(("error", str(e)))


q = mp.get_context("fork").Queue()
p = mp.get_context("fork").Process(target=child, args=(q,))
p.start()
p.join(60)
import numba
fastbptt.loss_and_grad(P, X, X)                 # (the layer is known once a region has run)
print(numba.threading_layer(), p.exitcode, *q.get(timeout=1))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="fork and GNU OpenMP: Linux")
@pytest.mark.parametrize("when", ["after", "before"])
def test_a_forked_child_gets_an_error_not_a_signal(when):
    """a child forked after the parent's calls: on numba's OpenMP layer (not fork-safe) its call
    raises RuntimeError naming the start methods that work, instead of the child being ended by
    SIGTERM at its first parallel region; on a fork-safe layer, or forked before any call, it runs"""
    out = subprocess.run([sys.executable, "-c", _FORK_CHILD, when], capture_output=True, text=True, timeout=120)
    layer, code, kind, what = out.stdout.split(maxsplit=3)
    if layer == "omp" and when == "after":
        assert (code, kind) == ("0", "error") and "'spawn'" in what and "forked" in what
    else:
        assert (code, kind) == ("0", "ok")


_SAME_BITS = """
import sys, numpy as np, fastbptt
from fastbptt import bench, config
from fastbptt._cpu import plan
config.CPU_AUTOTUNE = False                       # the documented blocking, and rows-split sweeps:
plan.measure_sweep = lambda cell, dtype, B, H, threads, seen=None: ((-2, 128, 64), 0.0)   # one fixed plan
out = {}
for cell in ("rnn", "gru", "lstm"):
    p, X, Y, h0 = bench.config_workload((25, 16, 64, 128, 28, True), cell)
    loss, g, _ = fastbptt.loss_and_grad(p, X, Y, h0)
    out.update({f"{cell} {k}": v for k, v in g.items()})
np.savez(sys.argv[1], **out)
"""


_LOAD_ORDER = """
import sys, numpy as np, fastbptt
from fastbptt import config
from fastbptt._cpu import CELLS, plan
config.CPU_AUTOTUNE = False                       # the documented blocking, and rows-split sweeps:
plan.measure_sweep = lambda cell, dtype, B, H, threads, seen=None: ((-2, 512, 64), 0.0)   # one fixed plan
if sys.argv[2] == "sweeps first":                 # as a plan's measurement runs them before any call
    for cell in CELLS.values():
        cell.sweep_probe(np.dtype(np.float32), 8, 16, 4, np.random.default_rng(0))(np.array([128, 64]), 1, 1)
rng = np.random.default_rng(0)
X, Y = rng.integers(0, 28, (10, 8)), rng.integers(0, 28, (10, 8))
out = {}
for cell in CELLS:
    p = fastbptt.init_params(28, 44, 28, seed=0, cell=cell)
    loss, g, _ = fastbptt.loss_and_grad(p, X, Y)                  # h_0 = 0: the first step has no product
    out.update({f"{cell} {k}": v for k, v in g.items()}, **{f"{cell} loss": np.float64(loss)})
np.savez(sys.argv[1], **out)
"""


def test_the_bits_do_not_depend_on_which_kernel_a_process_loaded_first(tmp_path):
    """a jitted function that two cached kernels hold a copy of runs whichever copy the
    process loaded first: the GRU's first step (h_0 = 0) ran its pointwise part from Python,
    and its loss moved in the last bits when a plan's sweep measurement had run first"""
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    for order in ("calls first", "sweeps first"):
        subprocess.run([sys.executable, "-c", _LOAD_ORDER, str(tmp_path / f"{order}.npz"), order], env=env,
                       check=True, timeout=600)
    calls, sweeps = np.load(tmp_path / "calls first.npz"), np.load(tmp_path / "sweeps first.npz")
    assert sorted(calls.files) == sorted(sweeps.files)
    for k in calls.files:
        assert np.array_equal(calls[k], sweeps[k]), k


@pytest.mark.slow
def test_a_process_that_compiles_the_kernels_and_one_that_loads_them_agree_bit_for_bit(tmp_path):
    """the same plan and threads give the same bits in the process that compiles the kernels
    (an empty cache) and in one that loads them: LLVM regrouped the LSTM's pointwise products
    differently in the two while the cells' parts were compiled with reassociation, and
    contracted the GRU's a·b + c to FMAs differently while they were compiled with contraction"""
    env = dict(os.environ, FASTBPTT_CACHE_DIR=str(tmp_path / "cache"), NUMBA_NUM_THREADS="2")
    for name in ("compiled", "loaded"):
        subprocess.run([sys.executable, "-c", _SAME_BITS, str(tmp_path / f"{name}.npz")], env=env, check=True,
                       timeout=600)
    compiled, loaded = np.load(tmp_path / "compiled.npz"), np.load(tmp_path / "loaded.npz")
    assert sorted(compiled.files) == sorted(loaded.files)
    for k in compiled.files:
        assert np.array_equal(compiled[k], loaded[k]), k
