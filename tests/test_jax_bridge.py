"""fastbptt.jax: the cells as a JAX function (custom_vjp over pure_callback), checked against
jax.grad of a lax.scan written here (PyTorch-form gates), under jax.grad and jax.jit."""
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import fastbptt  # noqa: E402
import fastbptt.jax as fj  # noqa: E402

T, B, D, H = 5, 3, 4, 3


@pytest.fixture(autouse=True, scope="module")
def _x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


# ------------------------------------------------------------------------ the reference
def _crossing(c, s):
    """c in the forward; its gradient scaled by s (the crossing factor ξ_t)"""
    return s * c + (1 - s) * jax.lax.stop_gradient(c)


def ref_rnn(p, X, state0, cell, L, xi=None, activation="tanh"):
    """(outputs, (h_T,) or (h_T, c_T), each (L,B,H)) by lax.scan, layer after layer"""
    sig = jax.nn.sigmoid
    phi = {"tanh": jnp.tanh, "relu": jax.nn.relu, "identity": lambda a: a}[activation]
    x = X
    xi = jnp.ones(X.shape[0], p["W_hh"].dtype) if xi is None else jnp.asarray(xi)
    last = [[] for _ in state0]
    for l in range(L):
        k = (lambda n: n) if l == 0 else (lambda n, l=l: f"{n}_l{l}")
        W_xh, W_hh, b = p[k("W_xh")], p[k("W_hh")], p[k("b_h")]
        pre = (W_xh[x] if x.ndim == 2 else x @ W_xh) + b
        Hn = W_hh.shape[0]

        def step(carry, inp, W_hh=W_hh, k=k, Hn=Hn):
            a, s = inp
            carry = tuple(_crossing(c, s) for c in carry)
            h = carry[0]
            if cell == "rnn":
                h = phi(a + h @ W_hh)
                return (h,), h
            if cell == "gru":
                hw = h @ W_hh
                r = sig(a[:, :Hn] + hw[:, :Hn])
                z = sig(a[:, Hn:2 * Hn] + hw[:, Hn:2 * Hn])
                n = jnp.tanh(a[:, 2 * Hn:] + r * (hw[:, 2 * Hn:] + p[k("b_hn")]))
                h = (1 - z) * n + z * h
                return (h,), h
            a = a + h @ W_hh
            i, f = sig(a[:, :Hn]), sig(a[:, Hn:2 * Hn])
            g, o = jnp.tanh(a[:, 2 * Hn:3 * Hn]), sig(a[:, 3 * Hn:])
            c = f * carry[1] + i * g
            h = o * jnp.tanh(c)
            return (h, c), h

        fin, x = jax.lax.scan(step, tuple(s[l] for s in state0), (pre, xi))
        for j, s in enumerate(fin):
            last[j].append(s)
    return x, tuple(jnp.stack(s) for s in last)


# ----------------------------------------------------------------------------- helpers
def make(cell, L, rng, dtype=np.float64, scale=0.6):
    p = fastbptt.init_params(D, H, 2, dtype=dtype, cell=cell, num_layers=L, seed=int(rng.integers(1 << 30)))
    p = {k: jnp.asarray((scale * rng.standard_normal(v.shape)).astype(dtype)) for k, v in p.items()}
    X = jnp.asarray(rng.standard_normal((T, B, D)).astype(dtype))
    n = 2 if cell == "lstm" else 1
    s0 = tuple(jnp.asarray((0.5 * rng.standard_normal((L, B, H))).astype(dtype)) for _ in range(n))
    w = {"o": jnp.asarray(rng.standard_normal((T, B, H)).astype(dtype)),
         "s": tuple(jnp.asarray(rng.standard_normal((L, B, H)).astype(dtype)) for _ in range(n))}
    return p, X, s0, w


def losses(cell, L, w, with_h0, truncation=None, xi=None, state_terms=True, activation="tanh"):
    """(fastbptt.jax's loss, the reference's) of (params, X, state0)"""
    def score(out, last):
        total = jnp.sum(out * w["o"])
        if state_terms:
            total += sum(jnp.sum(s * ws) for s, ws in zip(last, w["s"]))
        return total

    def ours(p, X, s0):
        h0 = None if not with_h0 else (s0 if cell == "lstm" else s0[0])
        out, last = fj.rnn(p, X, h0, activation=activation, truncation=truncation)
        return score(out, last if cell == "lstm" else (last,))

    def ref(p, X, s0):
        s0 = s0 if with_h0 else tuple(jnp.zeros_like(s) for s in s0)
        out, last = ref_rnn(p, X, s0, cell, L, xi, activation)
        return score(out, last)
    return ours, ref


