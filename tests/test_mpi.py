"""Data-parallel training: the step and the trainer on a fake communicator of threads (in
process), ``mpiexec -n 2 fastbptt train`` against one process, and the error paths."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import fastbptt
from fastbptt import api, distributed, trainer

#: float32 runs of N ranks against one process: the gradients sum in another order (per
#: rank, then across), which moved the perplexities by ≤ 2e-7 relative over 3 epochs
PPL_RTOL = 1e-5
TINY = dict(max_chars=2000, hidden=16, num_steps=8, batch_size=4, val_fraction=0.2, quiet=True,
            sample_prefixes=())
MODELS = [("rnn", 1), ("rnn", 2), ("gru", 1), ("gru", 2), ("lstm", 1), ("lstm", 2)]


class ThreadComm:
    """Rank ``rank`` of ``shared.size`` ranks that are threads of this process: each
    collective call meets the others' at a barrier (so a rank that never comes breaks it)."""

    def __init__(self, shared, rank):
        self.shared, self.rank, self.size = shared, rank, shared.size
        self.allreduces = 0

    def _exchange(self, obj):
        sh = self.shared
        sh.slots[self.rank] = obj
        sh.barrier.wait()
        out = list(sh.slots)
        sh.barrier.wait()
        return out

    def allreduce(self, buf):
        self.allreduces += 1
        parts = self._exchange(buf.copy())
        total = parts[0].copy()
        for p in parts[1:]:
            total += p
        buf[...] = total
        return buf

    def bcast(self, obj):                    # pickled, as MPI does: every rank gets its own copy
        return pickle.loads(pickle.dumps(self._exchange(obj)[0]))

    def allgather(self, obj):
        return pickle.loads(pickle.dumps(self._exchange(obj)))

    def local_size(self):
        return self.size

    def abort(self, code=2):
        self.shared.barrier.abort()
        raise SystemExit(code)


def run_ranks(n, fn, timeout=120):
    """``fn(comm)`` on n threads, rank r on thread ``rank{r}``; returns (results, errors)."""
    shared = type("Shared", (), {})()
    shared.size, shared.slots, shared.barrier = n, [None] * n, threading.Barrier(n, timeout=timeout)
    results, errors = [None] * n, [None] * n

    def work(r):
        try:
            results[r] = fn(ThreadComm(shared, r))
        except BaseException as e:          # noqa: B036 — SystemExit of an abort too
            errors[r] = e

    threads = [threading.Thread(target=work, args=(r,), name=f"rank{r}") for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a rank hung"
    return results, errors


def key(history, names=("train_ppl", "val_ppl")):
    return np.array([[r[k] for k in names] for r in history], float)


# ------------------------------------------------------------------- the communicator
def test_import_fastbptt_never_imports_mpi4py():
    code = ("import sys, fastbptt, fastbptt.distributed as d, fastbptt.cli; "
            "assert d.communicator().size == 1; assert 'mpi4py' not in sys.modules, 'imported'")
    env = {k: v for k, v in os.environ.items() if k not in distributed.SIZE_VARIABLES + ("PMIX_RANK",)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_launched_reads_the_launchers_variables(monkeypatch):
    for name in distributed.SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched() == 1
    monkeypatch.setenv("PMI_SIZE", "4")
    assert distributed.launched() == 4
    monkeypatch.setenv("PMI_SIZE", "1")                  # mpiexec -n 1: one process
    assert isinstance(distributed.communicator(), distributed.SelfComm)
    monkeypatch.delenv("PMI_SIZE")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")      # a Slurm step, but no MPI launch
    assert distributed.launched() == 1
    monkeypatch.setenv("PMIX_RANK", "0")                 # srun --mpi=pmix
    assert distributed.launched() == 8
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert isinstance(distributed.communicator(), distributed.SelfComm)


def test_comm_argument_is_checked():
    with pytest.raises(TypeError, match="^comm: expected an mpi4py communicator"):
        distributed.communicator(object())
    with pytest.raises(TypeError, match="^comm: expected an mpi4py communicator"):
        fastbptt.train(**TINY, epochs=1, comm=3)


def test_threads_per_rank_share_the_cores(monkeypatch):
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    two = type("C", (), {"size": 2, "local_size": lambda self: 2})()
    assert distributed.threads_per_rank(two, mine=2, node=2) == 1          # mpiexec -n 2 on 2 cores
    assert distributed.threads_per_rank(two, mine=16, node=16) == 8
    assert distributed.threads_per_rank(two, mine=4, node=16) == 4         # bound by the launcher to 4
    three = type("C", (), {"size": 3, "local_size": lambda self: 3})()
    assert distributed.threads_per_rank(three, mine=2, node=2) == 1        # oversubscribed: still 1
    assert distributed.threads_per_rank(distributed.SelfComm(), mine=16, node=16) is None   # one process
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    assert distributed.threads_per_rank(two, mine=16, node=16) is None     # the user's word wins


def test_rank_columns_tile_the_batch():
    for n in (1, 2, 3, 4):
        cols = [trainer.rank_columns(12, type("C", (), {"rank": r, "size": n})()) for r in range(n)]
        assert cols[0][0] == 0 and cols[-1][1] == 12
        assert all(a[1] == b[0] for a, b in zip(cols, cols[1:]))


# ------------------------------------------------------------ the data-parallel step
@pytest.mark.parametrize("cell, layers", MODELS)
def test_reduced_step_is_the_one_process_gradient(cell, layers, rng):
    """Each rank's columns through GradReducer, summed by a 2-rank Allreduce, give the
    loss and gradient of the whole batch, and each rank's state is its columns of it."""
    T, B, V, H = 7, 6, 11, 5
    params = api.init_params(V, H, V, np.float64, seed=1, cell=cell, num_layers=layers)
    params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}
    X, Y = rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))
    want_loss, want, want_state = api.loss_and_grad(params, X, Y)

    def rank(comm):
        lo, hi = trainer.rank_columns(B, comm)
        loss, grads, state = api.loss_and_grad(params, X[:, lo:hi], Y[:, lo:hi])
        loss, grads = trainer.GradReducer(params, comm, B)(loss, grads)
        return loss, {k: g.copy() for k, g in grads.items()}, state, comm.allreduces

    results, errors = run_ranks(2, rank)
    assert errors == [None, None]
    for r, (loss, grads, state, calls) in enumerate(results):
        assert calls == 1                                    # one Allreduce carries everything
        assert loss == pytest.approx(want_loss, rel=1e-12)
        assert set(grads) == set(params)                     # no h0/c0: they are not reduced
        for k in params:
            np.testing.assert_allclose(grads[k], want[k], rtol=1e-10, atol=1e-14, err_msg=k)
        lo, hi = (0, 3) if r == 0 else (3, 6)
        for got, full in zip(state if isinstance(state, tuple) else (state,),
                             want_state if isinstance(want_state, tuple) else (want_state,)):
            np.testing.assert_allclose(got, full[..., lo:hi, :], rtol=1e-12)


