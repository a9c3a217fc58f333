"""Data-parallel training on MPI: measured epoch times, the Allreduce's share, a scaling model.

    .venv/bin/python bench/mpi_scaling.py                  # the book's run, 30 epochs per mode
    .venv/bin/python bench/mpi_scaling.py --quick          # 4 epochs, to check that it runs

1. Epoch time of the same run (``fastbptt train``, the book's model: H=512, T=35, B=32, the
   first 10,000 tokens) as one process with 1 thread, one process with 2 threads,
   ``mpiexec -n 2`` with the default 1 thread per rank, and ``mpiexec -n 2`` with 2 threads
   per rank (oversubscribed); the median of the epochs after the first (compilation), as
   ratios to one process on 1 thread, and the largest perplexity difference between them.
2. Per minibatch, on one thread: loss_and_grad at B/N columns (N = 1, 2, 4, …), the clipping
   and SGD step, and under ``mpiexec -n 2`` the Allreduce of the flat gradient buffer — for
   the book's model (H=512) and H=1024.
3. A model of N machines built from those: t(N) = compute(B/N) + step + allreduce(N), with
   a ring Allreduce over a network, 2(N−1)·α + 2(N−1)/N · bytes/β, for the networks of
   ``--network`` (α latency, β bandwidth); the Allreduce's share of the minibatch, and the
   speed-up over one machine.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
BOOK = dict(max_chars=10000, num_steps=35, batch_size=32)
#: (name, α seconds, β bytes/s): 10 Gb Ethernet with TCP, 100 Gb InfiniBand with RDMA
NETWORKS = [("10GbE", 30e-6, 1.25e9), ("IB-100G", 2e-6, 12.5e9)]


def mpiexec():
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else "mpiexec"


def mpi_env(**extra):
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                OMPI_MCA_rmaps_base_oversubscribe="1", **extra)


# ------------------------------------------------------------------------- 1. epochs
def epoch_runs(epochs, hidden):
    """{mode: (median epoch seconds, every epoch's perplexities: train, and validation if any)} of one run."""
    args = ["-m", "fastbptt", "train", "--max-chars", BOOK["max_chars"], "--num-steps", BOOK["num_steps"],
            "--batch-size", BOOK["batch_size"], "--hidden", hidden, "--epochs", epochs, "--quiet"]
    modes = {"1 process, 1 thread": ([], "1"),
             "1 process, 2 threads": ([], "2"),
             "mpiexec -n 2, 1 thread/rank": ([mpiexec(), "-n", "2"], None),     # the default rule
             "mpiexec -n 2, 2 threads/rank": ([mpiexec(), "-n", "2"], "2")}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, (launcher, threads) in modes.items():
            log = Path(tmp) / "log.jsonl"
            env = mpi_env(**({"NUMBA_NUM_THREADS": threads} if threads else {}))
            if threads is None:
                env.pop("NUMBA_NUM_THREADS", None)
            cmd = [*launcher, sys.executable, *args, "--json-log", log]
            subprocess.run(list(map(str, cmd)), env=env, check=True, stdout=subprocess.DEVNULL)
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:])]   # epochs 2..E
            out[mode] = (statistics.median(times), [v for r in rows for v in (r["train_ppl"], r["val_ppl"])
                                                    if v is not None])
            log.unlink()
    return out


# ---------------------------------------------------------------- 2. one minibatch
def _model(H, B, seed=0):
    import fastbptt
    V, T = 28, BOOK["num_steps"]
    params = fastbptt.init_params(V, H, V, seed=seed)
    rng = np.random.default_rng(seed)
    return params, rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))


def _median_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def compute_times(hiddens, ns, reps):
    """{H: {"step": s, "bytes": b, N: loss_and_grad seconds at B/N columns}} on one thread."""
    import numba

    import fastbptt
    from fastbptt.trainer import SGD, clip_gradients
    numba.set_num_threads(1)
    out = {}
    for H in hiddens:
        params, X, Y = _model(H, BOOK["batch_size"])
        row = {"bytes": 4 * (sum(p.size for p in params.values()) + 1)}
        for n in ns:
            b = BOOK["batch_size"] // n
            row[n] = _median_time(lambda: fastbptt.loss_and_grad(params, X[:, :b], Y[:, :b]), reps)
        _, grads, _ = fastbptt.loss_and_grad(params, X, Y)
        opt = SGD(params, 1e-6)

        def step():
            g = {k: v.copy() for k, v in grads.items()}
            clip_gradients(g, 1.0)
            opt.step(params, g)
        row["step"] = _median_time(step, reps)
        out[H] = row
    return out