def close(a, b, rtol=1e-9, atol=1e-10):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


CASES = [(c, L, h) for c in ("rnn", "gru", "lstm") for L in (1, 2) for h in (False, True)]


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("cell,L,with_h0", CASES)
def test_matches_scan_reference(cell, L, with_h0, rng):
    p, X, s0, w = make(cell, L, rng)
    ours, ref = losses(cell, L, w, with_h0)
    want = jax.value_and_grad(ref, argnums=(0, 1, 2))(p, X, s0)
    got = jax.value_and_grad(ours, argnums=(0, 1, 2))(p, X, s0)
    close(got, want)
    jitted = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(p, X, s0)
    close(jitted, want)
    # the forward: outputs and every layer's last state
    h0 = None if not with_h0 else (s0 if cell == "lstm" else s0[0])
    out, last = fj.rnn(p, X, h0)
    rout, rlast = ref_rnn(p, X, s0 if with_h0 else tuple(jnp.zeros_like(s) for s in s0), cell, L)
    close((out, last if cell == "lstm" else (last,)), (rout, rlast))
    assert out.dtype == jnp.float64


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_outputs_only_and_float32(cell, rng):
    """the single-call path (no lower-layer or c_T cotangent), in float32"""
    p, X, s0, w = make(cell, 2, rng, dtype=np.float32)
    ours, ref = losses(cell, 2, w, True, state_terms=False)
    want = jax.grad(ref, argnums=(0, 1, 2))(p, X, s0)
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(p, X, s0)
    close(got, want, rtol=2e-4, atol=2e-5)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(got))


def test_token_ids_and_relu(rng):
    p, _, s0, w = make("rnn", 2, rng, scale=0.4)
    ids = jnp.asarray(rng.integers(0, D, (T, B)))
    ours, ref = losses("rnn", 2, w, True, activation="relu")
    close(jax.jit(jax.grad(ours, argnums=(0, 2)))(p, ids, s0), jax.grad(ref, argnums=(0, 2))(p, ids, s0))
    p, _, s0, w = make("lstm", 1, rng)                          # ids, no h0, a c_T cotangent
    ours, ref = losses("lstm", 1, w, False)
    close(jax.jit(jax.grad(ours))(p, ids, s0), jax.grad(ref)(p, ids, s0))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_truncation_full_equivalents(cell, rng):
    p, X, s0, w = make(cell, 2, rng)
    full = jax.grad(losses(cell, 2, w, True)[0], argnums=(0, 1, 2))(p, X, s0)
    for tr in (fastbptt.Truncated(T), fastbptt.Truncated(T + 3), fastbptt.Randomized(1.0)):
        got = jax.jit(jax.grad(losses(cell, 2, w, True, truncation=tr)[0], argnums=(0, 1, 2)))(p, X, s0)
        close(got, full)


@pytest.mark.parametrize("cell,L", [("rnn", 2), ("gru", 2), ("lstm", 1), ("lstm", 2)])
def test_randomized_matches_scaled_crossings(cell, L, rng):
    """Randomized(p, seed): every crossing from step t to t-1 (h and c, every layer) times ξ_t,
    also through the layer-by-layer path that the state cotangents take"""
    p, X, s0, w = make(cell, L, rng)
    tr = fastbptt.Randomized(0.5, seed=7)
    xi = tr.draw(T, np.float64)
    assert 0 < np.count_nonzero(xi) < T
    for state_terms in (False, True):
        ours, ref = losses(cell, L, w, True, truncation=tr, xi=xi, state_terms=state_terms)
        close(jax.grad(ours, argnums=(0, 1, 2))(p, X, s0), jax.grad(ref, argnums=(0, 1, 2))(p, X, s0))


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_truncated_is_rnn_backward(cell, rng):
    L = 2
    p, X, s0, w = make(cell, L, rng)
    tr = fastbptt.Truncated(2)
    ours, _ = losses(cell, L, w, True, truncation=tr, state_terms=False)

    def top_h(p, X, s0):                        # a cotangent on the top layer's h_T is fine
        out, last = fj.rnn(p, X, s0 if cell == "lstm" else s0[0], truncation=tr)
        return ours(p, X, s0) + jnp.sum((last[0] if cell == "lstm" else last)[-1] * w["s"][0][-1])
    got = jax.jit(jax.grad(top_h, argnums=(0, 1, 2)))(p, X, s0)
    npp = {k: np.asarray(v) for k, v in p.items()}
    h0 = tuple(map(np.asarray, s0)) if cell == "lstm" else np.asarray(s0[0])
    Hs = fastbptt.rnn_forward(npp, np.asarray(X), h0)
    dHs = np.array(w["o"])
    dHs[-1] += np.asarray(w["s"][0][-1])
    want = fastbptt.rnn_backward(npp, np.asarray(X), Hs, dHs, h0, truncation=tr, input_grad=True)
    close({k: got[0][k] for k in want if k in p}, {k: want[k] for k in want if k in p})
    assert not any(np.any(got[0][k]) for k in ("W_hq", "b_q"))
    close(got[1], want["X"])
    close(got[2], tuple(want[n] for n in (("h0", "c0") if cell == "lstm" else ("h0",))))