def train_ranks(n, **kw):
    results, errors = run_ranks(n, lambda comm: fastbptt.train(**TINY, comm=comm, **kw))
    assert errors == [None] * n, errors
    return results


@pytest.mark.parametrize("cell, layers, opts", [("rnn", 1, {}), ("lstm", 2, dict(optimizer="adam", lr=0.01)),
                                                ("gru", 2, dict(sampling="random", truncation="random:0.5"))])
def test_two_ranks_train_as_one_process(tmp_path, cell, layers, opts):
    one = fastbptt.train(**TINY, cell=cell, num_layers=layers, epochs=3, **opts)
    ck, log = tmp_path / "ck.npz", tmp_path / "log.jsonl"
    two = train_ranks(2, cell=cell, num_layers=layers, epochs=3, checkpoint=ck, json_log=log, **opts)
    # Adam divides by √v: a near-zero gradient's rounding moves its step by up to lr
    tol = dict(rtol=0, atol=2 * opts["lr"]) if opts.get("optimizer") == "adam" else dict(rtol=1e-4, atol=1e-6)
    for res in two:
        np.testing.assert_allclose(key(res.history), key(one.history), rtol=PPL_RTOL)
        for k in one.params:
            np.testing.assert_allclose(res.params[k], one.params[k], err_msg=k, **tol)
    for k in one.params:                                      # the ranks hold the same model
        np.testing.assert_array_equal(two[0].params[k], two[1].params[k])
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz", "log.jsonl"]


def test_two_ranks_resume_from_rank0s_checkpoint(tmp_path):
    ck = tmp_path / "ck.npz"
    one = fastbptt.train(**TINY, epochs=3)
    train_ranks(2, epochs=2, checkpoint=ck)
    resumed = train_ranks(2, epochs=3, checkpoint=ck, resume=True)
    np.testing.assert_allclose(key(resumed[1].history), key(one.history), rtol=PPL_RTOL)


