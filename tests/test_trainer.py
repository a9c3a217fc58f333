"""The trainer, checkpoints, generation and the command line, on small fast settings."""
import errno
import importlib.util
import json
import math
import os
import sys
import time
import types
import warnings

import numpy as np
import pytest

import fastbptt
from fastbptt import api, cli, data, trainer
from fastbptt.data import Vocab

SMALL = dict(max_chars=4000, hidden=32, num_steps=10, batch_size=8, quiet=True)
TINY = dict(max_chars=2000, hidden=8, num_steps=8, batch_size=4, quiet=True, sample_prefixes=())
#: the models beyond the book's one rnn layer
MODELS = [("rnn", 2), ("gru", 1), ("lstm", 1), ("lstm", 2)]


def run_cli(*argv):
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    return e.value.code


def one_epoch_checkpoint(tmp_path, capsys):
    """(the path, the bytes) of a checkpoint after one epoch of the tiny run, its output read"""
    ck = tmp_path / "ck.npz"
    assert run_cli(*TINY_ARGV, "--epochs", 1, "--checkpoint", ck) == 0
    capsys.readouterr()
    return ck, ck.read_bytes()


def cli_error(capsys, command):
    """The one line ``fastbptt COMMAND: error: …`` on stderr, without that prefix."""
    err = capsys.readouterr().err.strip()
    head = f"fastbptt {command}: error: "
    assert err.startswith(head) and "\n" not in err and "Traceback" not in err, err
    return err[len(head):]


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
    # finite gradients whose float32 sum of squares overflows: the true norm, clipped to theta
    huge = {"W_hh": np.full((2, 2), 3e19, np.float32), "b_h": np.full(2, -4e19, np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer.clip_gradients(huge, 1.0) == pytest.approx(math.sqrt(4 * 9e38 + 2 * 16e38), rel=1e-6)
    assert math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in huge.values())) == \
        pytest.approx(1.0, rel=1e-6)


def state_arrays(state):
    """Copies of the arrays of a state as loss_and_grad takes and returns it: None → (),
    an array → (h,), the LSTM's (h, c) → (h, c)."""
    if state is None:
        return ()
    return tuple(a.copy() for a in (state if isinstance(state, tuple) else (state,)))


@pytest.mark.parametrize("cell, layers", [("rnn", 1), ("lstm", 2)])
@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_state_is_carried_only_by_the_sequential_sampler(sampling, cell, layers, monkeypatch):
    seen = []
    real = api.loss_and_grad

    def spy(params, X, Y, h0=None, **kw):
        out = real(params, X, Y, h0, **kw)
        seen.append((state_arrays(h0), state_arrays(out[2])))
        return out

    monkeypatch.setattr(api, "loss_and_grad", spy)
    fastbptt.train(**SMALL, cell=cell, num_layers=layers, epochs=2, sampling=sampling, sample_prefixes=())
    per_epoch = len(seen) // 2
    B, H = SMALL["batch_size"], SMALL["hidden"]
    want = [(layers, B, H)] * 2 if cell == "lstm" else [(B, H)]     # the LSTM: (h, c) of every layer
    for i, (h0, h_T) in enumerate(seen):
        assert [a.shape for a in h_T] == want
        if sampling == "random" or i % per_epoch == 0:
            assert h0 == ()                             # reset: epoch start, or every minibatch
        else:                                           # carried h_T (and c_T), as plain arrays
            assert len(h0) == len(h_T)
            for a, b in zip(h0, seen[i - 1][1]):
                np.testing.assert_array_equal(a, b)


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
    with pytest.raises(ValueError, match=r"^resume: options conflict .*: hidden=16 \(checkpoint: 32\)$"):
        fastbptt.train(**dict(SMALL, hidden=16), epochs=2, checkpoint=ck, resume=True)
    with pytest.raises(ValueError, match="^resume: needs checkpoint=PATH"):
        fastbptt.train(**SMALL, resume=True)
    missing = tmp_path / "missing.npz"
    with pytest.raises(ValueError) as e:                 # train() names its own parameter
        fastbptt.train(**SMALL, checkpoint=missing, resume=True)
    assert str(e.value) == f"checkpoint: no such file: {missing}"
    with pytest.raises(ValueError) as e:                 # load_checkpoint names its own
        trainer.load_checkpoint(missing)
    assert str(e.value) == f"path: no such file: {missing}"
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
    with pytest.raises(ValueError, match=r"is not a fastbptt checkpoint \(not an .npz archive\)$"):
        trainer.load_checkpoint(junk)                    # (not numpy's advice on pickles)
    with pytest.raises(ValueError, match="is a folder, not a file"):
        trainer.load_checkpoint(tmp_path)
    assert ck.read_bytes() == good


@pytest.mark.parametrize("cell, layers", MODELS)
def test_every_cell_checkpoints_its_cell_and_depth_and_resumes_exactly(tmp_path, cell, layers):
    ck = tmp_path / "ck.npz"
    model = dict(cell=cell, num_layers=layers)
    straight = fastbptt.train(**TINY, **model, epochs=3)
    fastbptt.train(**TINY, **model, epochs=1, checkpoint=ck)
    params, _, meta = trainer.load_checkpoint(ck)
    assert (meta["config"].cell, meta["config"].num_layers) == (cell, layers)
    V = len(meta["vocab"])
    assert set(params) == set(api.init_params(V, 8, V, cell=cell, num_layers=layers))
    assert fastbptt.cell_of(params) == (cell, layers)
    resumed = fastbptt.train(**TINY, epochs=3, checkpoint=ck, resume=True)   # cell, depth: the checkpoint's
    assert (resumed.config.cell, resumed.config.num_layers) == (cell, layers)
    assert [r["train_ppl"] for r in resumed.history] == [r["train_ppl"] for r in straight.history]
    for k in straight.params:
        np.testing.assert_array_equal(resumed.params[k], straight.params[k])
    other = dict(cell="rnn", num_layers=layers) if cell != "rnn" else dict(cell="gru", num_layers=layers)
    with pytest.raises(ValueError, match=rf"^resume: options conflict .*: cell='{other['cell']}' "
                                         rf"\(checkpoint: '{cell}'\)$"):
        fastbptt.train(**TINY, **other, epochs=3, checkpoint=ck, resume=True)
    with pytest.raises(ValueError, match=rf"num_layers={layers + 1} \(checkpoint: {layers}\)$"):
        fastbptt.train(**TINY, num_layers=layers + 1, epochs=3, checkpoint=ck, resume=True)


