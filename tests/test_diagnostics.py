"""fastbptt.diagnostics and `fastbptt diagnose` against direct computations."""
import json
import warnings

import numpy as np
import pytest

import fastbptt
import reference
from fastbptt import api, cli, data, diagnostics, trainer
from helpers import make_case


def random_model(rng, cell, layers, D=4, H=3, Q=5):
    """float64 params of any cell and depth, far enough from 0 that the gates are nonlinear."""
    shapes = api.init_params(D, H, Q, cell=cell, num_layers=layers)
    return {k: rng.normal(0, 0.7, v.shape) for k, v in shapes.items()}


def fd_from_state(params, X, s, fn, h0=None, eps=1e-6):
    """{t: ∂fn(t, h_t)/∂h_s} for t = s..T by central differences of the forward alone (one
    layer): perturb h_s (the LSTM's c_s held fixed) and rerun steps s+1..T.  ``fn`` maps
    (t, h_t (B,H)) to (B,K); the answer is (B,K,H), each row b against its own h_s[b]."""
    T, B, H = X.shape[0], X.shape[1], params["W_hh"].shape[0]
    lstm = api.cell_of(params)[0] == "lstm"
    if s == 0:
        state = h0 if h0 is not None else (np.zeros((B, H)),) * (2 if lstm else 1)
    else:
        state = api.rnn_forward(params, X[:s], h0, return_state=True)[1]
    h, *c = state if isinstance(state, tuple) else (state,)
    out = {}
    for i in range(H):
        vals = []
        for sign in (1, -1):
            hs = h.copy()
            hs[:, i] += sign * eps
            Hs = [hs] + (list(api.rnn_forward(params, X[s:], (hs, *c) if c else hs)) if s < T else [])
            vals.append([fn(s + j, Hs[j]) for j in range(len(Hs))])
        for j, (a, b) in enumerate(zip(*vals)):
            out.setdefault(s + j, np.zeros(a.shape + (H,)))[..., i] = (a - b) / (2 * eps)
    return out


def fd_lag_norms(params, X, Y, h0=None):
    """mean over t and b of ‖∂l_t[b]/∂h_{t−j}[b]‖, l_t[b] the cross-entropy of row b at step t."""
    W_hq, b_q = params["W_hq"], params["b_q"]

    def loss_rows(t, h):
        if t == 0:
            return np.zeros((h.shape[0], 1))
        o = h @ W_hq + b_q
        logp = o - o.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        return -logp[np.arange(h.shape[0]), Y[t - 1]][:, None]

    T = X.shape[0]
    sums, counts = np.zeros(T + 1), np.zeros(T + 1)
    for s in range(T + 1):
        for t, d in fd_from_state(params, X, s, loss_rows, h0).items():
            if t >= 1:
                sums[t - s] += np.linalg.norm(d[:, 0], axis=-1).sum()
                counts[t - s] += X.shape[1]
    return sums / counts


def explicit_lag_norms(params, X, Y, h0, act):
    """‖∂l_t/∂h_{t−j}‖ from explicit H×H Jacobians J_s = diag(φ'(z_s)) W_hhᵀ, float64."""
    x, Z, Hs = reference.forward(params, X, h0, act)
    _, dH, _, _ = reference.head(params, Hs, np.asarray(Y), 1.0)      # per-term direct terms
    W = np.asarray(params["W_hh"], np.float64)
    T, B, H = Hs.shape
    sums, counts = np.zeros(T + 1), np.zeros(T + 1)
    for t in range(T):                     # loss term on h_{t+1} (0-based Hs[t])
        for b in range(B):
            v = dH[t, b]
            sums[0] += np.linalg.norm(v)
            counts[0] += 1
            for j in range(1, t + 2):      # back to h_{t+1-j}, through step t+2-j's Jacobian
                s = t + 1 - j              # 0-based index into Z of that step
                J = reference.dphi(Z[s, b], act)[:, None] * W.T
                v = J.T @ v
                sums[j] += np.linalg.norm(v)
                counts[j] += 1
    return sums / counts


