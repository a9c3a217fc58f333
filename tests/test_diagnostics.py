"""fastbptt.diagnostics and `fastbptt diagnose` against direct computations."""
import json

import numpy as np
import pytest

import fastbptt
import reference
from fastbptt import cli, data, diagnostics
from helpers import make_case


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
