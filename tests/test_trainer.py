"""The trainer, checkpoints, generation and the command line, on small fast settings."""
import json
import math

import numpy as np
import pytest

import fastbptt
from fastbptt import api, cli, trainer
from fastbptt.data import Vocab

SMALL = dict(max_chars=4000, hidden=32, num_steps=10, batch_size=8, quiet=True)


def run_cli(*argv):
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    return e.value.code


def test_clip_gradients_global_norm_excludes_h0():
    g = {"W_hh": np.full((2, 2), 3.0, np.float32), "b_h": np.full(2, 4.0, np.float32),
         "h0": np.full((1, 2), 100.0, np.float32)}
    norm = trainer.clip_gradients(g, 1.0)
    assert norm == pytest.approx(math.sqrt(4 * 9 + 2 * 16))
    assert math.sqrt((g["W_hh"] ** 2).sum() + (g["b_h"] ** 2).sum()) == pytest.approx(1.0, rel=1e-6)
    assert np.all(g["h0"] == 100.0)
    small = {"W_hh": np.full((2, 2), 0.1, np.float32)}
    assert trainer.clip_gradients(small, 1.0) == pytest.approx(0.2)
    assert np.all(small["W_hh"] == np.float32(0.1))


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_state_is_carried_only_by_the_sequential_sampler(sampling, monkeypatch):
    seen = []
    real = api.loss_and_grad

    def spy(params, X, Y, h0=None, **kw):
        out = real(params, X, Y, h0, **kw)
        seen.append((None if h0 is None else h0.copy(), out[2].copy()))
        return out

    monkeypatch.setattr(api, "loss_and_grad", spy)
    fastbptt.train(**SMALL, epochs=2, sampling=sampling, sample_prefixes=())
    per_epoch = len(seen) // 2
    for i, (h0, _) in enumerate(seen):
        if sampling == "random" or i % per_epoch == 0:
            assert h0 is None                           # reset: epoch start, or every minibatch
        else:
            np.testing.assert_array_equal(h0, seen[i - 1][1])   # carried h_T, as a plain array


def test_short_training_beats_the_unigram_baseline(tmp_path):
    log = tmp_path / "log.jsonl"
    res = fastbptt.train(max_chars=20000, hidden=64, num_steps=20, batch_size=16, epochs=6,
                         optimizer="adam", lr=0.01, val_fraction=0.1, quiet=True, json_log=log,
                         plot=tmp_path / "ppl.png")
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 7))
    assert set(rows[0]) == set(trainer.LOG_KEYS)
    assert rows[-1]["train_ppl"] < 17.2 and rows[-1]["val_ppl"] < 17.2      # unigram: 17.21
    assert rows[-1]["train_ppl"] < rows[0]["train_ppl"]
    assert all(0 <= r["clipped_frac"] <= 1 and r["tokens_per_s"] > 0 for r in rows)
    assert (tmp_path / "ppl.png").stat().st_size > 1000
    assert set(res.params) == {"W_xh", "W_hh", "b_h", "W_hq", "b_q"} and len(res.vocab) == 28
    assert res.generated["time traveller"].startswith("time traveller")


@pytest.mark.parametrize("opts", [dict(), dict(optimizer="adam", lr=0.01, sampling="random",
                                               truncation="random:0.5"),
                                  dict(truncation="k:3", val_fraction=0.2)])
def test_resume_is_exact(tmp_path, opts):
    ck = tmp_path / "ck.npz"
    straight = fastbptt.train(**SMALL, **opts, epochs=4, sample_prefixes=())
    fastbptt.train(**SMALL, **opts, epochs=2, checkpoint=ck, sample_prefixes=())
    resumed = fastbptt.train(**SMALL, **opts, epochs=4, checkpoint=ck, resume=True, sample_prefixes=())
    key = ("epoch", "train_ppl", "val_ppl", "grad_norm", "clipped_frac")
    assert [[r[k] for k in key] for r in resumed.history] == [[r[k] for k in key] for r in straight.history]
    for k in straight.params:
        np.testing.assert_array_equal(resumed.params[k], straight.params[k])


def test_resume_conflicts_and_bad_checkpoints(tmp_path):
    ck = tmp_path / "ck.npz"
    fastbptt.train(**SMALL, epochs=1, checkpoint=ck, sample_prefixes=())
    with pytest.raises(ValueError, match="--hidden 16.*checkpoint: 32"):
        fastbptt.train(**dict(SMALL, hidden=16), epochs=2, checkpoint=ck, resume=True)
    with pytest.raises(ValueError, match="--resume: needs --checkpoint"):
        fastbptt.train(**SMALL, resume=True)
    good = ck.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        trainer.load_checkpoint(cut)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a fastbptt checkpoint"):
        trainer.load_checkpoint(other)
    junk = tmp_path / "junk.npz"
    junk.write_text("hello")
    with pytest.raises(ValueError, match="checkpoint"):
        trainer.load_checkpoint(junk)
    assert ck.read_bytes() == good


