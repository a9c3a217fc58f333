"""``fastbptt bench --load`` (fastbptt.loadbench): its configs for every cell, its child
processes and their measurements. How fast the engine is under load is measured by it and by
../shared/tools/load_probe.py, not asserted here."""
import json
import os
import subprocess
import sys

import pytest

from fastbptt import bench, cli, loadbench


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_configs_are_the_cells_own_less_wide(cell):
    shapes = loadbench.configs_of(cell)
    assert "wide" not in shapes
    assert {k: v for k, v in shapes.items() if k != "latency" or cell == "rnn"} == \
        {k: v for k, v in bench.configs_of(cell).items() if k != "wide"}
    T, B, V, H, Q, dense = bench._shape(shapes["latency"])
    assert B == 1 and T >= 64 and not dense


def test_a_config_not_timed_under_load_is_refused():
    with pytest.raises(ValueError, match="configs: 'wide'"):
        loadbench.run(configs=["wide"], cell="gru", progress=False)
    with pytest.raises(ValueError, match="configs: 'd2l'"):
        loadbench.run(configs=["d2l"], cell="rnn", progress=False)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_a_child_times_the_gated_cell_on_its_shape(cell, capsys):
    loadbench.child("fastbptt", ["latency"], 0.0, cell)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["ms"]) == {"latency"} and out["ms"]["latency"] > 0 and out["cores"] >= 1


def test_a_child_times_only_calls_after_the_benchs_warm_up(capsys, monkeypatch):
    # the engine chooses its thread count over its first calls: those are not timed
    calls, stamps = [], iter(range(10**6))
    monkeypatch.setattr(bench, "make_fastbptt", lambda *a: lambda: calls.append(len(calls)))
    monkeypatch.setattr(loadbench.time, "perf_counter", lambda: float(next(stamps)))
    loadbench.child("fastbptt", ["latency"], 0.0, "rnn")
    capsys.readouterr()
    assert len(calls) == bench.warmup_calls() + 5                      # then five timed, budget 0


def test_measure_runs_fresh_processes_of_the_cell():
    ms = loadbench.measure("numpy-1thread", "quiet", ["latency"], 0.0, "lstm")
    assert set(ms) == {"latency"} and ms["latency"] > 0


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs a CPU affinity mask of two cores or more")
def test_one_core_holds_every_thread_numpy_starts():
    # numpy's BLAS threads start at its import, so the child is pinned before anything is
    # imported; measure refuses a one-core figure from a child whose threads escaped the core
    ms = loadbench.measure("numpy", "one-core", ["latency"], 0.0, "gru")
    assert ms["latency"] > 0
    threads, cores = subprocess.run(
        [sys.executable, "-c", "import numpy, fastbptt.loadbench as lb, os; os.sched_setaffinity(0, {0}); "
         "print(len(os.listdir('/proc/self/task')), lb.cores_used())"],
        capture_output=True, text=True, check=True).stdout.split()
    if int(threads) > 1:             # pinned after numpy's import, its BLAS threads are not
        assert int(cores) > 1


def test_bench_load_is_offered_for_every_cell(monkeypatch, capsys):
    # the CLI passes the cell and the chosen configs that are timed under load
    seen = {}
    monkeypatch.setattr(bench, "run", lambda *a, **k: ([], {}))
    monkeypatch.setattr(bench, "table", lambda rows, info: "")
    monkeypatch.setattr(loadbench, "run", lambda **k: seen.update(k) or [("quiet", "d2l", 1.0, 2.0, 2.0, 2.0)])
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--cell", "lstm", "--load", "--quick", "--configs", "d2l", "wide"])
    assert e.value.code == 0
    assert seen["cell"] == "lstm" and seen["configs"] == ["d2l"]
    assert "d2l under quiet at 2.00x" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["bench", "--cell", "gru", "--load", "--quick"])
    assert seen["cell"] == "gru" and seen["configs"] is None
