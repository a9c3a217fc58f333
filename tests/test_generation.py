"""generate(): errors name its parameters; ``fastbptt generate`` shows them as its flags."""
import subprocess
import sys
import warnings

import numpy as np
import pytest

import fastbptt
from fastbptt import api, cli, trainer
from fastbptt.data import Vocab

TOKENS = ["<unk>", " ", "a", "b", "c"]


@pytest.fixture
def model():
    params = api.init_params(len(TOKENS), 8, len(TOKENS), seed=0)
    return params, Vocab(idx_to_token=TOKENS)


@pytest.fixture
def checkpoint(tmp_path, model):
    """A checkpoint of the untrained ``model``, as ``fastbptt train`` would write it."""
    params, vocab = model
    ck = tmp_path / "ck.npz"
    trainer.save_checkpoint(ck, params, {}, vocab, trainer.TrainConfig(hidden=8),
                            np.random.default_rng(0).bit_generator.state, 0, [], "0" * 64)
    return ck


@pytest.mark.parametrize("args, kwargs, message", [
    (("", 5), {}, "prefix: expected a non-empty string, got ''"),
    ((None, 5), {}, "prefix: expected a non-empty string, got None"),
    (("ab", -1), {}, "length: expected a non-negative integer, got -1"),
    (("ab", 2.5), {}, "length: expected a non-negative integer, got 2.5"),
    (("ab", True), {}, "length: expected a non-negative integer, got True"),
    (("ab", 5), {"temperature": -0.5}, "temperature: expected a number >= 0, got -0.5"),
    (("ab", 5), {"temperature": float("inf")}, "temperature: expected a number >= 0, got inf"),
])
def test_generate_errors_name_the_parameter(model, args, kwargs, message):
    params, vocab = model
    with pytest.raises(ValueError) as e:
        fastbptt.generate(params, vocab, *args, **kwargs)
    assert str(e.value) == message


def test_generate_checks_the_vocab_and_the_head(model):
    params, vocab = model
    for bad in (None, TOKENS):
        with pytest.raises(TypeError, match="vocab: expected a fastbptt Vocab"):
            fastbptt.generate(params, bad, "ab", 2)
    wider = api.init_params(len(TOKENS) + 4, 8, len(TOKENS) + 4, seed=0)          # another vocabulary's
    with pytest.raises(ValueError, match=r"params\['W_hq'\].*expected shapes \(8, 5\)"):
        fastbptt.generate(wider, vocab, "ab", 2)
    with pytest.raises(ValueError, match="params: missing the head's 'W_hq'"):
        fastbptt.generate({k: v for k, v in params.items() if k != "W_hq"}, vocab, "ab", 2)
    with pytest.raises(ValueError, match="non-finite"):
        fastbptt.generate(dict(params, W_hq=np.full_like(params["W_hq"], np.nan)), vocab, "ab", 2)
    # the head is checked as every call checks params: no complex, string or ragged head
    for bad, error, match in ((dict(params, b_q=params["b_q"] + 1e9j), TypeError, r"params\['b_q'\]: expected float"),
                              (dict(params, W_hq=params["W_hq"].astype(str)), TypeError, r"params\['W_hq'\]"),
                              (dict(params, W_hq=[[1.0, 2.0], [3.0]]), TypeError, r"params\['W_hq'\]")):
        with pytest.raises(error, match=match):
            fastbptt.generate(bad, vocab, "ab", 2)
    # finite params whose state overflows (a relu cell) say so, naming params
    big = dict(params, W_hh=np.full_like(params["W_hh"], 1e3), W_xh=np.ones_like(params["W_xh"]))
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match="params: the state overflowed"):
            fastbptt.generate(big, vocab, "ab", 30, activation="relu", temperature=temperature, seed=0)
    # ... but only a state a token is read from: the prefix alone (length 0), or the tokens before
    # the state overflows, are generated
    n = next(n for n in range(1, 30) if not _generates(big, vocab, n))
    assert n > 1 and len(fastbptt.generate(big, vocab, "ab", n - 1, activation="relu")) == 2 + n - 1
    assert fastbptt.generate(big, vocab, "ab" * (n + 1), 0, activation="relu") == "ab" * (n + 1)


def _generates(params, vocab, n):
    try:
        fastbptt.generate(params, vocab, "ab", n, activation="relu")
        return True
    except ValueError:
        return False
    # any real temperature, numpy's too
    assert fastbptt.generate(params, vocab, "ab", 3, temperature=np.float32(0.5), seed=0).startswith("ab")
    # a temperature so small that o / temperature overflows samples the argmax, without warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fastbptt.generate(params, vocab, "ab", 6, temperature=5e-324, seed=0) == \
            fastbptt.generate(params, vocab, "ab", 6)


