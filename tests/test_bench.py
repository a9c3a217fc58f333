"""The benchmark harness: a quick smoke run (benchmarks proper live in bench/)."""
import json

import numpy as np
import pytest

from fastbptt import bench, cli, peers


def test_flops_formula():
    assert bench.flops(35, 32, 28, 512) == 6 * 35 * 32 * 512 ** 2 + 6 * 35 * 32 * 512 * 28


def test_numpy_peer_matches_fastbptt_gradients():
    import fastbptt
    params, X, Y, h0 = bench.workload(7, 3, 11, 16)
    loss, grads = peers.numpy_loss_and_grad(params, X, Y, h0)
    want_loss, want, _ = fastbptt.loss_and_grad(params, X, Y, h0)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for k in want:
        np.testing.assert_allclose(grads[k], want[k], rtol=2e-3, atol=2e-6, err_msg=k)


@pytest.mark.parametrize("quick", [False, True])
def test_every_timed_slice_starts_after_the_pause_and_the_warm_up(monkeypatch, quick):
    # the previous system's thread pool (or numpy's, after its GEMM) goes idle before the
    # next one is timed, and each system's untimed calls come first (a quick run's too:
    # fewer rounds, the same figures); numpy's GEMM takes a slice of every round
    events, calls = [], {}

    def maker(system):
        def make(*args):
            def fn():
                calls[system] = calls.get(system, 0) + 1
                return 1.0
            fn.system = system
            return fn
        return make
    monkeypatch.setattr(bench, "MAKERS", {s: maker(s) for s in ("fastbptt", "numpy")})
    monkeypatch.setattr(bench, "make_fastbptt", maker("fastbptt"))            # the reference loss
    monkeypatch.setattr(bench.time, "sleep", lambda s: events.append(("pause", s)))

    def time_call(fn, n, s):
        events.append(("slice", fn, dict(calls)))
        return np.array([1e-3])
    monkeypatch.setattr(bench, "time_call", time_call)
    rows, _ = bench.run(configs=["latency"], systems=("fastbptt", "numpy"), quick=quick, progress=False)
    rounds = 2 if quick else bench.ROUNDS
    assert [r.status for r in rows] == ["ok", "ok"]
    assert len(events) == 2 * 3 * rounds
    assert events[0::2] == [("pause", bench.PAUSE)] * (3 * rounds)
    slices = [e[1] for e in events[1::2]]
    gemm = [fn for fn in slices if getattr(fn, "__func__", None) is bench.Gemm.call]
    assert len(gemm) == rounds and slices[2::3] == gemm
    first = events[1][2]                          # the calls made before the first slice
    # the reference call, each system's check call and its warm-up
    assert first == {"fastbptt": 2 + bench.warmup_calls(), "numpy": 1 + bench.warmup_calls()}