@pytest.mark.parametrize("act", ["tanh", "relu", "identity"])
def test_lag_norms_equal_explicit_jacobian_products(act, rng):
    params, X, Y, h0 = make_case(rng, T=5, B=3, D=4, H=3, Q=5)
    got = diagnostics.lag_norms(params, X, Y, h0, activation=act)
    np.testing.assert_allclose(got, explicit_lag_norms(params, X, Y, h0, act), rtol=1e-9)


@pytest.mark.parametrize("c", [0.5, 1.0, 1.7])
def test_identity_with_scaled_identity_W_hh_scales_as_c_to_the_j(c, rng):
    """W_xh = 0, b_h = 0, h0 = 0 keep every h_t at 0, so ‖∂l_t/∂h_t‖ is the same for all t
    with constant targets; then ∂l_t/∂h_{t−j} = c^j ∂l_t/∂h_t exactly."""
    params, X, _, _ = make_case(rng, T=6, B=2, D=3, H=4, Q=5)
    params.update(W_xh=np.zeros((3, 4)), b_h=np.zeros(4), W_hh=c * np.eye(4))
    Y = np.full((6, 2), 2)
    norms = diagnostics.lag_norms(params, X, Y, None, activation="identity")
    np.testing.assert_allclose(norms, norms[0] * c ** np.arange(7), rtol=1e-12)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_lag_norms_of_every_cell_equal_finite_differences(cell, rng):
    params = random_model(rng, cell, 1)
    X, Y = rng.integers(0, 4, (4, 2)), rng.integers(0, 5, (4, 2))
    np.testing.assert_allclose(diagnostics.lag_norms(params, X, Y), fd_lag_norms(params, X, Y), rtol=1e-6)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_jacobian_products_by_adjoints_equal_finite_differences(cell, rng):
    params = random_model(rng, cell, 1)
    X = rng.integers(0, 4, (4, 3))
    J = diagnostics.jacobian_products_by_adjoints(params, X, row=1)
    assert len(J) == 4
    for j in range(1, 5):                            # ∂h_4/∂h_{4−j} along row 1
        want = fd_from_state(params, X, 4 - j, lambda t, h: h)[4][1]
        np.testing.assert_allclose(J[j - 1], want, rtol=1e-6, atol=1e-9)


