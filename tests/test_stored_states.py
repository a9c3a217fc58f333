"""Memory-bounded BPTT (``stored_states``): the schedules, and gradients equal to storing every
state for every cell, depth, truncation and n from 1 to T; peak memory in a subprocess."""
import json
import subprocess
import sys
import textwrap
from functools import lru_cache

import numpy as np
import pytest

import fastbptt
from fastbptt import _model, schedule

CELLS = ["rnn", "gru", "lstm"]
TRUNCATIONS = {"full": None, "truncated1": fastbptt.Truncated(1), "truncated3": fastbptt.Truncated(3),
               "randomized": fastbptt.Randomized(0.5, seed=11)}
TOL = {np.float64: 1e-12, np.float32: 1e-5}


# ------------------------------------------------------------------------------ schedules
@lru_cache(maxsize=None)
def fewest(l, s):
    """the fewest advances reversing l steps with s slots, by exhaustive search over the first
    kept state (independent of the closed form)"""
    if l <= 1:
        return 0
    if s == 1:
        return l * (l - 1) // 2
    return min(m + fewest(l - m, s - 1) + fewest(m, s) for m in range(1, l))


def simulate(actions, T, n=None):
    """carry out a schedule on positions only: every action legal, every step reversed once, top
    down, never more than n states kept; returns (advances, most kept)"""
    slots, cur, adjoint, most, advanced = {0}, 0, T, 1, 0
    for action in actions:
        kind, a = action[0], action[1]
        if kind == "restore":
            assert a in slots, action
            cur = a
        elif kind == "advance":
            assert cur == a and action[2] > a, action
            advanced += action[2] - a
            cur = action[2]
            if action[3]:
                slots.add(cur)
                most = max(most, len(slots))
        elif kind == "free":
            slots.remove(a)
        else:
            assert kind == "reverse" and cur == a and adjoint == action[2] > a, action
            adjoint = a
    assert adjoint == 0
    if n is not None:
        assert most <= n
    return advanced, most


def test_binomial_formula_is_the_fewest_advances():
    for s in range(1, 6):
        for l in range(1, 40):
            assert schedule.forward_steps(l, s) == fewest(l, s), (l, s)


@pytest.mark.parametrize("n", range(1, 13))
def test_revolve_advances_equal_the_binomial_formula(n):
    for T in range(1, 120):
        advanced, _ = simulate(schedule.revolve(T, n), T, n)
        assert advanced == schedule.forward_steps(T, n), (T, n)


def test_revolve_at_scale():
    T, n = 100_000, 20
    r = schedule.repetitions(T, n)
    assert schedule.beta(n, r - 1) < T <= schedule.beta(n, r)
    advanced, most = simulate(schedule.revolve(T, n), T, n)
    assert advanced == schedule.forward_steps(T, n) == r * T - schedule.beta(n + 1, r - 1)
    assert most == n
    assert advanced < r * T


