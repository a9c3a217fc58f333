"""fastbptt against an earlier checkout of itself and numpy, in one process.

    python bench/before_after.py PATH [sweep | gru | lstm] [--only NAME,...] [--rounds N]

PATH is an earlier checkout of fastbptt (e.g. ``git worktree add /tmp/before 41148b1``);
its package is copied as ``fastbptt_before`` into a temporary folder and imported beside
this one.  Per config: median ms of each system over six interleaved rounds, each system
following each other one in turn (after ``fastbptt bench``'s warm-up calls, each slice after
its pause), and the speedups; % GEMM against the median of numpy's GEMM calls timed in the
same rounds (``bench.Gemm``).  ``sweep``: the bench's H and B sweep;
``gru``, ``lstm``: that cell's configs (``fastbptt bench --cell``).  ``--only``: those configs
alone; ``--rounds``: more rounds than six, for a difference smaller than the host's drift.
"""
import argparse
import json
import time

import numpy as np

import fastbptt
from before import load_before
from fastbptt import bench, peers

ap = argparse.ArgumentParser()
ap.add_argument("path")
ap.add_argument("mode", nargs="?", default="rnn", choices=("rnn", "sweep", "gru", "lstm"))
ap.add_argument("--only", help="comma-separated config names")
ap.add_argument("--rounds", type=int, default=6)
args = ap.parse_args()
fastbptt_before = load_before(args.path)

mode = args.mode
cell = mode if mode in ("gru", "lstm") else "rnn"
shapes = {k: v[:4] + (v[4], v[5]) for k, v in bench.GATED_CONFIGS.items()} if cell != "rnn" else \
    {k: v + (v[2], False) for k, v in bench.CONFIGS.items()}
if mode == "sweep":
    shapes = {f"H={h}": (64, 32, 64, h, 64, False) for h in bench.SWEEP_H}
    shapes.update({f"B={b}": (64, b, 64, 256, 64, False) for b in bench.SWEEP_B})
if args.only:
    shapes = {k: v for k, v in shapes.items() if k in args.only.split(",")}
gemm = bench.Gemm()                                     # timed in every round, as fastbptt bench does
out = []
for name, (T, B, V, H, Q, dense) in shapes.items():
    p, X, Y, h0 = bench.workload(T, B, V, H, cell=cell, Q=Q, dense=dense)
    fns = {"after": lambda: fastbptt.loss_and_grad(p, X, Y, h0)[0],
           "before": lambda: fastbptt_before.loss_and_grad(p, X, Y, h0)[0],
           "numpy": peers.make_numpy(p, X, Y, h0)}
    ref = fns["after"]()
    for k, f in fns.items():
        assert abs(f() - ref) < 1e-4 * max(1, abs(ref)), k
        for _ in range(bench.warmup_calls()):          # the engines' first choice of threads untimed
            f()
    times = {k: [] for k in fns}
    first_gemm = len(gemm.times)
    order = list(fns)
    for rnd in range(args.rounds):
        order = order[1:] + order[:1]                   # each system follows each other one in turn
        for k in order:
            f = fns[k]
            time.sleep(bench.PAUSE)                     # the other systems' threads idle first
            end = time.perf_counter() + 0.3
            while True:
                t0 = time.perf_counter(); f(); times[k].append(time.perf_counter() - t0)
                if time.perf_counter() > end and len(times[k]) >= 2 * (rnd + 1): break
        time.sleep(bench.PAUSE)
        gemm.time(1)
    rate = gemm.median(first_gemm)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    fl = bench.flops(T, B, V, H, Q, bench.GATES[cell], dense)
    row = dict(config=name, after_ms=med["after"], before_ms=med["before"], numpy_ms=med["numpy"],
               after_pct_gemm=100 * fl / (med["after"] / 1e3) / 1e9 / rate,
               before_pct_gemm=100 * fl / (med["before"] / 1e3) / 1e9 / rate, gemm=rate,
               after_over_before=med["before"] / med["after"], after_x_numpy=med["numpy"] / med["after"],
               before_x_numpy=med["numpy"] / med["before"])
    out.append(row)
    print(f"{name:12s} after {med['after']:9.3f} ms ({row['after_pct_gemm']:5.1f}% GEMM, "
          f"x{row['after_x_numpy']:.2f} numpy)  before {med['before']:9.3f} ms ({row['before_pct_gemm']:5.1f}%, "
          f"x{row['before_x_numpy']:.2f})  after/before speedup x{row['after_over_before']:.2f}", flush=True)
print(f"same-run GEMM, median of the rounds' calls: {gemm.median():.1f} GFLOP/s (fastest {gemm.best():.1f})")
print(json.dumps({"gemm": gemm.median(), "rows": out}))
