"""See how gradients flow back in time and what truncation costs (``fastbptt diagnose``).

Five studies on a trained checkpoint or on fresh parameters, each a function returning
plain numbers (every one of them goes into the JSON) and a figure:

1. :func:`lag_norms` — ‖∂l_t/∂h_{t−j}‖ against the lag j, averaged over t and the batch,
   one backward sweep per loss term (:func:`fastbptt.rnn_adjoints`); also with W_hh
   rescaled to spectral radius 0.5, 1 and 2 (:func:`rescale_spectral_radius`).
2. :func:`spectrum` — the eigenvalues of W_hh, the singular values of the product of
   step Jacobians ∂h_T/∂h_{T−j} = Π diag(φ′(z)) W_hhᵀ, and :func:`power_iteration`
   (the book's exercise: how fast M^k x aligns with the top eigenvector, by eigen-gap).
3. :func:`truncation_study` — Truncated(k) and Randomized(p) against the full gradient:
   cosine similarity, relative bias, relative standard deviation over seeds, time.
4. :func:`book_figure` — randomized truncation, regular truncation (windows with the state
   carried and detached) and full BPTT over the whole window trained on the same budget:
   validation perplexity against tokens seen.
5. :func:`clipping_stats` — clipped fraction and gradient-norm quantiles per epoch, from a
   training history (a checkpoint's, or the runs of part 4).

Any cell and depth.  Parts 1 and 2 study one layer: a stack's top layer, with the lower
layers' outputs as its (dense) input (:func:`top_layer`); through a gated cell's step
Jacobians (the LSTM's ∂h_t/∂h_{t−1} holds c_{t−1} fixed).  A gated cell's W_hh is H×G·H:
no eigenvalues, no rescaled spectral radius.  Parts 3 and 4 take the whole model.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from . import api, data
from ._plot import pyplot, save
from ._preflight import write_json_whole, write_text_whole
from .truncation import Randomized, Truncated

#: the validation share of the texts part 4 (the book figure) trains on
BOOK_VAL_FRACTION = 0.1

RADII = (0.5, 1.0, 2.0)
GAPS = (0.5, 0.1, 0.01)


# ------------------------------------------------------------------------- the layer
def top_layer(params, X, h0=None, activation="tanh"):
    """``(params, X, h0)`` of a stack's top layer as a one-layer model of the same cell: its
    keys without the suffix ``_l{L-1}``, the head, and as input the lower layers' h_1..h_T
    (T,B,H) from :func:`fastbptt.rnn_forward`.  A one-layer model is returned as it is."""
    _, L = api.cell_of(params)
    if L == 1:
        return params, X, h0
    s = f"_l{L - 1}"
    top = {k[:-len(s)]: v for k, v in params.items() if k.endswith(s)}
    top.update({k: params[k] for k in api.HEAD_KEYS})
    lower = {k: v for k, v in params.items() if not k.endswith(s) and k not in api.HEAD_KEYS}
    if h0 is None:
        h0_lower = h0_top = None
    elif isinstance(h0, tuple):                              # the LSTM's (h0, c0), each (L,B,H)
        h0_lower, h0_top = tuple(a[:-1] for a in h0), tuple(a[-1] for a in h0)
    else:
        h0_lower, h0_top = h0[:-1], h0[-1]
    return top, api.rnn_forward(lower, X, h0_lower, activation=activation), h0_top


# ---------------------------------------------------------------------- 1. lag norms
def direct_terms(params, Hs, Y):
    """g_t = ∂l_t/∂h_t through the head alone, (T,B,H), for l_t = Σ_b CE(o_t[b], y_t[b])."""
    W_hq = np.asarray(params["W_hq"], np.float64)
    o = np.asarray(Hs, np.float64) @ W_hq + np.asarray(params["b_q"], np.float64)
    o -= o.max(axis=-1, keepdims=True)
    p = np.exp(o)
    p /= p.sum(axis=-1, keepdims=True)
    np.put_along_axis(p, np.asarray(Y)[..., None], np.take_along_axis(p, np.asarray(Y)[..., None], -1) - 1, -1)
    return p @ W_hq.T


def lag_norms(params, X, Y, h0=None, activation="tanh"):
    """mean over t and b of ‖∂l_t[b]/∂h_{t−j}[b]‖ for lags j = 0..T (a row-wise norm: the
    rows of a batch are independent).  One backward sweep per loss term t.  A stack: of its
    top layer (:func:`top_layer`)."""
    params, X, h0 = top_layer(params, X, h0, activation)
    Hs = api.rnn_forward(params, X, h0, activation=activation)
    T, B, H = Hs.shape
    G = direct_terms(params, Hs, Y).astype(Hs.dtype)
    total = np.zeros(T + 1)
    count = np.zeros(T + 1)
    dHs = np.zeros_like(Hs)
    for t in range(T):                               # loss term l_{t+1}, adjoint at h_{t+1}
        dHs[:] = 0
        dHs[t] = G[t]
        A = api.rnn_adjoints(params, X, Hs, dHs, h0, activation=activation)
        norms = np.linalg.norm(A[:t + 2].astype(np.float64), axis=-1)   # (t+2, B): h_0..h_{t+1}
        total[:t + 2] += norms[::-1].sum(axis=1)     # lag j = t+1 − s
        count[:t + 2] += B
    return total / count


def spectral_radius(W):
    return float(np.abs(np.linalg.eigvals(np.asarray(W, np.float64))).max())


def rescale_spectral_radius(params, radius):
    """A copy of ``params`` with W_hh (a stack's: the top layer's) scaled to the given
    spectral radius; the rnn cell's only (a gated cell's W_hh is not square)."""
    cell, L = api.cell_of(params)
    if cell != "rnn":
        raise ValueError(f"params: a {cell} cell's W_hh is not square; it has no spectral radius")
    key = f"W_hh_l{L - 1}" if L > 1 else "W_hh"
    out = {k: v.copy() for k, v in params.items()}
    r = spectral_radius(params[key])
    out[key] = (out[key] * (radius / r)).astype(params[key].dtype) if r > 0 else out[key]
    return out


# ------------------------------------------------------------------------ 2. spectrum
def jacobian_product_singular_values(params, X, h0=None, activation="tanh", row=0):
    """Singular values (descending) of ∂h_T/∂h_{T−j} = M_T … M_{T−j+1}, M_t = diag(φ′(z_t)) W_hhᵀ,
    for j = 1..T, along batch row ``row``.  Returns a list of arrays.  A stack: of its top
    layer; a gated cell: :func:`jacobian_products_by_adjoints`."""
    params, X, h0 = top_layer(params, X, h0, activation)
    if api.cell_of(params)[0] != "rnn":
        return [np.linalg.svd(J, compute_uv=False)
                for J in jacobian_products_by_adjoints(params, X, h0, activation, row)]
    Hs = api.rnn_forward(params, X, h0, activation=activation).astype(np.float64)
    W = np.asarray(params["W_hh"], np.float64)
    T = Hs.shape[0]
    h = Hs[:, row]
    if activation == "tanh":
        dphi = 1.0 - h ** 2
    elif activation == "relu":
        dphi = (h > 0).astype(np.float64)
    else:
        dphi = np.ones_like(h)
    P = np.eye(W.shape[0])
    out = []
    for j in range(1, T + 1):
        t = T - j                                   # 0-based index of step T−j+1
        P = P @ (dphi[t][:, None] * W.T)
        out.append(np.linalg.svd(P, compute_uv=False))
    return out


def jacobian_products_by_adjoints(params, X, h0=None, activation="tanh", row=0):
    """∂h_T/∂h_{T−j} for j = 1..T along batch row ``row``, of a one-layer model of any cell,
    in float64: H copies of that row, the copy i with the direct term e_i at step T, in one
    :func:`fastbptt.rnn_adjoints` sweep, whose A[T−j][i] = ∂h_T[i]/∂h_{T−j}."""
    P = {k: np.asarray(v, np.float64) for k, v in params.items()}
    H = P["W_hh"].shape[0]
    copies = np.full(H, row)
    X = np.asarray(X)[:, copies]
    X = X.astype(np.float64) if X.dtype.kind == "f" else X
    if h0 is not None:
        h0 = (tuple(np.asarray(a, np.float64)[copies] for a in h0) if isinstance(h0, tuple)
              else np.asarray(h0, np.float64)[copies])
    Hs = api.rnn_forward(P, X, h0, activation=activation)
    dHs = np.zeros_like(Hs)
    dHs[-1] = np.eye(H)
    A = api.rnn_adjoints(P, X, Hs, dHs, h0, activation=activation)
    return [A[-1 - j] for j in range(1, Hs.shape[0] + 1)]


def power_iteration(M, steps, seed=0):
    """Power iteration on a symmetric M from a random start: |cos| between M^k x and the top
    eigenvector (by |λ|, from numpy.linalg.eigh) for k = 0..steps, the final vector and its
    Rayleigh quotient."""
    M = np.asarray(M, np.float64)
    lam, V = np.linalg.eigh(M)
    top = V[:, np.argmax(np.abs(lam))]
    x = np.random.default_rng(seed).standard_normal(M.shape[0])
    x /= np.linalg.norm(x)
    cos = [abs(float(x @ top))]
    for _ in range(steps):
        x = M @ x
        x /= np.linalg.norm(x)
        cos.append(abs(float(x @ top)))
    return np.array(cos), x, float(x @ M @ x)


def eigen_gap(M):
    """1 − |λ₂|/|λ₁| of a symmetric M (eigenvalues by magnitude)."""
    lam = np.sort(np.abs(np.linalg.eigvalsh(np.asarray(M, np.float64))))[::-1]
    return float(1.0 - lam[1] / lam[0]) if len(lam) > 1 and lam[0] > 0 else 1.0


def matrix_with_gap(n, gap, seed=0):
    """A random symmetric n×n matrix with λ₁ = 1, |λ₂| = 1 − gap and the rest below |λ₂|."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([[1.0, 1.0 - gap], (1.0 - gap) * rng.uniform(-0.9, 0.9, n - 2)])
    return (Q * lam) @ Q.T