@pytest.mark.parametrize("T", [1, 2, 3, 10, 99, 100, 1000, 20_000])
def test_sqrt_segments(T):
    actions = schedule.segments(T)
    advanced, most = simulate(actions, T)
    m = schedule.window(T, "sqrt")
    assert most == -(-T // m) and abs(most - np.sqrt(T)) <= 2
    assert advanced == m * (most - 1) <= T - 1 or T == 1
    assert [a[2] - a[1] for a in actions if a[0] == "reverse"][1:] == [m] * (most - 1)


def test_executed_steps_are_the_schedules(monkeypatch, rng):
    """the executor merges runs of advances and of reversals but computes exactly the steps the
    schedule names: the advances plus each step once more for its reversal"""
    seen = []
    real = _model._bounded
    monkeypatch.setattr(_model, "_bounded", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    T = 23
    P = fastbptt.init_params(5, 4, 5, np.float64, seed=0, cell="gru")
    X, Y = rng.integers(0, 5, (T, 2)), rng.integers(0, 5, (T, 2))
    for n in (1, 2, 3, 5, 8, T - 1):
        fastbptt.loss_and_grad(P, X, Y, stored_states=n)
        assert seen[-1].steps == schedule.forward_steps(T, n) + T, n
    before = len(seen)
    fastbptt.loss_and_grad(P, X, Y, stored_states=T)          # n >= T keeps every state: None's path
    assert len(seen) == before
    fastbptt.loss_and_grad(P, X, Y, stored_states="sqrt")
    assert seen[-1].steps == schedule.advances(schedule.segments(T)) + T


# ------------------------------------------------------------------------------ gradients
def case(rng, cell, L, dense, dtype, T=7, B=2, D=4, H=3, Q=5, state=True):
    P = fastbptt.init_params(D, H, Q, dtype, seed=int(rng.integers(1 << 30)), cell=cell, num_layers=L)
    for k in P:      # large enough that every nonlinearity is in play
        P[k] = (P[k] * 60 if k.startswith("W") else P[k] + rng.normal(0, 0.3, P[k].shape)).astype(dtype)
    X = rng.normal(0, 1, (T, B, D)).astype(dtype) if dense else rng.integers(0, D, (T, B))
    Y = rng.integers(0, Q, (T, B))
    shape = (L, B, H) if L > 1 else (B, H)
    h0 = rng.normal(0, 0.5, shape).astype(dtype) if state else None
    if cell == "lstm" and state:
        h0 = (h0, rng.normal(0, 0.5, shape).astype(dtype))
    return P, X, Y, h0


def close(got, want, dtype, name):
    want = np.asarray(want, np.float64)
    err = float(np.abs(np.asarray(got, np.float64) - want).max())
    assert err <= TOL[dtype] * max(1.0, float(np.abs(want).max())), (name, err)


def states(s, cell):
    return s if cell == "lstm" else (s,)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("truncation", TRUNCATIONS.values(), ids=TRUNCATIONS.keys())
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_loss_and_grad_equal_storing_every_state(cell, L, truncation, dtype, rng):
    P, X, Y, h0 = case(rng, cell, L, dense=L == 2, dtype=dtype)
    T = X.shape[0]
    loss, grads, last = fastbptt.loss_and_grad(P, X, Y, h0, truncation=truncation)
    for n in ["sqrt"] + list(range(1, T + 2)):
        l2, g2, s2 = fastbptt.loss_and_grad(P, X, Y, h0, truncation=truncation, stored_states=n)
        assert abs(l2 - loss) <= TOL[dtype] * max(1.0, abs(loss)), n
        assert set(g2) == set(grads), n
        for k in grads:
            assert g2[k].dtype == grads[k].dtype and g2[k].shape == grads[k].shape, (n, k)
            close(g2[k], grads[k], dtype, (n, k))
        for got, want in zip(states(s2, cell), states(last, cell)):
            close(got, want, dtype, (n, "state"))


@pytest.mark.parametrize("truncation", TRUNCATIONS.values(), ids=TRUNCATIONS.keys())
@pytest.mark.parametrize("cell", CELLS)
def test_rnn_backward_equal_storing_every_state(cell, truncation, rng):
    """with dense input, its gradient too (what a layer below or a framework needs)"""
    P, X, Y, h0 = case(rng, cell, 2, dense=True, dtype=np.float64)
    Hs = fastbptt.rnn_forward(P, X, h0)
    dHs = rng.normal(0, 1, Hs.shape)
    before = dHs.copy()
    want = fastbptt.rnn_backward(P, X, Hs, dHs, h0, truncation=truncation, input_grad=True)
    for n in ("sqrt", 1, 2, 4):
        got = fastbptt.rnn_backward(P, X, Hs, dHs, h0, truncation=truncation, input_grad=True, stored_states=n)
        assert set(got) == set(want) and "X" in got
        for k in want:
            close(got[k], want[k], np.float64, (n, k))
    assert np.array_equal(dHs, before)


@pytest.mark.parametrize("cell", CELLS)
def test_degenerate_sizes_and_no_state(cell, rng):
    for T, B, H in ((1, 1, 1), (2, 1, 1), (5, 1, 2)):
        P, X, Y, _ = case(rng, cell, 2, dense=False, dtype=np.float64, T=T, B=B, H=H, state=False)
        loss, grads, last = fastbptt.loss_and_grad(P, X, Y, truncation=fastbptt.Truncated(1))
        full = fastbptt.loss_and_grad(P, X, Y)
        for n in ("sqrt", 1, 2, 9):
            l2, g2, _ = fastbptt.loss_and_grad(P, X, Y, truncation=fastbptt.Truncated(1), stored_states=n)
            assert abs(l2 - loss) <= 1e-12 * max(1, abs(loss))
            for k in grads:
                close(g2[k], grads[k], np.float64, (T, B, H, n, k))
            l3, g3, _ = fastbptt.loss_and_grad(P, X, Y, stored_states=n)
            for k in grads:
                close(g3[k], full[1][k], np.float64, (T, B, H, n, k, "full"))


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "half", [3]])
def test_bad_stored_states_name_the_argument(bad, rng):
    P, X, Y, h0 = case(rng, "rnn", 1, dense=False, dtype=np.float64)
    with pytest.raises((ValueError, TypeError), match="stored_states"):
        fastbptt.loss_and_grad(P, X, Y, h0, stored_states=bad)
    with pytest.raises((ValueError, TypeError), match="stored_states"):
        fastbptt.rnn_backward(P, X, np.zeros((7, 2, 3)), np.zeros((7, 2, 3)), h0, stored_states=bad)