def test_batch_that_does_not_divide_fails_on_every_rank():
    _, errors = run_ranks(2, lambda comm: fastbptt.train(**dict(TINY, batch_size=5), epochs=1, comm=comm))
    assert [str(e) for e in errors] == ["batch_size: 5 does not divide across 2 MPI ranks: give a multiple "
                                        "of 2 (each rank computes batch_size/2 streams)"] * 2
    assert all(isinstance(e, ValueError) and distributed.is_collective(e) for e in errors)


def test_an_error_of_one_rank_is_raised_on_every_rank(monkeypatch, tmp_path):
    real = trainer.check_memory

    def check(cfg, V):                                       # rank 1 alone finds no memory
        if threading.current_thread().name == "rank1":
            raise ValueError("hidden: not enough memory on this node")
        return real(cfg, V)

    monkeypatch.setattr(trainer, "check_memory", check)
    _, errors = run_ranks(2, lambda comm: fastbptt.train(**TINY, epochs=1, comm=comm))
    assert [(type(e), str(e), e.failed_rank) for e in errors] == \
        [(ValueError, "hidden: not enough memory on this node", 1)] * 2
    # rank 0 alone checks the outputs (it alone writes them): rank 1 gets its error
    _, errors = run_ranks(2, lambda comm: fastbptt.train(**TINY, epochs=1, comm=comm,
                                                         json_log=tmp_path / "no" / "log.jsonl"))
    assert [str(e) for e in errors] == [f"json_log: no such folder: {tmp_path / 'no'}"] * 2


def test_ranks_given_other_options_or_another_text_fail_on_every_rank(tmp_path):
    """each rank's own command line and file (MPMD, or one path holding other files on other
    nodes) must agree: the first option where a rank differs from rank 0 is named on every
    rank before training (a rank with more epochs would wait for the others forever)"""
    def other_epochs(comm):
        return fastbptt.train(**TINY, epochs=2 + comm.rank, comm=comm)
    _, errors = run_ranks(2, other_epochs)
    assert [str(e) for e in errors] == ["epochs: rank 1 has 3, rank 0 2: every rank must train the same model "
                                        "on the same text"] * 2
    assert all(isinstance(e, ValueError) and distributed.is_collective(e) for e in errors)
    # train()'s own keywords too: a rank with a deadline (a broadcast every epoch) or a log
    _, errors = run_ranks(2, lambda comm: fastbptt.train(**TINY, epochs=2, comm=comm,
                                                         max_minutes=None if comm.rank else 5.0))
    assert [str(e) for e in errors] == ["max_minutes: rank 1 has None, rank 0 5.0: every rank must train the "
                                        "same model on the same text"] * 2
    texts = [tmp_path / f"node{r}.txt" for r in range(2)]
    for r, t in enumerate(texts):
        t.write_text(fastbptt.data.load_text()[r * 1000:r * 1000 + 3000])
    _, errors = run_ranks(2, lambda comm: fastbptt.train(**TINY, text=texts[comm.rank], epochs=1, comm=comm))
    assert all(str(e).startswith("text: rank 1 has 'a text of sha256 ") for e in errors), errors


def test_a_usage_error_under_mpiexec_is_said_by_rank_0_alone(monkeypatch, capsys):
    from fastbptt import cli
    for rank, said in (("1", ""), ("0", "fastbptt: error: unrecognized arguments: --bogus (see fastbptt --help)\n")):
        monkeypatch.setenv("PMI_RANK", rank)
        assert distributed.launched_rank() == int(rank)
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "--bogus"])
        assert e.value.code == 2 and capsys.readouterr().err == said


def test_a_failed_write_of_rank0_ends_every_rank(monkeypatch, tmp_path):
    real = trainer.save_checkpoint

    def save(path, *a):
        if a[-3] == 2:                                        # epoch 2: the disk is full
            raise OSError(28, "No space left on device")
        real(path, *a)

    monkeypatch.setattr(trainer, "save_checkpoint", save)
    ck = tmp_path / "ck.npz"
    _, errors = run_ranks(2, lambda comm: fastbptt.train(**TINY, epochs=3, checkpoint=ck, comm=comm))
    assert [type(e) for e in errors] == [trainer.OutputError] * 2
    assert "the checkpoint of epoch 1 is kept" in str(errors[1])
    assert trainer.load_checkpoint(ck)[2]["epoch"] == 1