def test_a_checkpoint_without_cell_and_depth_reads_as_one_rnn_layer(tmp_path):
    """Checkpoints written before cells and stacks existed have neither field."""
    ck = tmp_path / "ck.npz"
    straight = fastbptt.train(**TINY, epochs=2)
    fastbptt.train(**TINY, epochs=1, checkpoint=ck)
    with np.load(ck) as z:
        arrays = dict(z)
    meta = json.loads(str(arrays["meta"]))
    assert (meta["config"].pop("cell"), meta["config"].pop("num_layers")) == ("rnn", 1)
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(ck, **arrays)
    _, _, meta = trainer.load_checkpoint(ck)
    assert (meta["config"].cell, meta["config"].num_layers) == ("rnn", 1)
    resumed = fastbptt.train(**TINY, epochs=2, checkpoint=ck, resume=True)
    assert [r["train_ppl"] for r in resumed.history] == [r["train_ppl"] for r in straight.history]


def test_init_is_the_cells_default_or_given_and_checkpointed(tmp_path):
    assert trainer.TrainConfig().resolved().init == "normal"
    assert trainer.TrainConfig(cell="lstm").resolved().init == "uniform"
    assert trainer.TrainConfig(cell="gru", init="normal").resolved().init == "normal"
    with pytest.raises(ValueError, match="^init: expected one of 'normal', 'uniform' or None, got 'he'$"):
        trainer.TrainConfig(init="he").resolved()
    ck = tmp_path / "ck.npz"
    r = fastbptt.train(**TINY, cell="gru", init="normal", epochs=1, checkpoint=ck)
    assert trainer.load_checkpoint(ck)[2]["config"].init == "normal" and r.config.init == "normal"
    u = fastbptt.train(**TINY, cell="gru", epochs=1)
    assert u.config.init == "uniform" and u.history[0]["train_ppl"] != r.history[0]["train_ppl"]
    with np.load(ck) as z:                       # a checkpoint from before init: it resumes
        arrays = dict(z)
    meta = json.loads(str(arrays["meta"]))
    assert meta["config"].pop("init") == "normal"
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(ck, **arrays)
    assert trainer.load_checkpoint(ck)[2]["config"].init is None
    resumed = fastbptt.train(**TINY, epochs=2, checkpoint=ck, resume=True)
    assert resumed.config.cell == "gru" and len(resumed.history) == 2


def test_a_checkpoint_whose_params_are_not_its_cell_is_corrupt(tmp_path):
    ck = tmp_path / "ck.npz"
    vocab = Vocab(idx_to_token=["<unk>", "a", "b"])
    params = api.init_params(3, 8, 3, seed=0)                # an rnn's
    state = np.random.default_rng(0).bit_generator.state
    for cfg in (trainer.TrainConfig(hidden=8, cell="gru"), trainer.TrainConfig(hidden=8, num_layers=2)):
        trainer.save_checkpoint(ck, params, {}, vocab, cfg, state, 0, [], "0" * 64)
        with pytest.raises(ValueError, match="truncated or corrupt .*do not match its vocabulary, hidden, "
                                             "cell and num_layers"):
            trainer.load_checkpoint(ck)


def test_a_checkpoint_whose_optimizer_state_or_meta_is_broken_is_corrupt(tmp_path):
    # each is found by load_checkpoint, before any work, not in the middle of the resume
    ck = tmp_path / "ck.npz"
    vocab = Vocab(idx_to_token=["<unk>", "a", "b"])
    params = api.init_params(3, 8, 3, seed=0)
    cfg = trainer.TrainConfig(hidden=8, optimizer="adam")
    adam = trainer.Adam(params, 0.1).state()
    state = np.random.default_rng(0).bit_generator.state
    trainer.save_checkpoint(ck, params, adam, vocab, cfg, state, 1, [{"epoch": 1, "elapsed_s": 0.5}], "0" * 64)
    assert set(trainer.load_checkpoint(ck)[1]) == set(adam)
    broken = [dict(opt={k: v for k, v in adam.items() if k != "m/W_xh"}),
              dict(opt={}),
              dict(cfg=trainer.TrainConfig(hidden=8)),           # an sgd checkpoint holding adam's state
              dict(rng={"bit_generator": "MT19937"}),
              dict(epoch="1"),
              dict(history=["row"])]
    for change in broken:
        args = {**dict(opt=adam, cfg=cfg, rng=state, epoch=1, history=[{"epoch": 1, "elapsed_s": 0.5}]), **change}
        trainer.save_checkpoint(ck, params, args["opt"], vocab, args["cfg"], args["rng"], args["epoch"],
                                args["history"], "0" * 64)
        with pytest.raises(ValueError, match="truncated or corrupt"):
            trainer.load_checkpoint(ck)