def test_kept_forward_and_stored_states_exclude_each_other(rng):
    P, X, Y, h0 = case(rng, "gru", 1, dense=False, dtype=np.float64)
    Hs, _, kept = fastbptt.rnn_forward(P, X, h0, keep=True)
    with pytest.raises(ValueError, match="stored_states"):
        fastbptt.rnn_backward(P, X, Hs, np.ones_like(Hs), h0, forward=kept, stored_states="sqrt")


# -------------------------------------------------------------------------------- memory
PEAK = textwrap.dedent("""
    import json, sys, tracemalloc
    import numpy as np
    import fastbptt
    cell, T, stored = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    B, H, V = 16, 128, 40
    P = fastbptt.init_params(V, H, V, seed=0, cell=cell)
    rng = np.random.default_rng(0)
    X, Y = rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))
    fastbptt.loss_and_grad(P, X[:4], Y[:4], stored_states=stored)      # compile, outside the count
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    fastbptt.loss_and_grad(P, X, Y, stored_states=stored)
    print(json.dumps(tracemalloc.get_traced_memory()[1] - base))
""")


def peak_bytes(cell, T, stored):
    out = subprocess.run([sys.executable, "-c", PEAK, cell, str(T), json.dumps(stored)], check=True,
                         capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_peak_memory_in_a_subprocess(cell):
    """a call's peak allocations (numpy's, traced) beyond the states it must keep: "sqrt" and
    a few n within a quarter of storing every state at T = 2000"""
    T, B, H = 2000, 16, 128
    states = (T + 1) * B * H * 4 * (2 if cell == "lstm" else 1)       # h (and c) of every step
    every = peak_bytes(cell, T, None)
    assert every >= states                                          # it keeps them all, and more
    for stored in ("sqrt", 100):
        assert peak_bytes(cell, T, stored) <= 0.25 * every, stored


# ------------------------------------------------------------------------------- trainer
def test_trainer_takes_stored_states(tmp_path):
    """the same run (float32: the same perplexities to the order of summation) whatever it keeps;
    the checkpoint records it and a resume may change it"""
    from fastbptt import cli, trainer
    kw = dict(hidden=16, num_steps=12, batch_size=4, max_chars=600, epochs=2, quiet=True, cell="lstm")
    ref = trainer.train(**kw)
    for stored in ("sqrt", 3):
        got = trainer.train(stored_states=stored, **kw)
        for a, b in zip(got.history, ref.history):
            assert abs(a["train_ppl"] - b["train_ppl"]) <= 1e-4 * b["train_ppl"]
    ck = tmp_path / "ck.npz"

    def run(*argv):
        with pytest.raises(SystemExit) as e:
            cli.main(list(argv))
        return e.value.code
    assert run("train", "--hidden", "16", "--num-steps", "12", "--batch-size", "4", "--max-chars", "600",
               "--epochs", "1", "--quiet", "--stored-states", "2", "--checkpoint", str(ck)) == 0
    assert trainer.load_checkpoint(ck)[2]["config"].stored_states == 2
    assert run("train", "--epochs", "2", "--quiet", "--stored-states", "all", "--checkpoint", str(ck),
               "--resume") == 0
    assert trainer.load_checkpoint(ck)[2]["config"].stored_states is None
    with pytest.raises(ValueError, match="stored_states"):
        trainer.train(stored_states="half", **kw)