def spectrum(params, X, h0=None, activation="tanh", steps=60):
    """Of one layer (a stack's top layer); a gated cell's eigenvalues and radius are None."""
    params, X, h0 = top_layer(params, X, h0, activation)
    W = np.asarray(params["W_hh"], np.float64)
    eig = np.linalg.eigvals(W) if W.shape[0] == W.shape[1] else None
    svals = jacobian_product_singular_values(params, X, h0, activation)
    S = W @ W.T                                       # symmetric: ‖(W_hhᵀ)^k‖ grows as its λ₁^{k/2}
    runs = {"model W_hh W_hhᵀ": (eigen_gap(S), power_iteration(S, steps)[0])}
    for gap in GAPS:
        runs[f"gap {gap}"] = (gap, power_iteration(matrix_with_gap(W.shape[0], gap), steps)[0])
    return {
        "eigenvalues": None if eig is None else {"real": eig.real.tolist(), "imag": eig.imag.tolist()},
        "spectral_radius": None if eig is None else float(np.abs(eig).max()),
        "jacobian_singular_values": {"lag": list(range(1, len(svals) + 1)),
                                     "max": [float(s[0]) for s in svals],
                                     "median": [float(np.median(s)) for s in svals],
                                     "min": [float(s[-1]) for s in svals]},
        "power_iteration": {name: {"eigen_gap": g, "alignment": c.tolist()} for name, (g, c) in runs.items()},
    }