def test_an_exception_on_one_rank_aborts_the_job(monkeypatch, capsys):
    real = api.loss_and_grad

    def flaky(*a, **k):
        if threading.current_thread().name == "rank1":
            raise RuntimeError("bad node")
        return real(*a, **k)

    monkeypatch.setattr(api, "loss_and_grad", flaky)
    _, errors = run_ranks(2, lambda comm: fastbptt.train(**TINY, epochs=1, comm=comm), timeout=60)
    # rank 1 called abort(2); rank 0's Allreduce failed instead of waiting (MPI kills it)
    assert [type(e) for e in errors] == [SystemExit] * 2 and errors[1].code == 2
    assert "fastbptt train: error: rank 1 of 2: RuntimeError: bad node; ending every rank" in capsys.readouterr().err


# -------------------------------------------------------------------------- mpiexec -n 2
def mpiexec():
    """The mpiexec beside this Python (the ``mpi`` extra's), else the one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


needs_mpiexec = pytest.mark.skipif(
    mpiexec() is None or __import__("importlib.util").util.find_spec("mpi4py") is None,
    reason="needs mpiexec and mpi4py: pip install fastbptt[mpi]")

CLI_TINY = ["--max-chars", 2000, "--hidden", 16, "--num-steps", 8, "--batch-size", 4, "--val-fraction", 0.2,
            "--quiet"]


def run_mpi(n, args, cwd, *, code=None, timeout=120):
    """``mpiexec -n n`` of ``fastbptt train ARGS`` (or of python -c CODE with ARGS as argv)."""
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe")
    prog = ["-c", code] if code else ["-m", "fastbptt", "train"]
    cmd = [mpiexec(), "-n", str(n), sys.executable, *prog, *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@needs_mpiexec
def test_mpiexec_two_ranks_equal_one_process_every_epoch(tmp_path):
    one = fastbptt.train(**TINY, epochs=4)
    p = run_mpi(2, [*CLI_TINY, "--epochs", 3, "--json-log", "log.jsonl", "--checkpoint", "ck.npz"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("epoch 3: perplexity") == 1 and "(2 MPI ranks)" in p.stdout     # rank 0 alone prints
    p = run_mpi(2, [*CLI_TINY, "--epochs", 4, "--json-log", "log.jsonl", "--checkpoint", "ck.npz", "--resume"],
                tmp_path)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    np.testing.assert_allclose(key(rows), key(one.history), rtol=PPL_RTOL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz", "log.jsonl"]


@needs_mpiexec
def test_mpiexec_batch_that_does_not_divide_exits_2(tmp_path):
    p = run_mpi(2, [*CLI_TINY[:-5], "--batch-size", 5, "--epochs", 1], tmp_path, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip() == ("fastbptt train: error: --batch-size: 5 does not divide across 2 MPI ranks: "
                                "give a multiple of 2 (each rank computes batch_size/2 streams)")


#: rank 1 fails in its second epoch's first minibatch: an exception, or killed outright
FAIL_RANK1 = """
import os, signal, sys
from fastbptt import api, cli
real, calls = api.loss_and_grad, [0]
def failing(*a, **k):
    calls[0] += 1
    if os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK")) == "1" and calls[0] == 60:
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("bad node")
    return real(*a, **k)
api.loss_and_grad = failing
cli.main(["train", *sys.argv[2:]])
"""


@needs_mpiexec
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_mpiexec_a_rank_that_dies_ends_the_job(tmp_path, how):
    p = run_mpi(2, [how, *CLI_TINY, "--epochs", 3, "--checkpoint", "ck.npz"], tmp_path, code=FAIL_RANK1, timeout=90)
    if how == "raise":
        assert p.returncode == 2, p.stderr
        assert "fastbptt train: error: rank 1 of 2: RuntimeError: bad node; ending every rank" in p.stderr
    else:
        assert p.returncode != 0
    # no half-written .tmp file (the checkpoint's lock file stays when its holder is ended: harmless)
    assert {q.name for q in tmp_path.iterdir()} - {".ck.npz.lock"} == {"ck.npz"}
    assert trainer.load_checkpoint(tmp_path / "ck.npz")[2]["epoch"] == 1     # epoch 1's, whole


def test_mpiexec_without_mpi4py_is_one_line_and_exit_2(monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mpi4py" else real(name, *a))
    monkeypatch.setenv("PMI_SIZE", "2")                       # as mpiexec -n 2 starts it
    with pytest.raises(SystemExit) as e:
        from fastbptt import cli
        cli.main(["train", "--epochs", "1"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("fastbptt train: error: mpiexec: MPI needs mpi4py, which is not installed: "
                                       "pip install fastbptt[mpi]\n")
