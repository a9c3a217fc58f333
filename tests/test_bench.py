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


def test_every_timed_slice_starts_after_the_pause(monkeypatch):
    # the previous system's thread pool goes idle before the next system is timed
    events = []
    monkeypatch.setattr(bench.time, "sleep", lambda s: events.append(("pause", s)))
    monkeypatch.setattr(bench, "time_call", lambda fn, n, s: events.append(("slice", fn)) or np.array([1e-3]))
    monkeypatch.setattr(bench, "gemm_rate", lambda runs: 100.0)
    rows, _ = bench.run(configs=["latency"], systems=("fastbptt", "numpy"), progress=False)
    assert [r.status for r in rows] == ["ok", "ok"]
    assert len(events) == 2 * 2 * bench.ROUNDS
    assert events[0::2] == [("pause", bench.PAUSE)] * (2 * bench.ROUNDS)
    assert all(kind == "slice" for kind, _ in events[1::2])


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