def test_divergence_stops_keeps_the_checkpoint_and_exits_3(tmp_path, capsys):
    ck = tmp_path / "ck.npz"
    assert run_cli("train", "--max-chars", 4000, "--hidden", 32, "--num-steps", 10, "--batch-size", 8,
                   "--epochs", 1, "--checkpoint", ck, "--quiet") == 0
    before = ck.read_bytes()
    code = run_cli("train", "--max-chars", 4000, "--hidden", 32, "--num-steps", 10, "--batch-size", 8,
                   "--epochs", 30, "--lr", 1e30, "--clip", "inf", "--checkpoint", ck, "--quiet")
    err = capsys.readouterr().err
    assert code == 3 and "lower --lr" in err and "epoch" in err
    assert ck.read_bytes() == before


@pytest.mark.parametrize("argv", [
    ["--text", "/no/such/file"], ["--hidden", "0"], ["--lr", "-1"], ["--clip", "0"], ["--epochs", "0"],
    ["--truncation", "k:0"], ["--truncation", "rand:0.5"], ["--truncation", "random:1.5"],
    ["--resume"], ["--num-steps", "500", "--batch-size", "500"], ["--batch-size", "-3"], ["--seed", "-1"],
    ["--val-fraction", "1.5"], ["--max-minutes", "0"], ["--checkpoint-every", "0"],
])
def test_cli_bad_input_exits_2_with_one_line(argv, capsys):
    assert run_cli("train", "--max-chars", 4000, "--quiet", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastbptt train: error:") and "\n" not in err and "Traceback" not in err


def test_cli_short_text_and_binary_text(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    assert run_cli("train", "--text", short, "--quiet") == 2
    assert "fewer than one minibatch" in capsys.readouterr().err
    binary = tmp_path / "b.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    assert run_cli("train", "--text", binary, "--quiet") == 2


def test_cli_train_then_generate(tmp_path, capsys):
    ck = tmp_path / "ck.npz"
    assert run_cli("train", "--max-chars", 4000, "--hidden", 32, "--num-steps", 10, "--batch-size", 8,
                   "--epochs", 2, "--checkpoint", ck, "--quiet") == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "tokens/s" in out and "time traveller" in out
    assert run_cli("generate", "--checkpoint", ck, "--prefix", "the time", "--length", 20) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("the time") and len(text) == len("the time") + 20
    assert run_cli("generate", "--checkpoint", tmp_path / "missing.npz") == 2


def test_generate_greedy_sampled_and_unknown_prefix():
    params = api.init_params(5, 8, 5, seed=0)
    params = {k: v * 300 for k, v in params.items()}
    vocab = Vocab(idx_to_token=["<unk>", " ", "a", "b", "c"])
    greedy = fastbptt.generate(params, vocab, "ab", 30)
    assert greedy == fastbptt.generate(params, vocab, "ab", 30) and len(greedy.replace("<unk>", "?")) == 32
    s1 = fastbptt.generate(params, vocab, "ab", 30, temperature=1.0, seed=5)
    assert s1 == fastbptt.generate(params, vocab, "ab", 30, temperature=1.0, seed=5)
    assert s1 != fastbptt.generate(params, vocab, "ab", 30, temperature=1.0, seed=6)
    with pytest.warns(UserWarning, match="'z'"):
        out = fastbptt.generate(params, vocab, "az", 3)
    assert out.startswith("az")
    with pytest.raises(ValueError, match="--length"):
        fastbptt.generate(params, vocab, "ab", -1)


def test_ctrl_c_saves_the_last_epoch_exits_130_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    ck = tmp_path / "ck.npz"
    argv = ["train", "--max-chars", 4000, "--hidden", 32, "--num-steps", 10, "--batch-size", 8,
            "--checkpoint", ck, "--checkpoint-every", 2, "--quiet"]
    straight = fastbptt.train(**SMALL, epochs=4, sample_prefixes=())
    calls = {"n": 0}
    real = api.loss_and_grad
    per_epoch = straight.history[0]["tokens"] // (10 * 8)       # minibatches per epoch

    def interrupt_in_epoch_4(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3 * per_epoch + 1:               # a step inside epoch 4
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(api, "loss_and_grad", interrupt_in_epoch_4)
    assert run_cli(*argv, "--epochs", 6) == 130
    err = capsys.readouterr().err
    assert "interrupted after epoch 3" in err and "--resume" in err
    monkeypatch.setattr(api, "loss_and_grad", real)
    _, _, meta = trainer.load_checkpoint(ck)
    assert meta["epoch"] == 3                           # the snapshot of epoch 3, not half of epoch 4
    resumed = fastbptt.train(**SMALL, epochs=4, checkpoint=ck, resume=True, sample_prefixes=())
    assert [r["train_ppl"] for r in resumed.history] == [r["train_ppl"] for r in straight.history]


def test_max_minutes_stops_at_an_epoch_end(tmp_path):
    res = fastbptt.train(**SMALL, epochs=50, max_minutes=1e-6, sample_prefixes=())
    assert res.stopped == "max-minutes" and len(res.history) == 1


def test_adam_matches_the_textbook_update():
    rng = np.random.default_rng(0)
    p = {"W": rng.normal(size=(3, 4))}
    want = p["W"].copy()
    opt = trainer.Adam(p, 0.01)
    m, v = np.zeros((3, 4)), np.zeros((3, 4))
    for t in range(1, 6):
        g = rng.normal(size=(3, 4))
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        want -= 0.01 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        opt.step(p, {"W": g.copy()})
    np.testing.assert_allclose(p["W"], want, rtol=1e-12, atol=1e-14)