@pytest.mark.parametrize("cell,L", [("gru", 2), ("lstm", 1), ("lstm", 2)])
def test_truncated_with_every_state_cotangent(cell, L, rng):
    """cotangents of every layer's h_T and of c_T join the last step's term: rnn_backward's dh_T
    (whose Truncated(k) is checked against its definition in tests/test_state_grad.py)"""
    p, X, s0, w = make(cell, L, rng)
    tr = fastbptt.Truncated(2)
    ours, _ = losses(cell, L, w, True, truncation=tr)
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(p, X, s0)
    npp = {k: np.asarray(v) for k, v in p.items()}
    lstm = cell == "lstm"
    h0 = tuple(map(np.asarray, s0)) if lstm else np.asarray(s0[0])
    dh_T = tuple(map(np.asarray, w["s"])) if lstm else np.asarray(w["s"][0])
    Hs = fastbptt.rnn_forward(npp, np.asarray(X), h0)
    want = fastbptt.rnn_backward(npp, np.asarray(X), Hs, np.asarray(w["o"]), h0, truncation=tr, input_grad=True,
                                 dh_T=dh_T)
    close({k: got[0][k] for k in want if k in p}, {k: want[k] for k in want if k in p})
    close(got[1], want["X"])
    close(got[2], tuple(want[n] for n in (("h0", "c0") if lstm else ("h0",))))


def test_state_forms_and_errors(rng):
    p, X, s0, _ = make("lstm", 1, rng)
    out, (hT, cT) = fj.rnn(p, X, (s0[0][0], s0[1][0]))          # (B,H) for one layer: (B,H) back
    assert out.shape == (T, B, H) and hT.shape == cT.shape == (B, H)
    out, (hT, cT) = fj.rnn(p, X)
    assert hT.shape == cT.shape == (1, B, H)
    head = dict(p, W_hq=jnp.ones((H, 2)), b_q=jnp.ones(2))
    close(fj.rnn(head, X)[0], out)
    with pytest.raises(ValueError, match="cell='gru' expects"):
        fj.rnn(p, X, cell="gru")
    with pytest.raises(TypeError, match=r"\(h0, c0\)"):
        fj.rnn(p, X, s0[0])
    with pytest.raises(ValueError, match="D=5"):
        fj.rnn(p, jnp.ones((T, B, 5)))
    with pytest.raises(ValueError, match="activation"):
        fj.rnn(p, X, activation="relu")


def test_an_lstm_state_part_given_as_none_is_zeros_and_bad_parts_name_their_argument(rng):
    p, X, s0, _ = make("lstm", 1, rng)
    zeros = jnp.zeros((1, B, H))
    close(fj.rnn(p, X, (s0[0], None)), fj.rnn(p, X, (s0[0], zeros)))
    close(fj.rnn(p, X, (None, s0[1])), fj.rnn(p, X, (zeros, s0[1])))
    close(fj.rnn(p, X, (None, None)), fj.rnn(p, X))
    with pytest.raises(TypeError, match=r"^h0: expected an array, got dict"):
        fj.rnn(make("rnn", 1, rng)[0], X, {"h": 1})
    with pytest.raises(ValueError, match=r"^params\['W_xh'\]: empty shape \(0, 4\)"):
        fj.rnn({"W_xh": jnp.zeros((0, 4)), "W_hh": jnp.zeros((4, 4)), "b_h": jnp.zeros(4)}, jnp.zeros((5, 2, 0)))