def test_each_config_measures_the_sweeps_measured_under_load_again_before_its_timing(monkeypatch):
    # the config's first call may measure its sweeps while the machine is busy: those are
    # measured again (replaced if the machine is quiet now) before any of its calls is timed
    events = []

    def make(*args):
        return lambda: events.append("call") or 1.0
    monkeypatch.setattr(bench, "MAKERS", {"fastbptt": make})
    monkeypatch.setattr(bench, "make_fastbptt", make)
    monkeypatch.setattr(bench, "remeasure_loaded", lambda: events.append("remeasure"))
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    monkeypatch.setattr(bench, "time_call", lambda fn, n, s: events.append("slice") or np.array([1e-3]))
    bench.run(configs=["latency", "d2l-concise"], systems=("fastbptt",), quick=True, progress=False)
    for config in (events[:len(events) // 2], events[len(events) // 2:]):
        assert config[:2] == ["call", "remeasure"] and config.count("remeasure") == 1
        assert "slice" in config


def test_each_config_takes_its_percent_of_the_gemm_timed_in_its_own_rounds(monkeypatch):
    # a slow spell during one config's rounds lowers the GEMM rate it is measured against
    configs, spell = ["latency", "d2l-concise"], [4e-3, 1e-3]
    gemm_slices = []
    real_time_call = bench.time_call

    def time_call(fn, n, s):
        if getattr(fn, "__func__", None) is bench.Gemm.call:
            gemm_slices.append(fn)
            return np.array([spell[(len(gemm_slices) - 1) // 2]] * n)     # quick: 2 rounds a config
        return real_time_call(fn, 1, 0.0)
    monkeypatch.setattr(bench, "time_call", time_call)
    rows, info = bench.run(configs=configs, systems=("fastbptt",), quick=True, progress=False)
    assert len(gemm_slices) == 4
    rate = {name: 2 * 2048 ** 3 / t / 1e9 for name, t in zip(configs, spell)}
    for r in rows:
        assert r.gemm_gflops == pytest.approx(rate[r.config])
        assert r.pct_gemm == pytest.approx(100 * r.gflops / rate[r.config])
    assert info["gemm_best_gflops"] == pytest.approx(rate["d2l-concise"])
    assert rate["latency"] < info["gemm_gflops"] < rate["d2l-concise"]


def test_bench_cli_writes_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "b"
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--quick", "--configs", "latency", "--peers", "numpy",
                  "--json", f"{out}.json", "--markdown", f"{out}.md", "--plot", f"{out}.png"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "latency" in text and "GEMM" in text
    result = json.loads((tmp_path / "b.json").read_text())
    rows = {r["system"]: r for r in result["rows"]}
    assert rows["fastbptt"]["status"] == "ok" and rows["fastbptt"]["median_ms"] > 0
    assert rows["numpy"]["status"] == "ok"
    assert rows["numpy"]["speedup"] == pytest.approx(rows["numpy"]["median_ms"] / rows["fastbptt"]["median_ms"])
    assert result["machine"]["gemm_gflops"] > 0
    assert "| latency | fastbptt |" in (tmp_path / "b.md").read_text()
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_bench_cli_writes_strict_json_when_a_peer_is_skipped(tmp_path, capsys, monkeypatch):
    # a skipped peer has no time: null, not NaN (which strict JSON parsers reject)
    def missing(*a, **k):
        raise ImportError("No module named 'jax'")
    monkeypatch.setitem(bench.MAKERS, "jax", missing)
    out = tmp_path / "b.json"
    monkeypatch.setattr(bench, "peer_names", lambda names, cell: ("numpy", "jax"))
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--quick", "--configs", "latency", "--json", str(out)])
    assert e.value.code == 0
    capsys.readouterr()

    def no_constants(name):
        raise ValueError(f"{name} in the JSON")
    rows = {r["system"]: r for r in json.loads(out.read_text(), parse_constant=no_constants)["rows"]}
    assert rows["jax"]["status"].startswith("skipped") and rows["jax"]["median_ms"] is None
    assert rows["numpy"]["median_ms"] > 0


def test_bench_refuses_a_sweep_figure_that_is_another_output(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--sweep", "--plot", str(tmp_path / "out.png"), "--json", str(tmp_path / "out-sweep.png")])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("fastbptt bench: error: --json: ")


def test_bench_cli_parses_cell(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["bench"])
    assert args.cell == "rnn" and args.configs is None and args.peers is None
    args = parser.parse_args(["bench", "--cell", "gru", "--configs", "wide", "d2l", "--peers", "torch"])
    assert (args.cell, args.configs, args.peers) == ("gru", ["wide", "d2l"], ["torch"])
    assert bench.peer_names(["torch", "jax"], "rnn") == ("torch-rnn", "jax")
    assert bench.peer_names(["torch-rnn"], "lstm") == ("torch",)
    assert bench.peer_names(None, "gru") == ("numpy", "torch", "torch-scratch", "jax")
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["bench", "--cell", "elman"])
    assert e.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:                    # an rnn config with a gated cell: before any run
        cli.main(["bench", "--cell", "lstm", "--configs", "latency"])
    assert e.value.code == 2 and "--cell lstm" in capsys.readouterr().err