# ------------------------------------------------------------ 3. truncation study
def flat_grad(params, X, Y, h0, truncation, activation):
    _, g, _ = api.loss_and_grad(params, X, Y, h0, truncation=truncation, activation=activation)
    return np.concatenate([g[k].ravel().astype(np.float64) for k in params])


def _median_ms(fn, runs=5):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def truncation_study(params, X, Y, h0=None, activation="tanh", ks=None, ps=None, seeds=30,
                     progress=False):
    """Rows of {strategy, param, cosine, rel_bias, rel_std, ms} against the full gradient.

    cosine: mean over samples of cos(g, g_full); rel_bias: ‖E[g] − g_full‖/‖g_full‖ with E the
    mean over ``seeds`` seeds (Truncated is deterministic: one sample); rel_std: the root mean
    squared deviation of the samples from their mean, over ‖g_full‖.
    """
    from tqdm.auto import tqdm
    T = X.shape[0]
    ks = ks or sorted({2 ** i for i in range(int(math.log2(T)) + 1)} | {T})
    ps = ps or [round(0.1 * i, 1) for i in range(1, 11)]
    full = flat_grad(params, X, Y, h0, None, activation)
    nf = np.linalg.norm(full)
    t_full = _median_ms(lambda: api.loss_and_grad(params, X, Y, h0, activation=activation))
    rows = [dict(strategy="full", param=None, cosine=1.0, rel_bias=0.0, rel_std=0.0, ms=t_full)]
    jobs = [("truncated", k) for k in ks] + [("randomized", p) for p in ps]
    for kind, v in tqdm(jobs, disable=not progress, desc="truncation study", leave=False):
        if kind == "truncated":
            tr = [Truncated(v)]
        else:
            tr = [Randomized(v, seed=s) for s in range(seeds)]
        G = np.array([flat_grad(params, X, Y, h0, t, activation) for t in tr])
        mean = G[0] + (G - G[0]).mean(axis=0)        # shifted: identical samples give exact zeros
        cos = (G @ full) / (np.linalg.norm(G, axis=1) * nf + 1e-300)
        std = math.sqrt(((G - mean) ** 2).sum() / max(1, len(G) - 1)) if len(G) > 1 else 0.0
        ms = _median_ms(lambda: api.loss_and_grad(params, X, Y, h0, truncation=tr[0], activation=activation))
        rows.append(dict(strategy=kind, param=v, cosine=float(cos.mean()),
                         rel_bias=float(np.linalg.norm(mean - full) / nf), rel_std=std / nf, ms=ms))
    return rows