def test_generate_unknown_prefix_warning_names_the_parameter(model):
    params, vocab = model
    with pytest.warns(UserWarning) as w:
        out = fastbptt.generate(params, vocab, "azy", 2)
    assert [str(x.message) for x in w] == ["prefix: 'y', 'z' not in the vocabulary; read as <unk>"]
    assert out.startswith("azy")


def run_cli(*argv):
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    return e.value.code


@pytest.mark.parametrize("argv, line", [
    (["--prefix", ""], "--prefix: expected a non-empty string, got ''"),
    (["--length", "-1"], "--length: expected a non-negative integer, got -1"),
    (["--temperature", "-0.5"], "--temperature: expected a number >= 0, got -0.5"),
    (["--seed", "-1"], "--seed: expected non-negative integer (got -1)"),
])
def test_cli_generate_errors_name_the_flag_and_exit_2(checkpoint, capsys, argv, line):
    assert run_cli("generate", "--checkpoint", checkpoint, *argv) == 2
    captured = capsys.readouterr()
    assert captured.err == f"fastbptt generate: error: {line}\n" and captured.out == ""


def test_cli_generate_bad_checkpoint_names_the_flag(tmp_path, capsys):
    junk = tmp_path / "junk.npz"
    junk.write_text("hello")
    assert run_cli("generate", "--checkpoint", junk) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastbptt generate: error: --checkpoint: {junk} is ") and err.count("\n") == 1


def test_cli_generate_reads_the_prefix_as_the_checkpoints_tokenizer_read_its_text(checkpoint, capsys):
    # the book's tokenizer: letters lowercased, the rest one space
    assert run_cli("generate", "--checkpoint", checkpoint, "--prefix", "AB, c!", "--length", 3) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("ab c") and len(captured.out.rstrip("\n")) == 4 + 3 and captured.err == ""
    assert run_cli("generate", "--checkpoint", checkpoint, "--prefix", "1, 2!") == 2
    assert capsys.readouterr().err == ("fastbptt generate: error: --prefix: '1, 2!' has no letters, all that the "
                                       "checkpoint's book tokenizer keeps\n")


def test_cli_generate_unknown_prefix_warns_with_the_flag(checkpoint):
    # a subprocess: pytest records warnings itself, so they never reach stderr here
    out = subprocess.run([sys.executable, "-m", "fastbptt", "generate", "--checkpoint", str(checkpoint),
                          "--prefix", "az", "--length", "3"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "fastbptt generate: warning: --prefix: 'z' not in the vocabulary; read as <unk>\n"
    assert out.stdout.startswith("az")


@pytest.mark.parametrize("cell, layers", [("rnn", 1), ("rnn", 2), ("gru", 1), ("gru", 2), ("lstm", 1), ("lstm", 3)])
def test_generate_carries_the_state_of_every_cell_and_layer(cell, layers, rng):
    """Generation, the state carried step by step, equals rerunning the whole sequence at each
    step (sampled at temperature 1, the same draws: greedy soon repeats one token)."""
    vocab = Vocab(idx_to_token=TOKENS)
    shapes = api.init_params(len(TOKENS), 6, len(TOKENS), cell=cell, num_layers=layers)
    params = {k: rng.normal(0, 1.0, v.shape) for k, v in shapes.items()}       # float64, far from 0
    ids, draws = list(vocab.encode(list("ab c"))), np.random.default_rng(7)
    for _ in range(20):
        Hs = api.rnn_forward(params, np.array(ids)[:, None])
        o = Hs[-1, 0] @ params["W_hq"] + params["b_q"]
        p = np.exp(o - o.max())
        ids.append(int(draws.choice(len(p), p=p / p.sum())))
    assert fastbptt.generate(params, vocab, "ab c", 20, temperature=1.0, seed=7) == "ab c" + vocab.decode(ids[4:])
    assert len(set(ids[4:])) > 2


def test_generate_activation_is_the_rnn_cells():
    params = api.init_params(len(TOKENS), 4, len(TOKENS), seed=0, cell="gru")
    with pytest.raises(ValueError) as e:
        fastbptt.generate(params, Vocab(idx_to_token=TOKENS), "ab", 3, activation="relu")
    assert str(e.value) == "activation: applies to the rnn cell only, got 'relu' for a gru"