def test_eager_calls_reuse_one_function_and_its_callbacks(rng):
    # a callback JAX has not seen is compiled anew on every call, and what it compiled is kept:
    # memory grew without bound and every eager step compiled
    p, X, s0, _ = make("gru", 1, rng)
    grad = jax.grad(lambda p: fj.rnn(p, X)[0].sum())
    fj._core.cache_clear()
    first = grad(p)
    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiled.append(event) if "backend_compile" in event else None)
    for _ in range(3):
        close(grad(p), first)
    assert fj._core.cache_info().misses == 1 and not compiled


_SHARDED = """
import os; os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax; jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
import fastbptt, fastbptt.jax as fj
params = {k: jnp.asarray(v, jnp.float64) for k, v in fastbptt.init_params(3, 4, 2, seed=0, cell="{cell}").items()
          if not k.endswith("q")}
X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4, 3)))
mesh = Mesh(np.array(jax.devices()), ("b",))
loss = lambda p, X: jnp.sum(jnp.sin(fj.rnn(p, X)[0]))
spread = jax.shard_map(lambda p, X: jax.lax.psum(loss(p, X), "b"), mesh=mesh, in_specs=(P(), P(None, "b")),
                       out_specs=P())
want = jax.grad(loss, argnums=(0, 1))(params, X)
got = jax.jit(jax.grad(spread, argnums=(0, 1)))(params, X)
print(max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))))
"""


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_a_batch_split_over_devices_by_shard_map_sums_the_weights_gradients(cell):
    # the weights are the same on every device, the batch is split: their gradient is the sum
    # of the devices' (it was one device's times their number), and ∂L/∂X each device's own
    if not hasattr(jax, "shard_map"):
        pytest.skip("this JAX has no jax.shard_map")
    out = subprocess.run([sys.executable, "-c", _SHARDED.replace("{cell}", cell)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout) < 1e-12


def test_jax_stays_optional():
    code = ("import sys; import fastbptt; assert 'jax' not in sys.modules, 'import fastbptt imported jax'\n"
            "sys.modules['jax'] = None\n"
            "try:\n    import fastbptt.jax\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install fastbptt[jax]" in out.stdout


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_nan_flows_as_in_the_scan(cell, rng):
    # a NaN in the input is not an error under jax.grad: it reaches what it reaches in the scan
    p, X, s0, w = make(cell, 2, rng)
    X = X.at[2, 1, 0].set(jnp.nan)
    ours, ref = losses(cell, 2, w, True)
    got = jax.grad(ours, argnums=(0, 1, 2))(p, X, s0)
    want = jax.grad(ref, argnums=(0, 1, 2))(p, X, s0)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
        np.testing.assert_allclose(a[np.isfinite(b)], b[np.isfinite(b)], rtol=1e-9, atol=1e-10)
    assert not all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(got))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_backward_uses_the_kept_forward_or_recomputes_it(cell, rng, monkeypatch):
    # differentiation keeps the forward for its backward (no second forward); a backward that
    # finds it gone (more forwards than _Kept.MAX before it) recomputes it: the same gradients
    p, X, s0, w = make(cell, 2, rng)
    ours, ref = losses(cell, 2, w, True)
    want = jax.grad(ref, argnums=(0, 1, 2))(p, X, s0)
    calls = []
    for fn in ("rnn_backward", "kept_backward"):
        real = getattr(fastbptt.api, fn)
        monkeypatch.setattr(fastbptt.api, fn, lambda *a, _f=real, _n=fn, **k: calls.append(_n) or _f(*a, **k))
    close(jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(p, X, s0), want)
    assert calls == ["kept_backward"] and not fj._kept.forwards
    calls.clear()
    monkeypatch.setattr(fj._kept, "MAX", 0)
    close(jax.grad(ours, argnums=(0, 1, 2))(p, X, s0), want)
    assert calls == ["rnn_backward"]


def test_vmapped_forwards_each_keep_their_own(rng):
    p, X, s0, w = make("lstm", 1, rng)
    Xs = jnp.stack([X, 0.5 * X, -X])

    def loss(p, X):
        out, (h, c) = fj.rnn(p, X)
        return jnp.sum(out * w["o"]) + jnp.sum(c * w["s"][1])

    def ref_loss(p, X):
        out, (h, c) = ref_rnn(p, X, tuple(jnp.zeros_like(s) for s in s0), "lstm", 1)
        return jnp.sum(out * w["o"]) + jnp.sum(c * w["s"][1])
    got = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0))(p, Xs)
    want = jax.vmap(jax.grad(ref_loss, argnums=(0, 1)), in_axes=(None, 0))(p, Xs)
    close(got, want)