# --------------------------------------------------------------- 4. the book's figure
def book_figure(text=None, tokenize="book", max_chars=None, hidden=64, num_steps=32, batch_size=32,
                epochs=10, p=0.5, chunks=4, seed=0, activation="tanh", progress=False, cell="rnn",
                num_layers=1):
    """Three models on the same text and budget (epochs): randomized truncation Randomized(p),
    regular truncation (windows of num_steps/chunks with the state carried and detached),
    and full BPTT over the whole window of num_steps; each a ``cell`` stack of ``num_layers``.
    Returns {name: history}."""
    from tqdm.auto import tqdm
    from .trainer import train
    runs = {"randomized": dict(truncation=f"random:{p}", num_steps=num_steps),
            "regular": dict(truncation="full", num_steps=max(1, num_steps // chunks)),
            "full": dict(truncation="full", num_steps=num_steps)}
    out = {}
    for name, opts in tqdm(runs.items(), disable=not progress, desc="book figure", leave=False):
        res = train(text=text, tokenize=tokenize, max_chars=max_chars, val_fraction=BOOK_VAL_FRACTION, cell=cell,
                    num_layers=num_layers, hidden=hidden,
                    batch_size=batch_size, epochs=epochs, seed=seed, activation=activation,
                    quiet=True, sample_prefixes=(), **opts)
        out[name] = dict(opts, history=res.history)
    return out


# ---------------------------------------------------------------------- 5. clipping
def clipping_stats(history):
    """Per epoch: clipped fraction, mean gradient norm and its quantiles (when recorded)."""
    return {"epoch": [r["epoch"] for r in history],
            "clipped_frac": [r["clipped_frac"] for r in history],
            "grad_norm": [r["grad_norm"] for r in history],
            "grad_norm_quantiles": [r.get("grad_norm_quantiles") for r in history]}


# ----------------------------------------------------------------------------- figures
def plot_lag_norms(lags, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, norms in lags.items():
        ax.plot(range(len(norms)), norms, marker=".", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("lag j (steps back in time)")
    ax.set_ylabel("mean ‖∂l_t/∂h_{t−j}‖")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)


def plot_spectrum(spec, path):
    plt = pyplot()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.5))
    th = np.linspace(0, 2 * np.pi, 200)
    if spec["eigenvalues"] is None:
        a1.text(0.5, 0.5, "a gated cell's W_hh is H×G·H:\nno eigenvalues", ha="center", va="center")
        a1.set_axis_off()
    else:
        a1.plot(np.cos(th), np.sin(th), "k--", lw=0.8)
        a1.scatter(spec["eigenvalues"]["real"], spec["eigenvalues"]["imag"], s=8)
        a1.set_aspect("equal")
        a1.set_title(f"eigenvalues of W_hh (radius {spec['spectral_radius']:.3g})")
    js = spec["jacobian_singular_values"]
    for key in ("max", "median", "min"):
        a2.plot(js["lag"], np.maximum(js[key], 1e-300), label=f"σ {key}")
    a2.set_yscale("log")
    a2.set_xlabel("j")
    a2.set_title("singular values of ∂h_T/∂h_{T−j}")
    a2.legend(fontsize=8)
    for name, run in spec["power_iteration"].items():
        err = np.maximum(1.0 - np.array(run["alignment"]), 1e-16)
        a3.plot(err, label=f"{name} (gap {run['eigen_gap']:.3g})")
    a3.set_yscale("log")
    a3.set_xlabel("power-iteration step k")
    a3.set_title("1 − |cos(M^k x, v₁)|")
    a3.legend(fontsize=8)
    save(fig, path)


def plot_truncation(rows, path):
    """Truncated(k) against k, Randomized(p) against p (zeros drawn at 1e-16), and time per call."""
    plt = pyplot()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.5))
    floor = lambda v: [max(x, 1e-16) for x in v]          # noqa: E731  (log axes)
    rk = [r for r in rows if r["strategy"] == "truncated"]
    rp = [r for r in rows if r["strategy"] == "randomized"]
    k = [r["param"] for r in rk]
    a1.plot(k, floor([r["rel_bias"] for r in rk]), "o-", label="relative bias")
    a1.plot(k, floor([1 - r["cosine"] for r in rk]), "o:", label="1 − cosine")
    a1.set(xscale="log", yscale="log", xlabel="k", title="Truncated(k): deterministic, biased")
    p = [r["param"] for r in rp]
    a2.plot(p, floor([r["rel_bias"] for r in rp]), "s-", label="relative bias (mean over seeds)")
    a2.plot(p, floor([r["rel_std"] for r in rp]), "s--", label="relative std over seeds")
    a2.plot(p, floor([1 - r["cosine"] for r in rp]), "s:", label="1 − cosine")
    a2.set(yscale="log", xlabel="p", title="Randomized(p): unbiased, with variance")
    labels = ["full"] + [f"k={r['param']}" for r in rk] + [f"p={r['param']}" for r in rp]
    ms = [rows[0]["ms"]] + [r["ms"] for r in rk] + [r["ms"] for r in rp]
    a3.bar(range(len(ms)), ms, color=["k"] + ["C0"] * len(rk) + ["C1"] * len(rp))
    a3.set_xticks(range(len(ms)), labels, rotation=90, fontsize=7)
    a3.set(ylabel="ms per loss_and_grad", title="time")
    for ax in (a1, a2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, path)