def test_jacobian_singular_values_of_the_rnn_by_either_route(rng):
    params, X, _, h0 = make_case(rng, T=5, B=3, D=4, H=3, Q=5)
    explicit = diagnostics.jacobian_product_singular_values(params, X, h0, row=2)
    by_adjoints = diagnostics.jacobian_products_by_adjoints(params, X, h0, row=2)
    for s, J in zip(explicit, by_adjoints, strict=True):
        np.testing.assert_allclose(np.linalg.svd(J, compute_uv=False), s, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_a_stack_is_studied_through_its_top_layer(cell, rng):
    params = random_model(rng, cell, 3)
    X, Y = rng.integers(0, 4, (4, 2)), rng.integers(0, 5, (4, 2))
    h0 = rng.normal(0, 0.5, (3, 2, 3))
    h0 = (h0, rng.normal(0, 0.5, (3, 2, 3))) if cell == "lstm" else h0
    top, X_top, h0_top = diagnostics.top_layer(params, X, h0)
    assert list(top) == list(api.init_params(3, 3, 5, cell=cell))           # a one-layer model on D = H
    for k in top:
        assert top[k] is params[k if k in api.HEAD_KEYS else f"{k}_l2"]
    # the top layer on the lower layers' output reproduces the stack's output and last state
    Hs, state = api.rnn_forward(params, X, h0, return_state=True)
    Hs_top, state_top = api.rnn_forward(top, X_top, h0_top, return_state=True)
    np.testing.assert_allclose(Hs_top, Hs, rtol=1e-12)
    for a, b in zip(state if cell == "lstm" else (state,), state_top if cell == "lstm" else (state_top,)):
        np.testing.assert_allclose(b, a[-1], rtol=1e-12)
    np.testing.assert_allclose(diagnostics.lag_norms(params, X, Y, h0), fd_lag_norms(top, X_top, Y, h0_top),
                               rtol=1e-6)


def test_truncation_study_takes_every_parameter_of_a_gated_stack(rng):
    params = random_model(rng, "gru", 2)
    X, Y = rng.integers(0, 4, (5, 3)), rng.integers(0, 5, (5, 3))
    g = diagnostics.flat_grad(params, X, Y, None, None, "tanh")
    assert g.size == sum(v.size for v in params.values())              # b_hn and the _l1 keys too
    rows = diagnostics.truncation_study(params, X, Y, ks=[1, 5], ps=[1.0, 0.5], seeds=100)
    by = {(r["strategy"], r["param"]): r for r in rows}
    assert by["truncated", 5]["rel_bias"] == 0.0 and by["truncated", 1]["rel_bias"] > 1e-3
    assert by["randomized", 1.0]["rel_std"] == 0.0 and by["randomized", 1.0]["rel_bias"] == 0.0
    r = by["randomized", 0.5]
    assert r["rel_std"] > 1e-3 and r["rel_bias"] <= 3 * r["rel_std"] / np.sqrt(100)


def test_power_iteration_matches_numpy_eig_with_known_gap():
    M = diagnostics.matrix_with_gap(10, 0.3, seed=1)
    assert diagnostics.eigen_gap(M) == pytest.approx(0.3, abs=1e-12)
    align, x, rayleigh = diagnostics.power_iteration(M, 120, seed=2)
    lam, V = np.linalg.eig(M)
    top = np.real(V[:, np.argmax(np.abs(lam))])
    top /= np.linalg.norm(top)
    assert abs(x @ top) > 1 - 1e-12
    assert rayleigh == pytest.approx(np.real(lam[np.argmax(np.abs(lam))]), abs=1e-10)
    tan = np.sqrt(np.maximum(1 - align ** 2, 0)) / align
    # with every other |λ| <= 0.7: tan θ_k <= 0.7^k tan θ_0
    assert np.all(tan[:40] <= 0.7 ** np.arange(40) * tan[0] * (1 + 1e-9) + 1e-15)
    assert np.all(np.diff(align[:40]) >= -1e-12)


def test_truncation_study_bias_and_variance(rng):
    params, X, Y, h0 = make_case(rng, T=6, B=3, D=5, H=4, Q=5)
    rows = diagnostics.truncation_study(params, X, Y, h0, ks=[1, 6], ps=[1.0, 0.5], seeds=400)
    by = {(r["strategy"], r["param"]): r for r in rows}
    assert by["truncated", 6]["rel_bias"] == 0.0 and by["truncated", 6]["cosine"] == pytest.approx(1.0)
    assert by["truncated", 1]["rel_bias"] > 0 and by["truncated", 1]["rel_std"] == 0.0
    assert by["randomized", 1.0]["rel_std"] == 0.0 and by["randomized", 1.0]["rel_bias"] == 0.0
    r = by["randomized", 0.5]
    assert r["rel_std"] > 1e-3
    assert r["rel_bias"] <= 3 * r["rel_std"] / np.sqrt(400)         # unbiased, statistically
    assert all(row["ms"] > 0 for row in rows)


def test_rescale_spectral_radius(rng):
    params, *_ = make_case(rng, H=6)
    for radius in (0.5, 2.0):
        out = diagnostics.rescale_spectral_radius(params, radius)
        assert diagnostics.spectral_radius(out["W_hh"]) == pytest.approx(radius, rel=1e-12)
        assert out["W_xh"] is not params["W_xh"] and np.array_equal(out["W_xh"], params["W_xh"])


def test_rescale_spectral_radius_of_a_stack_and_of_a_gated_cell(rng):
    params = random_model(rng, "rnn", 2, H=6)
    out = diagnostics.rescale_spectral_radius(params, 0.5)
    assert diagnostics.spectral_radius(out["W_hh_l1"]) == pytest.approx(0.5, rel=1e-12)     # the top layer's
    assert all(np.array_equal(out[k], params[k]) for k in params if k != "W_hh_l1")
    with pytest.raises(ValueError, match=r"^params: a gru cell's W_hh is not square"):
        diagnostics.rescale_spectral_radius(random_model(rng, "gru", 1), 1.0)


def test_diagnose_cli_on_a_tiny_checkpoint(tmp_path, capsys):
    ck = tmp_path / "ck.npz"
    res = fastbptt.train(max_chars=3000, hidden=12, num_steps=8, batch_size=4, epochs=2, checkpoint=ck,
                         quiet=True, sample_prefixes=())
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as e:
        cli.main(["diagnose", "--checkpoint", str(ck), "--report", str(out), "--num-steps", "8",
                  "--batch-size", "4", "--seeds", "4", "--train-epochs", "2", "--max-chars", "3000",
                  "--quiet"])
    assert e.value.code == 0
    for name in ("lag_norms.png", "spectrum.png", "truncation.png", "book_figure.png", "clipping.png",
                 "report.md", "diagnostics.json"):
        assert (out / name).stat().st_size > 500, name
    got = json.loads((out / "diagnostics.json").read_text())
    ids = res.vocab.encode(data.tokenize(data.load_text(), "book")[:3000])
    X, Y = diagnostics.probe_batch(ids, 8, 4, seed=0)
    np.testing.assert_allclose(got["lag_norms"]["model"], diagnostics.lag_norms(res.params, X, Y), rtol=1e-6)
    assert got["spectrum"]["spectral_radius"] == pytest.approx(
        np.abs(np.linalg.eigvals(res.params["W_hh"].astype(np.float64))).max(), rel=1e-6)
    assert got["clipping"]["checkpoint"]["clipped_frac"] == [r["clipped_frac"] for r in res.history]
    assert set(got["book_figure"]) == {"randomized", "regular", "full"}
    assert "## 5. Clipping" in (out / "report.md").read_text()


def test_diagnose_needs_a_source(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["diagnose"])
    assert e.value.code == 2


DIAGNOSE_TINY = ["--num-steps", "6", "--batch-size", "4", "--seeds", "3", "--train-epochs", "1",
                 "--max-chars", "2000", "--quiet"]


def diagnose(*argv):
    with pytest.raises(SystemExit) as e:
        cli.main(["diagnose", *map(str, argv)])
    return e.value.code


def test_diagnose_cli_on_a_tiny_gru_checkpoint(tmp_path):
    ck = tmp_path / "ck.npz"
    res = fastbptt.train(cell="gru", max_chars=2000, hidden=8, num_steps=6, batch_size=4, epochs=2,
                         checkpoint=ck, quiet=True, sample_prefixes=())
    out = tmp_path / "report"
    assert diagnose("--checkpoint", ck, "--report", out, *DIAGNOSE_TINY) == 0
    for name in ("lag_norms.png", "spectrum.png", "truncation.png", "book_figure.png", "clipping.png",
                 "report.md", "diagnostics.json"):
        assert (out / name).stat().st_size > 500, name
    got = json.loads((out / "diagnostics.json").read_text())
    assert got["probe"] == {"T": 6, "B": 4, "H": 8, "V": len(res.vocab), "cell": "gru", "num_layers": 1}
    ids = res.vocab.encode(data.tokenize(data.load_text(), "book")[:2000])
    X, Y = diagnostics.probe_batch(ids, 6, 4, seed=0)
    assert list(got["lag_norms"]) == ["model"]                        # no W_hh to rescale
    np.testing.assert_allclose(got["lag_norms"]["model"], diagnostics.lag_norms(res.params, X, Y), rtol=1e-6)
    assert got["spectrum"]["eigenvalues"] is None and got["spectrum"]["spectral_radius"] is None
    assert len(got["spectrum"]["jacobian_singular_values"]["max"]) == 6
    assert [r["strategy"] for r in got["truncation"]][:2] == ["full", "truncated"]
    assert all(len(run["history"]) == 1 for run in got["book_figure"].values())
    assert got["clipping"]["checkpoint"]["clipped_frac"] == [r["clipped_frac"] for r in res.history]
    assert "The gru cell's step Jacobians" in (out / "report.md").read_text()


def test_diagnose_cli_on_a_fresh_two_layer_lstm(tmp_path, monkeypatch):
    trained = []
    real = fastbptt.trainer.train
    monkeypatch.setattr(fastbptt.trainer, "train", lambda **kw: trained.append(kw) or real(**kw))
    out = tmp_path / "report"
    assert diagnose("--init", "--cell", "lstm", "--num-layers", 2, "--hidden", 6, "--report", out,
                    *DIAGNOSE_TINY) == 0
    got = json.loads((out / "diagnostics.json").read_text())
    assert (got["probe"]["cell"], got["probe"]["num_layers"], got["probe"]["H"]) == ("lstm", 2, 6)
    assert len(got["lag_norms"]["model"]) == 7 and np.all(np.isfinite(got["lag_norms"]["model"]))
    assert len(got["spectrum"]["jacobian_singular_values"]["min"]) == 6
    assert [(kw["cell"], kw["num_layers"]) for kw in trained] == [("lstm", 2)] * 3   # the book's models too
    report = (out / "report.md").read_text()
    assert "a stack of 2 lstm layers" in report and "(with c_{t−1} held fixed)" in report


@pytest.mark.parametrize("argv, line", [
    (["--cell", "cnn"], "--cell: expected one of rnn, gru, lstm, got 'cnn'"),
    (["--num-layers", "0"], "--num-layers: expected a positive integer, got 0"),
    (["--seed", "-1"], "--seed: expected a non-negative integer, got -1"),
    (["--cell", "gru", "--activation", "relu"], "--activation: applies to --cell rnn only, got 'relu' with --cell gru"),
    (["--scale", "inf"], "--scale: expected a finite positive number, got inf"),
    (["--max-chars", "0"], "--max-chars: expected a positive integer, got 0"),
    (["--text", ""], "--text: an empty path names no file"),
])
def test_diagnose_cli_bad_cell_or_depth_exits_2_with_one_line(argv, line, capsys):
    assert diagnose("--init", *argv, "--quiet") == 2
    assert capsys.readouterr().err == f"fastbptt diagnose: error: {line}\n"


@pytest.mark.parametrize("flag, value", [("--cell", "lstm"), ("--hidden", "999"), ("--num-layers", "3"),
                                         ("--scale", "5"), ("--activation", "relu")])
def test_diagnose_of_a_checkpoint_refuses_the_options_of_init(tmp_path, capsys, flag, value):
    """the model of --checkpoint is the checkpoint's: an --init option given with it exits 2"""
    assert diagnose("--checkpoint", tmp_path / "any.npz", flag, value, "--quiet") == 2
    assert capsys.readouterr().err == (f"fastbptt diagnose: error: {flag}: sets the model of --init; with "
                                       "--checkpoint the model is the checkpoint's\n")


def test_diagnose_checks_part_4s_training_split_before_any_work(capsys, monkeypatch):
    from fastbptt import diagnostics
    monkeypatch.setattr(diagnostics, "lag_norms", lambda *a, **k: pytest.fail("work started"))
    assert diagnose("--init", "--max-chars", 34, "--hidden", 8, "--num-steps", 8, "--batch-size", 4,
                    "--quiet") == 2
    err = capsys.readouterr().err
    assert err.startswith("fastbptt diagnose: error: --max-chars: the training split of part 4 (the text less its "
                          "last 10%, held out) has 31 tokens, fewer than one minibatch") and err.count("\n") == 1


def test_diagnose_checks_part_4s_validation_split_before_any_work(capsys, monkeypatch):
    from fastbptt import api
    monkeypatch.setattr(api, "init_params", lambda *a, **k: pytest.fail("parameters drawn"))
    assert diagnose("--init", "--max-chars", 9, "--hidden", 2, "--num-steps", 1, "--batch-size", 1,
                    "--quiet") == 2
    assert capsys.readouterr().err == ("fastbptt diagnose: error: --max-chars: part 4 reports the validation "
                                       "perplexity of the text's last 10%, 0 of its 9 tokens; it needs at least 2 "
                                       "(use a longer text)\n")


def test_diagnose_refuses_an_empty_checkpoint_path_and_a_model_larger_than_memory(capsys, monkeypatch):
    """--checkpoint "" (an unset variable) is not --init; --hidden too large for this machine exits
    2 before any parameter is drawn"""
    from fastbptt import api
    assert diagnose("--checkpoint", "", "--quiet") == 2
    assert capsys.readouterr().err == "fastbptt diagnose: error: --checkpoint: an empty path names no file\n"
    assert diagnose("--checkpoint", "", "--hidden", "8", "--quiet") == 2
    assert "--hidden: sets the model of --init" in capsys.readouterr().err
    monkeypatch.setattr(api, "init_params", lambda *a, **k: pytest.fail("parameters drawn"))
    assert diagnose("--init", "--hidden", "100000000", "--quiet") == 2
    err = capsys.readouterr().err
    assert err.startswith("fastbptt diagnose: error: --hidden: the rnn model of hidden=100000000") and \
        "of memory" in err and err.count("\n") == 1


def test_diagnose_refuses_a_json_that_is_an_input_or_a_file_of_the_report(tmp_path, capsys):
    ck = tmp_path / "ck.npz"
    ck.write_bytes(b"a checkpoint")
    text = tmp_path / "t.txt"
    text.write_text("the time machine " * 200)
    cases = [("--checkpoint", ck, "--json", ck), ("--init", "--text", text, "--json", text),
             ("--init", "--report", tmp_path, "--json", tmp_path / "lag_norms.png")]
    for argv in cases:
        assert diagnose(*argv, "--quiet") == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fastbptt diagnose: error: --json: {argv[-1]} is the same file as ") and \
            err.count("\n") == 1, err
    assert ck.read_bytes() == b"a checkpoint" and text.read_text().startswith("the time")


def test_diagnose_writes_the_reports_json_and_the_json_asked_for(tmp_path):
    out, js = tmp_path / "report", tmp_path / "d.json"
    assert diagnose("--init", "--hidden", 6, "--report", out, "--json", js, *DIAGNOSE_TINY) == 0
    assert json.loads((out / "diagnostics.json").read_text()) == json.loads(js.read_text())


@pytest.mark.parametrize("raised, code, line", [
    (trainer.TrainingDiverged("epoch 1: the loss became nan — lower lr (now 1.0) or clip harder (clip, now 1.0)"),
     3, "fastbptt diagnose: part 4 (the book's comparison) trains models with fastbptt train's lr and clip, "
        "and one diverged: epoch 1: the loss became nan\n"),
    (trainer.TrainingInterrupted("interrupted after epoch 1; pass --checkpoint PATH to be able to resume"),
     130, "fastbptt diagnose: interrupted\n")])
def test_diagnose_ends_with_one_line_when_part_4s_training_diverges_or_is_interrupted(
        monkeypatch, capsys, raised, code, line):
    def train(**kw):
        raise raised
    monkeypatch.setattr(trainer, "train", train)
    assert diagnose("--init", "--hidden", 6, *DIAGNOSE_TINY) == code
    assert capsys.readouterr().err == line


def test_diagnose_warns_of_a_text_outside_the_checkpoints_vocabulary(tmp_path, monkeypatch):
    ck = tmp_path / "ck.npz"
    fastbptt.train(max_chars=2000, hidden=6, num_steps=6, batch_size=4, epochs=1, checkpoint=ck, quiet=True,
                   sample_prefixes=())
    greek = tmp_path / "g.txt"
    greek.write_text("the time machine " * 100 + "αβγ" * 100)
    monkeypatch.setattr(diagnostics, "run", lambda *a, **k: {"book_figure": {}})
    with pytest.warns(RuntimeWarning, match=r"^text: 15\.0% of its tokens are not in the checkpoint's "
                                            r"vocabulary \(3 distinct, e\.g\. 'α'\)"):
        assert diagnose("--checkpoint", ck, "--text", greek, "--tokenize", "chars", *DIAGNOSE_TINY) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # its own text: no warning
        assert diagnose("--checkpoint", ck, *DIAGNOSE_TINY) == 0


def test_diagnose_of_a_checkpoint_whose_text_moved_names_the_checkpoint(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the time machine by h g wells " * 100)
    ck = tmp_path / "ck.npz"
    fastbptt.train(text=str(text), hidden=6, num_steps=6, batch_size=4, epochs=1, checkpoint=ck, quiet=True,
                   sample_prefixes=())
    text.unlink()
    assert diagnose("--checkpoint", ck, *DIAGNOSE_TINY) == 2
    assert capsys.readouterr().err == (f"fastbptt diagnose: error: --checkpoint: its text cannot be read (no such "
                                       f"file: {text}); give it with --text\n")


def test_diagnose_of_weights_whose_states_overflow_names_scale(capsys):
    assert diagnose("--init", "--scale", "1e30", "--activation", "identity", "--hidden", 6, *DIAGNOSE_TINY) == 2
    assert capsys.readouterr().err == ("fastbptt diagnose: error: --scale: the model's hidden states on the probe "
                                       "batch overflow to non-finite values (its weights are too large to study); "
                                       "use a smaller --scale\n")