def allreduce_worker(hiddens, reps):
    """Under mpiexec: the median time of one in-place Allreduce of each model's flat buffer
    (after a barrier, so it times the collective, not the ranks' skew); rank 0 prints JSON."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    out = {}
    for H in hiddens:
        params, _, _ = _model(H, 1)
        buf = np.ones(sum(p.size for p in params.values()) + 1, np.float32)
        ts = []
        for i in range(reps + 3):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            if i >= 3:
                ts.append(time.perf_counter() - t0)
        out[H] = comm.allreduce(statistics.median(ts), op=MPI.MAX)
    if comm.rank == 0:
        print(json.dumps(out))


def allreduce_times(hiddens, reps):
    cmd = [mpiexec(), "-n", "2", sys.executable, HERE, "--worker", "--hidden", *hiddens, "--reps", reps]
    p = subprocess.run(list(map(str, cmd)), env=mpi_env(NUMBA_NUM_THREADS="1"), check=True, capture_output=True,
                       text=True)
    return {int(k): v for k, v in json.loads(p.stdout.strip().splitlines()[-1]).items()}


# ------------------------------------------------------------------------ 3. the model
def ring_allreduce(nbytes, n, alpha, beta):
    """2(N−1)·α + 2(N−1)/N · bytes/β: a ring's reduce-scatter then allgather"""
    return 0.0 if n == 1 else 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes / beta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=30, help="epochs of each run of part 1 (default: 30)")
    ap.add_argument("--hidden", type=int, nargs="+", default=[512, 1024], help="H of parts 2-3 (default: 512 1024)")
    ap.add_argument("--reps", type=int, default=30, help="timed repetitions in part 2 (default: 30)")
    ap.add_argument("--quick", action="store_true", help="4 epochs, 5 repetitions: check that it runs")
    ap.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.reps = 4, 5
    if args.worker:
        return allreduce_worker(args.hidden, args.reps)

    print(f"1. epoch time of the same run: H=512, T={BOOK['num_steps']}, B={BOOK['batch_size']}, "
          f"the first {BOOK['max_chars']:,} tokens, median of epochs 2..{args.epochs}")
    runs = epoch_runs(args.epochs, 512)
    base_t, base_ppl = runs["1 process, 1 thread"]
    print(f"   {'mode':<30} {'epoch s':>9} {'ratio':>7}  {'max rel. ppl diff':>18}")
    for mode, (t, ppl) in runs.items():
        diff = float(np.max(np.abs(np.array(ppl, float) / np.array(base_ppl, float) - 1)))
        print(f"   {mode:<30} {t:9.4f} {base_t / t:6.2f}×  {diff:18.1e}")

    ns = [1, 2, 4, 8, 16, 32]
    comp = compute_times(args.hidden, ns, args.reps)
    ar = allreduce_times(args.hidden, args.reps)
    print("\n2. one minibatch on one thread (ms), and the Allreduce of mpiexec -n 2 on this machine")
    for H in args.hidden:
        c = comp[H]
        share = ar[H] / (c[2] + c["step"] + ar[H])
        print(f"   H={H}: {c['bytes'] / 2**20:.2f} MiB buffer; loss_and_grad at B/N = "
              + ", ".join(f"{BOOK['batch_size'] // n}: {1e3 * c[n]:.2f}" for n in ns)
              + f"; clip+SGD {1e3 * c['step']:.2f}; Allreduce (2 ranks, shared memory) {1e3 * ar[H]:.3f}"
              f" = {100 * share:.1f} % of a 2-rank minibatch")

    print("\n3. model of N machines, one rank each: t(N) = compute(B/N) + step + ring Allreduce")
    model = {}
    for H in args.hidden:
        c = comp[H]
        for name, alpha, beta in NETWORKS:
            cells = []
            for n in ns:
                a = ring_allreduce(c["bytes"], n, alpha, beta)
                t = c[n] + c["step"] + a
                cells.append((n, t, a / t, (c[1] + c["step"]) / t))
                model[f"H={H} {name} N={n}"] = {"minibatch_s": t, "allreduce_share": a / t,
                                                "speedup": (c[1] + c["step"]) / t}
            print(f"   H={H} {name:>8} (α={alpha * 1e6:.0f} µs, β={beta / 1e9:.2f} GB/s): "
                  + "; ".join(f"N={n}: {1e3 * t:.2f} ms, Allreduce {100 * s:.0f} %, {sp:.2f}×"
                              for n, t, s, sp in cells))
    if args.json:
        Path(args.json).write_text(json.dumps({"epochs": {m: {"epoch_s": t, "ppl": p} for m, (t, p) in runs.items()},
                                               "minibatch": {str(H): {str(k): v for k, v in comp[H].items()}
                                                             for H in args.hidden},
                                               "allreduce_2ranks_s": {str(H): ar[H] for H in args.hidden},
                                               "model": model}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