def test_numpy_scalars_prefixes_and_paths_of_any_folder(tmp_path, monkeypatch):
    # numpy scalars are options like Python's (the checkpoint's JSON takes them); no prefixes,
    # or one string; a relative --text is stored absolute, so a resume from elsewhere finds it
    text = tmp_path / "one.txt"
    text.write_text("the time machine by h g wells " * 40)
    monkeypatch.chdir(tmp_path)
    ck = tmp_path / "ck.npz"
    r = fastbptt.train(**dict(TINY, sample_prefixes=None, hidden=np.int32(8)), text="one.txt", epochs=1,
                       checkpoint=ck, seed=np.int64(3), lr=np.float32(0.5), val_fraction=np.float32(0.1))
    assert r.generated == {} and type(r.config.seed) is int and type(r.config.hidden) is int
    assert r.config.text == str(text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resumed = fastbptt.train(**TINY, epochs=2, checkpoint=ck, resume=True)
    assert len(resumed.history) == 2
    resumed = fastbptt.train(**TINY, text=text, epochs=3, checkpoint=ck, resume=True)   # the same file, as given
    assert len(resumed.history) == 3
    assert set(fastbptt.train(**dict(TINY, sample_prefixes="th"), text=text, epochs=1).generated) == {"th"}
    for bad, exc, message in ((dict(text=123), TypeError, "text: expected a path or None, got int"),
                              (dict(checkpoint=123), TypeError, "checkpoint: expected a path, got int"),
                              (dict(json_log=b"x"), TypeError, "json_log: expected a path, got bytes"),
                              (dict(val_fraction="0.1"), ValueError, "val_fraction: expected a number in [0, 1), "
                                                                     "got '0.1'"),
                              (dict(sample_prefixes=[1]), ValueError, "sample_prefixes: expected non-empty strings")):
        with pytest.raises(exc) as e:
            fastbptt.train(**dict(TINY, **bad), epochs=1)
        assert str(e.value).startswith(message)


@pytest.mark.parametrize("cell, layers", [("rnn", 1)] + MODELS)
def test_param_shapes_are_those_of_init_params(cell, layers):
    params = api.init_params(5, 3, 5, cell=cell, num_layers=layers)
    assert trainer.param_shapes(cell, layers, 5, 3) == {k: v.shape for k, v in params.items()}


def test_divergence_stops_keeps_the_checkpoint_and_exits_3(tmp_path, capsys):
    ck = tmp_path / "ck.npz"
    assert run_cli("train", "--max-chars", 4000, "--hidden", 32, "--num-steps", 10, "--batch-size", 8,
                   "--epochs", 1, "--checkpoint", ck, "--quiet") == 0
    before = ck.read_bytes()
    code = run_cli("train", "--max-chars", 4000, "--hidden", 32, "--num-steps", 10, "--batch-size", 8,
                   "--epochs", 30, "--lr", 1e30, "--clip", "inf", "--checkpoint", ck, "--overwrite", "--quiet")
    err = capsys.readouterr().err
    assert code == 3 and "lower --lr" in err and "epoch" in err
    assert ck.read_bytes() == before


@pytest.mark.parametrize("argv, flag", [(["--overwrite"], "--overwrite"),
                                        (["--checkpoint-every", 3], "--checkpoint-every")])
def test_a_checkpoints_option_without_checkpoint_warns(argv, flag):
    with pytest.warns(RuntimeWarning, match=f"^{flag}: applies to the checkpoint, and none is written"):
        assert run_cli(*TINY_ARGV, "--epochs", 1, *argv) == 0


def test_a_diverging_train_call_names_the_configs_fields_not_the_flags():
    # trainer.train from Python: its message speaks of its own arguments (the CLI's, of --lr)
    with pytest.raises(trainer.TrainingDiverged) as got:
        trainer.train(**dict(TINY, epochs=5), lr=1e30, clip=math.inf)
    msg = str(got.value)
    assert "lower lr (now 1e+30)" in msg and "(clip, now inf)" in msg and "--" not in msg


@pytest.mark.parametrize("argv, flag", [
    (["--text", "/no/such/file"], "--text"), (["--hidden", "0"], "--hidden"), (["--lr", "-1"], "--lr"),
    (["--clip", "0"], "--clip"), (["--epochs", "0"], "--epochs"), (["--truncation", "k:0"], "--truncation"),
    (["--truncation", "rand:0.5"], "--truncation"), (["--truncation", "random:1.5"], "--truncation"),
    (["--resume"], "--resume"), (["--num-steps", "500", "--batch-size", "500"], "--max-chars"),
    (["--batch-size", "-3"], "--batch-size"), (["--seed", "-1"], "--seed"),
    (["--val-fraction", "1.5"], "--val-fraction"), (["--max-minutes", "0"], "--max-minutes"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--resume", "--checkpoint", "/no/such/ck.npz"], "--checkpoint"),
    (["--cell", "cnn"], "--cell"), (["--num-layers", "0"], "--num-layers"), (["--num-layers", "-2"], "--num-layers"),
    (["--cell", "gru", "--activation", "relu"], "--activation"),
])
def test_cli_bad_input_exits_2_with_one_line_naming_the_flag(argv, flag, capsys):
    assert run_cli("train", "--max-chars", 4000, "--quiet", *argv) == 2
    assert cli_error(capsys, "train").startswith(f"{flag}: ")


@pytest.mark.parametrize("options, message", [
    (dict(hidden=0), "hidden: expected a positive integer, got 0"),
    (dict(num_steps=0), "num_steps: expected a positive integer, got 0"),
    (dict(batch_size=-3), "batch_size: expected a positive integer, got -3"),
    (dict(lr=-1.0), "lr: expected a positive number, got -1.0"),
    (dict(seed=-1), "seed: expected a non-negative integer, got -1"),
    (dict(val_fraction=1.5), "val_fraction: expected a number in [0, 1), got 1.5"),
    (dict(tokenize="words"), "tokenize: expected one of book, chars, got 'words'"),
    (dict(truncation="rand:0.5"), "truncation: expected full, k:N (N >= 1) or random:P (0 < P <= 1), "
                                  "got 'rand:0.5'"),
    (dict(max_minutes=0), "max_minutes: expected a positive number, got 0"),
    (dict(checkpoint_every=0), "checkpoint_every: expected a positive integer, got 0"),
    (dict(text="/no/such/file"), "text: no such file: /no/such/file"),
    (dict(text=""), "text: an empty path names no file"),
    (dict(cell="cnn"), "cell: expected one of rnn, gru, lstm, got 'cnn'"),
    (dict(num_layers=0), "num_layers: expected a positive integer, got 0"),
    (dict(num_layers=1.5), "num_layers: expected a positive integer, got 1.5"),
    (dict(cell="lstm", activation="relu"), "activation: applies to the rnn cell only, got 'relu' with cell "
                                           "'lstm' (its nonlinearities are fixed)"),
])
def test_train_errors_name_its_parameters_not_flags(options, message):
    with pytest.raises(ValueError) as e:
        fastbptt.train(**{**SMALL, **options})
    assert str(e.value) == message


def test_train_too_short_a_text_names_max_chars_or_text(tmp_path, capsys):
    with pytest.raises(ValueError) as e:
        fastbptt.train(**{**SMALL, "num_steps": 500, "batch_size": 500})
    assert str(e.value).startswith("max_chars: the training split has 4000 tokens, fewer than one minibatch "
                                   "(num_steps·batch_size + 1 = 250001)")
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    assert run_cli("train", "--text", short, "--quiet") == 2
    err = cli_error(capsys, "train")
    assert err.startswith("--text: the training split has") and "fewer than one minibatch" in err
    assert run_cli("train", "--max-chars", 50, "--quiet") == 2                  # the flag that cut it short
    assert cli_error(capsys, "train").startswith("--max-chars: the training split has 50 tokens")


def test_missing_text_is_path_in_the_library_and_text_flag_on_the_command_line(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError) as e:
        data.load_text(missing)
    assert str(e.value) == f"path: no such file: {missing}"
    assert run_cli("train", "--text", missing, "--quiet") == 2
    assert cli_error(capsys, "train") == f"--text: no such file: {missing}"
    assert run_cli("diagnose", "--init", "--text", missing, "--quiet") == 2
    assert cli_error(capsys, "diagnose") == f"--text: no such file: {missing}"
    assert run_cli("diagnose", "--checkpoint", tmp_path / "ck.npz", "--quiet") == 2
    assert cli_error(capsys, "diagnose") == f"--checkpoint: no such file: {tmp_path / 'ck.npz'}"


@pytest.mark.parametrize("message, options, want", [
    ("path: no such file: x", {"text", "checkpoint"}, "--text: no such file: x"),
    ("mode: expected one of book, chars, got 'w'", {"tokenize"}, "--tokenize: expected one of book, chars, got 'w'"),
    ("n_tokens: the text has 3 tokens", {"text"}, "--text: the text has 3 tokens"),
    ("num_steps: expected a positive integer, got 0", {"num_steps"}, "--num-steps: expected a positive integer, got 0"),
    ("prefix: expected a non-empty string, got ''", {"prefix"}, "--prefix: expected a non-empty string, got ''"),
    ("path: no such file: x", {"checkpoint"}, "path: no such file: x"),      # no --text: not that flag
    ("hidden: expected a positive integer", {"prefix"}, "hidden: expected a positive integer"),
    ("X: token id 9 out of range", {"text"}, "X: token id 9 out of range"),    # not an option
    ("--scale: expected a positive number", {"scale"}, "--scale: expected a positive number"),  # already a flag
    ("interrupted after epoch 3", {"epochs"}, "interrupted after epoch 3"),
])
def test_flag_message_maps_a_leading_parameter_to_its_flag(message, options, want):
    assert cli.flag_message(message, options) == want


def test_cli_binary_text(tmp_path, capsys):
    binary = tmp_path / "b.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    assert run_cli("train", "--text", binary, "--quiet") == 2
    assert cli_error(capsys, "train") == (f"--text: {binary} looks binary (it contains NUL bytes); "
                                          "give a UTF-8 text file")


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
    assert cli_error(capsys, "generate") == f"--checkpoint: no such file: {tmp_path / 'missing.npz'}"


@pytest.mark.parametrize("cell, layers", MODELS)
def test_cli_train_then_generate_every_cell(tmp_path, capsys, cell, layers):
    ck = tmp_path / "ck.npz"
    assert run_cli("train", "--cell", cell, "--num-layers", layers, "--max-chars", 2000, "--hidden", 8,
                   "--num-steps", 8, "--batch-size", 4, "--epochs", 1, "--checkpoint", ck, "--quiet") == 0
    assert "perplexity" in capsys.readouterr().out
    assert run_cli("train", "--epochs", 2, "--checkpoint", ck, "--resume", "--quiet") == 0
    assert capsys.readouterr().out.startswith("epoch 2: perplexity")
    assert run_cli("train", "--cell", "rnn" if cell != "rnn" else "lstm", "--epochs", 3, "--checkpoint", ck,
                   "--resume", "--quiet") == 2
    assert cli_error(capsys, "train").startswith("--resume: options conflict with the checkpoint's "
                                                 f"configuration: --cell '{'rnn' if cell != 'rnn' else 'lstm'}' "
                                                 f"(checkpoint: '{cell}')")
    assert run_cli("generate", "--checkpoint", ck, "--prefix", "the time", "--length", 20) == 0
    text = capsys.readouterr().out
    assert text.startswith("the time") and len(text) == len("the time") + 20 + 1     # and "\n"
    sampled = []
    for _ in range(2):
        assert run_cli("generate", "--checkpoint", ck, "--temperature", 1, "--seed", 3) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] and sampled[0].startswith("time traveller")


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
    with pytest.raises(ValueError, match=r"^length: expected a non-negative integer, got -1$"):
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


# ------------------------------------------------------------------- faults: one line, an exit code
TINY_ARGV = ("train", "--max-chars", 2000, "--hidden", 8, "--num-steps", 8, "--batch-size", 4, "--quiet")


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a minibatch is trained: the error must come before any work."""
    def fail(*a, **k):
        raise AssertionError("training started")
    monkeypatch.setattr(api, "loss_and_grad", fail)


def one_line(capsys, command="train"):
    """The one line on stderr, ``fastbptt COMMAND: …``, without that prefix."""
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fastbptt {command}: ") and "\n" not in err and "Traceback" not in err, err
    return err[len(f"fastbptt {command}: "):]


def test_version(capsys):
    assert run_cli("--version") == 0
    assert capsys.readouterr().out.strip() == f"fastbptt {fastbptt.__version__}"


@pytest.mark.parametrize("flag", ["--checkpoint", "--json-log", "--plot"])
@pytest.mark.parametrize("where, message", [("nodir/out", "no such folder: {t}/nodir"),
                                            ("afile/out", "{t}/afile is a file, not a folder"),
                                            ("afile/sub/out", "{t}/afile is a file, not a folder"),
                                            (".", "{t}/. is a folder, not a file")])
def test_outputs_that_cannot_be_written_exit_2_before_training(tmp_path, capsys, no_training, flag, where, message):
    (tmp_path / "afile").write_text("")
    target = tmp_path / where if where != "." else f"{tmp_path}/."
    assert run_cli(*TINY_ARGV, flag, target) == 2
    assert one_line(capsys) == f"error: {flag}: " + message.format(t=tmp_path)


@pytest.mark.parametrize("flag", ["--checkpoint", "--json-log", "--plot"])
def test_an_empty_output_path_exits_2_before_training(capsys, no_training, flag):
    assert run_cli(*TINY_ARGV, flag, "") == 2
    assert one_line(capsys) == f"error: {flag}: expected a path, got ''"


def test_a_figure_format_matplotlib_does_not_write_exits_2_before_any_work(tmp_path, capsys, no_training,
                                                                            monkeypatch):
    from fastbptt import bench

    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("work started"))
    for command in (TINY_ARGV, ("bench", "--quick")):
        assert run_cli(*command, "--plot", tmp_path / "p.xyz") == 2
        err = one_line(capsys, command[0])
        assert err.startswith("error: --plot: matplotlib writes no .xyz files (it writes ") and "png" in err
    assert run_cli("bench", "--quick", "--json", "") == 2
    assert one_line(capsys, "bench") == "error: --json: expected a path, got ''"


@pytest.mark.parametrize("argv, line", [
    (("bench", "--peers", "numpyy"), "error: --peers: invalid choice: 'numpyy'"),
    (("bench", "--threads", "abc"), "error: --threads: invalid int value: 'abc'"),
    (("tune", "--batch"), "error: --batch: expected at least one argument"),
    (("train", "--hidden", "x"), "error: --hidden: invalid int value: 'x'"),
])
def test_argument_errors_are_one_line_naming_the_flag(capsys, argv, line):
    assert run_cli(*argv) == 2
    err = one_line(capsys, argv[0])
    assert err.startswith(line) and err.endswith(f"(see fastbptt {argv[0]} --help)"), err


@pytest.mark.parametrize("flag", ["--checkpoint", "--json-log", "--plot"])
def test_a_read_only_folder_exits_2_before_training(tmp_path, capsys, no_training, monkeypatch, flag):
    from fastbptt import _preflight

    def read_only(dir, prefix):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(_preflight.tempfile, "mkstemp", read_only)
    assert run_cli(*TINY_ARGV, flag, tmp_path / "out") == 2
    assert one_line(capsys) == f"error: {flag}: cannot write into {tmp_path} ({os.strerror(errno.EROFS)})"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_folder_without_write_permission_exits_2(tmp_path, capsys, no_training):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert run_cli(*TINY_ARGV, "--checkpoint", ro / "ck.npz") == 2
        assert one_line(capsys).startswith(f"error: --checkpoint: cannot write into {ro} (")
    finally:
        ro.chmod(0o755)


def test_plot_without_matplotlib_exits_2_before_training(tmp_path, capsys, no_training, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib: ImportError
    assert run_cli(*TINY_ARGV, "--plot", tmp_path / "p.png") == 2
    assert one_line(capsys) == "error: --plot: needs matplotlib, which is not installed: pip install fastbptt[plot]"
    with pytest.raises(ImportError, match=r"^plot: needs matplotlib"):       # the library: before training too
        fastbptt.train(**TINY, plot=tmp_path / "p.png")


def test_other_commands_missing_extras_and_outputs_exit_2_before_any_work(tmp_path, capsys, monkeypatch):
    from fastbptt import bench, diagnostics

    def fail(*a, **k):
        raise AssertionError("work started")
    monkeypatch.setattr(bench, "run", fail)
    monkeypatch.setattr(diagnostics, "run", fail)
    monkeypatch.setitem(cli.PEER_MODULES, "jax", ("fastbptt_no_such_module",))
    assert run_cli("bench", "--peers", "numpy", "jax", "--quick") == 2      # asked for: required
    assert one_line(capsys, "bench") == ("error: --peers: fastbptt_no_such_module is not installed: "
                                         "pip install fastbptt[fastbptt_no_such_module]")
    assert run_cli("bench", "--json", tmp_path / "no" / "b.json") == 2
    assert one_line(capsys, "bench") == f"error: --json: no such folder: {tmp_path / 'no'}"
    assert run_cli("bench", "--json", tmp_path / "b.json", "--markdown", tmp_path / "b.json") == 2
    assert one_line(capsys, "bench") == (f"error: --markdown: {tmp_path}/b.json is the same file as another "
                                         f"output of this run ({tmp_path}/b.json)")
    import numba
    for threads in (0, numba.config.NUMBA_NUM_THREADS + 1):
        assert run_cli("bench", "--threads", threads) == 2
        assert one_line(capsys, "bench") == (f"error: --threads: expected 1 to {numba.config.NUMBA_NUM_THREADS} "
                                             f"(numba's thread pool, NUMBA_NUM_THREADS), got {threads}")
    assert run_cli("diagnose", "--init", "--json", tmp_path / "no" / "d.json") == 2
    assert one_line(capsys, "diagnose") == f"error: --json: no such folder: {tmp_path / 'no'}"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert run_cli("bench", "--plot", tmp_path / "b.png") == 2
    assert one_line(capsys, "bench") == ("error: --plot: needs matplotlib, which is not installed: "
                                         "pip install fastbptt[plot]")
    assert run_cli("diagnose", "--init", "--report", tmp_path / "r") == 2
    assert one_line(capsys, "diagnose") == ("error: --report: needs matplotlib, which is not installed: "
                                            "pip install fastbptt[plot]")


def test_by_default_a_missing_peer_is_skipped_not_an_error(monkeypatch):
    monkeypatch.setitem(cli.PEER_MODULES, "jax", ("fastbptt_no_such_module",))
    args = cli.build_parser().parse_args(["bench"])
    cli._bench_needs(args)                                # no --peers: nothing required


@pytest.mark.parametrize("cuda", [None, types.SimpleNamespace(available=lambda: False)])
def test_device_cuda_without_numba_cuda_or_a_gpu_exits_2_before_training(capsys, no_training, monkeypatch, cuda):
    monkeypatch.setitem(sys.modules, "fastbptt._cuda", cuda)     # None: it does not import
    assert run_cli(*TINY_ARGV, "--device", "cuda") == 2
    err = one_line(capsys)
    assert err.startswith("error: --device: cuda needs ")
    if cuda is None or importlib.util.find_spec("numba_cuda") is None:
        assert err.endswith("pip install fastbptt[cuda]")
    else:
        assert err.endswith("a CUDA GPU and its driver, and none was found")
    assert run_cli("bench", "--device", "cuda", "--quick") == 2
    assert one_line(capsys, "bench").startswith("error: --device: cuda needs ")


def test_a_model_larger_than_memory_exits_2_before_training(capsys, no_training, monkeypatch):
    assert run_cli(*TINY_ARGV, "--hidden", 1000000) == 2
    err = one_line(capsys)
    assert err.startswith("error: --hidden: the rnn model of hidden=1000000") and "GiB of memory" in err

    def no_memory(*a, **k):
        raise MemoryError("Unable to allocate 7.28 TiB for an array")
    monkeypatch.setattr(api, "init_params", no_memory)            # the estimate passes, the allocation fails
    assert run_cli(*TINY_ARGV) == 2
    assert one_line(capsys) == ("error: --hidden: not enough memory for the model (rnn, hidden=8, num_layers=1): "
                                "Unable to allocate 7.28 TiB for an array")

    def too_big(*a, **k):                                         # init_params' own word for it
        raise ValueError("hidden_size: 8 (...): 100 parameters cannot be allocated here (MemoryError: ...)")
    monkeypatch.setattr(api, "init_params", too_big)
    assert run_cli(*TINY_ARGV) == 2
    assert one_line(capsys).startswith("error: --hidden: not enough memory for the model (rnn, hidden=8, "
                                       "num_layers=1): hidden_size: 8")


def test_out_of_memory_while_training_exits_2(capsys, monkeypatch):
    def no_memory(*a, **k):
        raise MemoryError("Unable to allocate 2 GiB")
    monkeypatch.setattr(api, "loss_and_grad", no_memory)
    assert run_cli(*TINY_ARGV) == 2
    assert one_line(capsys) == "error: out of memory: Unable to allocate 2 GiB"


def test_an_existing_checkpoint_is_resumed_or_overwritten_never_silently_replaced(tmp_path, capsys, monkeypatch):
    ck, before = one_epoch_checkpoint(tmp_path, capsys)
    with monkeypatch.context() as m:
        m.setattr(api, "loss_and_grad", lambda *a, **k: pytest.fail("training started"))
        assert run_cli(*TINY_ARGV, "--epochs", 2, "--checkpoint", ck) == 2
    assert one_line(capsys) == (f"error: --checkpoint: {ck} exists: continue it with --resume, or start over "
                                "with --overwrite")
    assert ck.read_bytes() == before
    with pytest.raises(ValueError, match="^checkpoint: .* exists"):
        fastbptt.train(**TINY, epochs=2, checkpoint=ck)
    assert run_cli(*TINY_ARGV, "--epochs", 2, "--checkpoint", ck, "--overwrite", "--resume") == 2
    assert one_line(capsys).startswith("error: --overwrite: ")
    assert run_cli(*TINY_ARGV, "--epochs", 2, "--checkpoint", ck, "--overwrite") == 0
    _, _, meta = trainer.load_checkpoint(ck)
    assert meta["epoch"] == 2


def _disk_full_after(monkeypatch, n_ok):
    """np.savez writes ``n_ok`` files, then half a file and fails like a full disk."""
    real, calls = np.savez, {"n": 0}

    def savez(f, **arrays):
        calls["n"] += 1
        if calls["n"] > n_ok:
            f.write(b"PK\x03\x04 half a zip")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(f, **arrays)
    monkeypatch.setattr(np, "savez", savez)


def test_a_full_disk_while_saving_exits_2_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    ck, before = one_epoch_checkpoint(tmp_path, capsys)
    with monkeypatch.context() as m:
        _disk_full_after(m, 0)
        assert run_cli("train", "--epochs", 3, "--checkpoint", ck, "--resume", "--quiet") == 2
    assert one_line(capsys) == (f"error: --checkpoint: could not write {ck} at epoch 2 "
                                f"({os.strerror(errno.ENOSPC)}); the checkpoint of epoch 1 is kept")
    assert ck.read_bytes() == before and os.listdir(tmp_path) == ["ck.npz"]       # no temporary left
    fresh = tmp_path / "fresh.npz"
    with monkeypatch.context() as m:
        _disk_full_after(m, 1)
        assert run_cli(*TINY_ARGV, "--epochs", 3, "--checkpoint", fresh) == 2
    assert one_line(capsys).endswith(f"at epoch 2 ({os.strerror(errno.ENOSPC)}); the checkpoint of epoch 1 is kept")
    assert trainer.load_checkpoint(fresh)[2]["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ck.npz", "fresh.npz"]


def test_a_failing_json_log_write_exits_2(tmp_path, capsys, monkeypatch):
    real, calls = trainer._write_json_log, {"n": 0}

    def write(path, history):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, history)
    monkeypatch.setattr(trainer, "_write_json_log", write)
    log = tmp_path / "log.jsonl"
    assert run_cli(*TINY_ARGV, "--epochs", 3, "--json-log", log) == 2
    assert one_line(capsys) == f"error: --json-log: could not write {log} at epoch 2 ({os.strerror(errno.ENOSPC)})"
    assert len(log.read_text().splitlines()) == 1


def test_the_json_log_and_the_plot_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    # a disk that fills while writing leaves the file of the epochs before as it was
    from pathlib import Path
    log, png = tmp_path / "log.jsonl", tmp_path / "p.png"
    rows = [{k: 1.0 for k in trainer.LOG_KEYS}]
    trainer._write_json_log(log, rows)
    before = log.read_text()
    trainer.plot_history([dict(rows[0], epoch=1)], png)
    before_png = png.read_bytes()

    def half_then_full(self, text, *a, **k):
        with open(self, "w") as f:
            f.write(text[:len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(OSError):
        trainer._write_json_log(log, rows * 3)
    import matplotlib.figure

    def savefig(self, path, **k):
        with open(path, "wb") as f:
            f.write(b"\x89PN")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    with pytest.raises(OSError):
        trainer.plot_history([dict(rows[0], epoch=e) for e in (1, 2)], png)
    assert log.read_text() == before and png.read_bytes() == before_png
    assert sorted(os.listdir(tmp_path)) == ["log.jsonl", "p.png"]


@pytest.mark.parametrize("argv", [("--lr", 1e6), ("--lr", 100, "--clip", "inf", "--hidden", 32),
                                  ("--optimizer", "adam", "--lr", 1e4)])
def test_a_diverging_run_exits_3_with_one_line_and_keeps_the_checkpoint(tmp_path, capsys, argv):
    ck, before = one_epoch_checkpoint(tmp_path, capsys)
    assert run_cli(*TINY_ARGV, "--epochs", 3, "--checkpoint", ck, "--overwrite", *argv) == 3
    err = one_line(capsys)
    assert err.startswith("epoch 1: the perplexity became inf") and "lower --lr" in err, err
    assert ck.read_bytes() == before


def test_perplexity_beyond_the_float_range_is_inf():
    assert trainer.perplexity(2.0) == math.exp(2.0)
    assert trainer.perplexity(710.0) == math.inf and trainer.perplexity(math.inf) == math.inf
    assert math.isnan(trainer.perplexity(math.nan))


def test_divergence_between_checkpoints_saves_the_last_good_epoch(tmp_path, capsys, monkeypatch):
    real, calls = trainer.train_epoch, {"n": 0}

    def diverge_in_epoch_3(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return (math.nan,) + out[1:] if calls["n"] == 3 else out
    monkeypatch.setattr(trainer, "train_epoch", diverge_in_epoch_3)
    ck = tmp_path / "ck.npz"
    assert run_cli(*TINY_ARGV, "--epochs", 6, "--checkpoint", ck, "--checkpoint-every", 5) == 3
    err = one_line(capsys)
    assert err.startswith("epoch 3: the loss became nan") and err.endswith("the checkpoint of epoch 2 is kept")
    assert trainer.load_checkpoint(ck)[2]["epoch"] == 2


@pytest.mark.parametrize("checkpoint", [True, False])
def test_ctrl_c_in_the_first_epoch_says_so(tmp_path, capsys, monkeypatch, checkpoint):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(api, "loss_and_grad", interrupt)
    ck = tmp_path / "ck.npz"
    assert run_cli(*TINY_ARGV, *(("--checkpoint", ck) if checkpoint else ())) == 130
    err = one_line(capsys)
    assert "None" not in err
    if checkpoint:
        assert err == "interrupted in epoch 1, before the first checkpoint: nothing of this run was saved"
        assert not ck.exists()
    else:
        assert err == "interrupted in epoch 1; pass --checkpoint PATH to be able to resume"


def test_max_minutes_stops_within_a_long_epoch(tmp_path):
    """a deadline inside an epoch ends it at the next minibatch: the partial epoch is in the
    history and the params, with no validation and no checkpoint of it"""
    ck, log = tmp_path / "ck.npz", tmp_path / "log.jsonl"
    kw = dict(hidden=8, num_steps=8, batch_size=4, quiet=True, sample_prefixes=(), epochs=3)
    t0 = time.perf_counter()
    r = trainer.train(max_minutes=0.002, checkpoint=str(ck), json_log=str(log), **kw)
    assert time.perf_counter() - t0 < 60
    assert r.stopped == "max-minutes" and len(r.history) == 1
    row = r.history[0]
    assert row["partial"] is True and row["val_ppl"] is None
    assert 0 < row["tokens"] < 0.5 * len(trainer.load_corpus(r.config).train)
    assert not ck.exists()
    assert json.loads(log.read_text().splitlines()[-1])["partial"] is True


@pytest.mark.parametrize("flags, message", [
    (("--json-log", "{text}"), "--json-log: {text} is the same file as an input of this run ({text})"),
    (("--checkpoint", "{text}", "--overwrite"),
     "--checkpoint: {text} is the same file as an input of this run ({text})"),
    (("--checkpoint", "{d}/o.npz", "--json-log", "{d}/./o.npz"),
     "--json-log: {d}/./o.npz is the same file as another output of this run ({d}/o.npz)"),
    (("--json-log", "{d}/fig.png", "--plot", "{d}/fig"),
     "--plot: {d}/fig.png is the same file as another output of this run ({d}/fig.png)")])
def test_an_output_on_the_text_or_on_another_output_exits_2_before_training(tmp_path, capsys, no_training, flags,
                                                                          message):
    text = tmp_path / "corpus.txt"
    text.write_text(fastbptt.data.load_text()[:3000])
    before = text.read_bytes()
    fill = dict(text=text, d=tmp_path)
    assert run_cli(*TINY_ARGV, "--text", text, *(f.format(**fill) for f in flags)) == 2
    assert one_line(capsys) == "error: " + message.format(**fill)
    assert text.read_bytes() == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_checkpoint_that_is_not_a_regular_file_is_never_renamed_over(tmp_path, capsys, no_training):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert run_cli(*TINY_ARGV, "--checkpoint", fifo, "--overwrite") == 2
    assert one_line(capsys) == f"error: --checkpoint: {fifo} is not a regular file"
    assert not fifo.is_file() and fifo.exists()


@pytest.mark.skipif(importlib.util.find_spec("fcntl") is None, reason="needs fcntl's flock")
def test_a_checkpoint_in_use_by_another_trainer_exits_2(tmp_path, capsys):
    """a second trainer on one checkpoint is refused while the first holds it, and runs after"""
    ck = tmp_path / "ck.npz"
    assert run_cli(*TINY_ARGV, "--checkpoint", ck, "--epochs", 1) == 0
    capsys.readouterr()
    with trainer._checkpoint_lock(ck):
        for again in ("--overwrite", "--resume"):
            assert run_cli(*TINY_ARGV, "--checkpoint", ck, "--epochs", 2, again) == 2
            assert one_line(capsys) == (f"error: --checkpoint: {ck} is in use by another fastbptt train "
                                        f"(pid {os.getpid()})")
    assert not (tmp_path / ".ck.npz.lock").exists()
    with trainer._checkpoint_lock(ck):         # free again, and the next holder makes it anew
        assert (tmp_path / ".ck.npz.lock").read_text() == str(os.getpid())


def test_resuming_a_finished_run_says_there_is_nothing_to_do(tmp_path, capsys):
    ck = tmp_path / "ck.npz"
    assert run_cli(*TINY_ARGV, "--epochs", 2, "--checkpoint", ck) == 0
    capsys.readouterr()
    before = ck.read_bytes()
    for epochs in (1, 2):
        assert run_cli("train", "--checkpoint", ck, "--resume", "--epochs", epochs, "--quiet") == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"nothing to do: the checkpoint is already at epoch 2 (--epochs {epochs})"
    assert ck.read_bytes() == before


def test_max_minutes_within_the_first_epoch_says_nothing_was_saved(tmp_path, capsys):
    ck = tmp_path / "ck.npz"
    assert run_cli("train", "--hidden", 8, "--num-steps", 8, "--batch-size", 4, "--quiet", "--epochs", 3,
                   "--max-minutes", 0.002, "--checkpoint", ck) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.endswith(f"(stopped: --max-minutes, within the epoch; no epoch finished: {ck} was not written)")
    assert not ck.exists()


def test_the_books_sample_prefixes_give_way_to_the_texts_opening(tmp_path):
    """the default samples start from "time traveller" where the text's vocabulary has its
    characters, else from the text's first tokens (no warning about a prefix not given)"""
    text = tmp_path / "abc.txt"
    text.write_text("abcab cabba " * 200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = fastbptt.train(**dict(TINY, sample_prefixes=fastbptt.trainer.BOOK_PREFIXES), text=str(text),
                           tokenize="chars", epochs=1)
    assert list(r.generated) == ["abcab cabb"]
    r = fastbptt.train(**dict(TINY, sample_prefixes=fastbptt.trainer.BOOK_PREFIXES), epochs=1)
    assert list(r.generated) == list(fastbptt.trainer.BOOK_PREFIXES)