def plot_book_figure(runs, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in runs.items():
        tokens = np.cumsum([r["tokens"] for r in run["history"]])
        ax.plot(tokens, [r["val_ppl"] for r in run["history"]], marker=".", label=name)
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("validation perplexity")
    ax.grid(True, alpha=0.3)
    ax.legend()
    save(fig, path)


def plot_clipping(stats, path):
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    for name, s in stats.items():
        a1.plot(s["epoch"], s["clipped_frac"], marker=".", label=name)
        q = [x for x in s["grad_norm_quantiles"] if x is not None]
        if len(q) == len(s["epoch"]):
            q = np.array(q)
            a2.fill_between(s["epoch"], q[:, 1], q[:, 3], alpha=0.2)
            a2.plot(s["epoch"], q[:, 2], label=f"{name} (median, 10–90 %)")
        else:
            a2.plot(s["epoch"], s["grad_norm"], label=f"{name} (mean)")
    a1.set_xlabel("epoch")
    a1.set_ylabel("fraction of steps clipped")
    a1.legend(fontsize=8)
    a2.set_yscale("log")
    a2.set_xlabel("epoch")
    a2.set_ylabel("gradient norm before clipping")
    a2.legend(fontsize=8)
    save(fig, path)


# ------------------------------------------------------------------------------- run
def probe_batch(ids, num_steps, batch_size, seed=0):
    """One (X, Y) minibatch of the text, as the sequential sampler cuts it."""
    data.check_length(len(ids), num_steps, batch_size)
    return next(data.sequential_batches(ids, batch_size, num_steps, np.random.default_rng(seed)))


def check_splits(n_tokens, num_steps, batch_size):
    """ValueError unless a text of n_tokens gives part 4 a training split of one minibatch and a
    validation split of at least 2 tokens (its perplexity): checked before any work"""
    n_val = int(n_tokens * BOOK_VAL_FRACTION)
    data.check_length(n_tokens - n_val, num_steps, batch_size,
                      f"training split of part 4 (the text less its last {BOOK_VAL_FRACTION:.0%}, held out)")
    if n_val < 2:
        raise ValueError(f"n_tokens: part 4 reports the validation perplexity of the text's last "
                         f"{BOOK_VAL_FRACTION:.0%}, {n_val} of its {n_tokens} tokens; it needs at least 2 "
                         f"(use a longer text)")


class StatesOverflow(ValueError):
    """The probe's forward overflows: nothing of the model can be measured."""


def run(params, vocab, ids, *, text=None, tokenize="book", max_chars=None, activation="tanh",
        num_steps=32, batch_size=32, seeds=30, train_epochs=10, history=None, report=None,
        json_path=None, seed=0, progress=True):
    """All five studies; writes the figures, diagnostics.json and report.md into ``report`` (a
    folder: REPORT_FILES), and the JSON into ``json_path`` too.
    ``params`` of any cell and depth (the models of part 4 are of the same)."""
    from tqdm.auto import tqdm
    cell, num_layers = api.cell_of(params)
    check_splits(len(ids), num_steps, batch_size)
    X, Y = probe_batch(ids, num_steps, batch_size, seed)
    if not np.isfinite(api.rnn_forward(params, X, activation=activation)).all():
        raise StatesOverflow("params: the model's hidden states on the probe batch overflow to non-finite values "
                             "(its weights are too large to study)")
    steps = tqdm(total=5, disable=not progress, desc="diagnose", unit="part")
    lags = {"model": lag_norms(params, X, Y, activation=activation)}
    for r in RADII if cell == "rnn" else ():
        lags[f"spectral radius {r}"] = lag_norms(rescale_spectral_radius(params, r), X, Y, activation=activation)
    steps.update(1)
    spec = spectrum(params, X, activation=activation)
    steps.update(1)
    trunc = truncation_study(params, X, Y, activation=activation, seeds=seeds, progress=progress)
    steps.update(1)
    book = book_figure(text, tokenize, max_chars, hidden=params["W_hh"].shape[0], num_steps=num_steps,
                       batch_size=batch_size, epochs=train_epochs, seed=seed, activation=activation,
                       progress=progress, cell=cell, num_layers=num_layers)
    steps.update(1)
    clip = {name: clipping_stats(run_["history"]) for name, run_ in book.items()}
    if history:
        clip = {"checkpoint": clipping_stats(history), **clip}
    steps.update(1)
    steps.close()
    result = {"probe": {"T": int(X.shape[0]), "B": int(X.shape[1]), "H": int(params["W_hh"].shape[0]),
                        "V": len(vocab), "cell": cell, "num_layers": num_layers}, "seeds": seeds,
              "lag_norms": {k: v.tolist() for k, v in lags.items()}, "spectrum": spec,
              "truncation": trunc, "book_figure": book, "clipping": clip}
    paths = [json_path]
    if report:
        out = Path(report)
        out.mkdir(parents=True, exist_ok=True)
        plot_lag_norms(lags, out / "lag_norms.png")
        plot_spectrum(spec, out / "spectrum.png")
        plot_truncation(trunc, out / "truncation.png")
        plot_book_figure(book, out / "book_figure.png")
        plot_clipping(clip, out / "clipping.png")
        write_text_whole(out / "report.md", write_report(result))
        paths.append(out / "diagnostics.json")          # the report's numbers, beside it
    for path in filter(None, paths):
        write_json_whole(path, result)
    return result


#: the files ``run`` writes into its report folder
REPORT_FILES = ("lag_norms.png", "spectrum.png", "truncation.png", "book_figure.png", "clipping.png",
                "report.md", "diagnostics.json")


def _decay_rate(norms):
    """The per-step factor of a geometric fit of lag norms (lags 1 … end)."""
    y = np.log(np.maximum(np.asarray(norms[1:]), 1e-300))
    return float(np.exp(np.polyfit(np.arange(1, len(y) + 1), y, 1)[0])) if len(y) > 1 else float("nan")


def _model_note(probe):
    """The report's lines on a model other than one layer of the rnn cell."""
    cell, L = probe.get("cell", "rnn"), probe.get("num_layers", 1)
    notes = []
    if L > 1:
        notes.append(f"The model is a stack of {L} {cell} layers: sections 1 and 2 study its top layer, "
                     "with the lower layers' outputs as its input; sections 3 and 4 the whole model.")
    if cell != "rnn":
        held = " (with c_{t−1} held fixed)" if cell == "lstm" else ""
        notes.append(f"The {cell} cell's step Jacobians ∂h_t/∂h_{{t−1}} go through its gates{held}; its "
                     "W_hh is H×G·H, with no eigenvalues, so section 1 does not rescale it.")
    return [" ".join(notes), ""] if notes else []


def write_report(result):
    """A markdown report a learner can read top to bottom."""
    p = result["probe"]
    lag = result["lag_norms"]
    spec = result["spectrum"]
    tr = result["truncation"]
    lines = [
        "# fastbptt diagnose",
        "",
        f"A probe minibatch of T = {p['T']} steps and B = {p['B']} sequences; H = {p['H']}, "
        f"vocabulary {p['V']}. Every number plotted is in `diagnostics.json`.",
        "",
        *_model_note(p),
        "## 1. How far back does the gradient of one loss term reach?",
        "",
        "![lag norms](lag_norms.png)",
        "",
        "‖∂l_t/∂h_{t−j}‖, averaged over t and the batch, against the lag j — one backward sweep "
        "per loss term. Each step back multiplies the adjoint by diag(φ′) W_hhᵀ: with spectral "
        "radius below 1 the norm decays geometrically (vanishing gradients), above 1 it can grow "
        "(exploding gradients), which the tanh's φ′ ≤ 1 partly tames.",
        "",
        "| W_hh | per-step factor (geometric fit) | norm at lag 0 | norm at the largest lag |",
        "|---|---|---|---|",
    ]
    for name, v in lag.items():
        lines.append(f"| {name} | {_decay_rate(v):.3g} | {v[0]:.3g} | {v[-1]:.3g} |")
    js = spec["jacobian_singular_values"]
    left = ("Left: a gated cell's W_hh is H×G·H, with no eigenvalues." if spec["spectral_radius"] is None
            else f"Left: the eigenvalues of W_hh and the unit circle (spectral radius "
                 f"{spec['spectral_radius']:.3g}).")
    lines += [
        "",
        "## 2. The spectrum behind it",
        "",
        "![spectrum](spectrum.png)",
        "",
        f"{left} Middle: singular values of the product of step "
        f"Jacobians ∂h_T/∂h_{{T−j}}; at j = {js['lag'][-1]} the largest is {js['max'][-1]:.3g} and the "
        f"smallest {js['min'][-1]:.3g}. Right: the book's exercise made concrete — power iteration "
        "M^k x aligns with the top eigenvector at the rate |λ₂/λ₁|^k, fast for a large eigen-gap and "
        "slowly for a small one; a product of many Jacobians likewise keeps only its top directions.",
        "",
        "| matrix | eigen-gap | 1 − alignment after 10 steps | after 50 |",
        "|---|---|---|---|",
    ]
    for name, run_ in spec["power_iteration"].items():
        a = run_["alignment"]
        lines.append(f"| {name} | {run_['eigen_gap']:.3g} | {1 - a[min(10, len(a) - 1)]:.2e} | "
                     f"{1 - a[min(50, len(a) - 1)]:.2e} |")
    lines += [
        "",
        "## 3. What truncation costs: bias, variance, time",
        "",
        "![truncation](truncation.png)",
        "",
        "Truncated(k) is deterministic and biased (it drops every path longer than k steps); "
        "Randomized(p) is unbiased (its mean over seeds is the full gradient) and pays with variance.",
        f"Its relative bias is measured over {result['seeds']} seeds, so it carries sampling noise of "
        f"about relative std/√{result['seeds']}: unbiased means a bias of that size that shrinks with "
        "more seeds (the tests check this bound), not an exact zero. Time: Truncated(k) costs "
        "O(T·k) recurrent products; Randomized(p) skips the product of every step whose ξ is 0.",
        "",
        "| strategy | k or p | cosine to full | relative bias | relative std | ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in tr:
        lines.append(f"| {r['strategy']} | {'' if r['param'] is None else r['param']} | {r['cosine']:.4f} | "
                     f"{r['rel_bias']:.2e} | {r['rel_std']:.2e} | {r['ms']:.2f} |")
    book = result["book_figure"]
    lines += [
        "",
        "## 4. The book's comparison, trained",
        "",
        "![book figure](book_figure.png)",
        "",
        "Three models on the same text and the same number of training tokens: randomized "
        "truncation, regular truncation (shorter windows with the state carried and detached) "
        "and full BPTT over the whole window.",
        "",
        "| run | window | truncation | final validation perplexity | best |",
        "|---|---|---|---|---|",
    ]
    for name, run_ in book.items():
        v = [r["val_ppl"] for r in run_["history"]]
        lines.append(f"| {name} | {run_['num_steps']} | {run_['truncation']} | {v[-1]:.3f} | {min(v):.3f} |")
    lines += [
        "",
        "## 5. Clipping",
        "",
        "![clipping](clipping.png)",
        "",
        "The fraction of steps whose gradient norm exceeded the clipping threshold, and the "
        "distribution of the norms before clipping, per epoch.",
        "",
        "| run | mean clipped fraction | median norm, last epoch |",
        "|---|---|---|",
    ]
    for name, s in result["clipping"].items():
        q = s["grad_norm_quantiles"][-1]
        med = f"{q[2]:.3g}" if q else f"{s['grad_norm'][-1]:.3g} (mean)"
        lines.append(f"| {name} | {np.mean(s['clipped_frac']):.3f} | {med} |")
    return "\n".join(lines) + "\n"