@pytest.mark.parametrize("argnums", [(0,), (0, 1)])
def test_input_gradient_only_where_asked_for(argnums, rng, monkeypatch):
    # JAX's symbolic zeros: ∂L/∂X is computed only when X is differentiated, and the last
    # states' cotangents are passed only when the loss reads them
    p, X, s0, w = make("gru", 1, rng)
    seen = []
    real = fastbptt.api.kept_backward
    monkeypatch.setattr(fastbptt.api, "kept_backward",
                        lambda *a, **k: seen.append((k["input_grad"], k["dh_T"] is None)) or real(*a, **k))
    ours, ref = losses("gru", 1, w, True, state_terms=False)
    close(jax.grad(ours, argnums=argnums)(p, X, s0), jax.grad(ref, argnums=argnums)(p, X, s0))
    assert seen == [(1 in argnums, True)]


def test_every_engine_call_runs_on_one_thread(rng, monkeypatch):
    # XLA runs callbacks on several threads; the bridge's engine calls all run on its one worker
    import threading
    p, X, s0, w = make("gru", 1, rng)
    ours, ref = losses("gru", 1, w, True)
    threads = set()
    for fn in ("rnn_forward", "kept_backward"):
        real = getattr(fastbptt.api, fn)
        monkeypatch.setattr(fastbptt.api, fn,
                            lambda *a, _f=real, **k: threads.add(threading.current_thread().name) or _f(*a, **k))
    g = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))
    for _ in range(4):
        close(g(p, X, s0), jax.grad(ref, argnums=(0, 1, 2))(p, X, s0))
    assert len(threads) == 1 and threads.pop().startswith("fastbptt-jax")


def test_an_error_in_the_engine_reaches_the_caller(rng):
    p, _, s0, w = make("lstm", 1, rng)
    ids = jnp.asarray(rng.integers(0, D, (T, B))).at[1, 1].set(D + 3)      # a token id out of range
    with pytest.raises(ValueError, match=r"X: token id 7 out of range"):   # eager: checked up front
        fj.rnn(p, ids)
    with pytest.raises(Exception, match=r"X: token id 7 out of range"):    # traced: from the engine
        jax.block_until_ready(jax.jit(lambda i: fj.rnn(p, i)[0])(ids))


def test_float64_numpy_params_without_x64():
    """jax's default (no jax_enable_x64): float64 numpy params compute in float32, as jnp does"""
    p64 = fastbptt.init_params(D, H, 2, cell="gru", dtype=np.float64, seed=0)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    ids = np.arange(T * B).reshape(T, B) % D
    jax.config.update("jax_enable_x64", False)
    try:
        outs = [fj.rnn(p, ids)[0] for p in (p64, p32)]
        grads = [jax.grad(lambda q: fj.rnn(q, ids)[0].sum())(p) for p in (p64, p32)]
    finally:
        jax.config.update("jax_enable_x64", True)
    assert outs[0].dtype == jnp.float32
    np.testing.assert_array_equal(outs[0], outs[1])
    for k in p64:
        np.testing.assert_array_equal(grads[0][k], grads[1][k])


def test_forwards_whose_backward_never_runs_are_bounded(rng):
    # jax.vjp runs the differentiating forward; a vjp function never called leaves its forward in
    # the table, which keeps at most MAX of them (the oldest dropped first)
    p, X, s0, w = make("lstm", 1, rng)
    fj._kept.forwards.clear()
    for _ in range(3 * fj._kept.MAX):
        out, vjp = jax.vjp(lambda p: fj.rnn(p, X)[0], p)
        jax.block_until_ready(out)
    assert len(fj._kept.forwards) == fj._kept.MAX
    got = vjp(jnp.ones_like(out))                          # the last one's is still there
    want = jax.vjp(lambda p: ref_rnn(p, X, tuple(jnp.zeros_like(s) for s in s0), "lstm", 1)[0], p)[1](
        jnp.ones_like(out))
    close(got, want)
