"""``fastbptt bench --load``: is fastbptt still faster than numpy when the machine is not quiet?

Times one loss_and_grad (float32; the configs of ``configs_of(cell)``, any cell) against the
plain numpy BPTT of the same cell (``fastbptt.peers``) under the conditions a user's machine
sees, each system in fresh processes under the same condition, and reports fastbptt's speed
over the *faster* of numpy with its BLAS's own threads and numpy with one BLAS thread (which
never spins).  Above 1: fastbptt is faster there.

    quiet            nothing else runs
    busy-neighbour   one busy-looping process beside it
    two-processes    two measuring processes of the same system at once
    oversubscribed   4 x as many numba (and BLAS) threads as cores
    one-core         the process pinned to one core, threads as usual

Measurements run in child processes (``python -m fastbptt.loadbench --child ...``) with
a warm kernel cache and plan (the parent makes one call first); each child's timed calls
follow ``bench.warmup_calls()`` untimed ones, as ``fastbptt bench``'s do: the steady state,
after the engine's first choice of its thread count (docs/performance.md, "under load").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CONDITIONS = ("quiet", "busy-neighbour", "two-processes", "oversubscribed", "one-core")
SYSTEMS = ("fastbptt", "numpy", "numpy-1thread")
#: children get this long to finish one measurement
TIMEOUT_S = 600
#: a one-core child: pinned before anything is imported, so that every thread it starts (numpy's
#: BLAS threads start at import) shares that core
PINNED = ("import os, runpy; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
          "runpy.run_module('fastbptt.loadbench', run_name='__main__', alter_sys=True)")
#: a gated cell's batch-of-one case (T, B, D, H, Q, dense), beside its bench configs: one long
#: sequence, sequential-bound, where waiting threads cost the most
GATED_LATENCY = (256, 1, 64, 256, 64, False)


def configs_of(cell):
    """name: shape of the configs timed under load: the bench's, less the GEMM-bound ``wide``
    (minutes per condition), and for a gated cell a batch-of-one ``latency`` case"""
    from . import bench
    out = {k: v for k, v in bench.configs_of(cell).items() if k != "wide"}
    if cell != "rnn":
        out["latency"] = GATED_LATENCY
    return out


def child(system, configs, budget, cell="rnn"):
    """median ms per config for one system, printed as JSON (runs in a child process)"""
    from . import bench, peers
    shapes = configs_of(cell)
    out = {}
    for name in configs:
        params, X, Y, h0 = bench.config_workload(shapes[name], cell)
        fn = bench.make_fastbptt(params, X, Y, h0) if system == "fastbptt" else peers.make_numpy(params, X, Y, h0)
        for _ in range(bench.warmup_calls()):      # compiles, caches, the engine's first thread count
            fn()
        times, end = [], time.perf_counter() + budget
        while len(times) < 5 or time.perf_counter() < end:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = float(np.median(times)) * 1e3
    print(json.dumps({"ms": out, "cores": cores_used()}))


def cores_used():
    """how many cores this process's threads (numba's, the BLAS's) may run on, together"""
    tasks = f"/proc/{os.getpid()}/task"
    tids = [int(t) for t in os.listdir(tasks)] if os.path.isdir(tasks) else [0]
    cores = set()
    for tid in tids:
        try:
            cores |= os.sched_getaffinity(tid)
        except OSError:                    # a thread that ended meanwhile
            pass
    return len(cores)


def measure(system, condition, configs, budget, cell="rnn"):
    """median ms per config of one system under one condition (fresh processes)"""
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    if system == "numpy-1thread":
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if condition == "oversubscribed":
        env["NUMBA_NUM_THREADS"] = str(4 * cores)
        if system == "numpy":
            env.update(OPENBLAS_NUM_THREADS=str(4 * cores), OMP_NUM_THREADS=str(4 * cores))
    cmd = [sys.executable] + (["-c", PINNED] if condition == "one-core" else ["-m", "fastbptt.loadbench"]) + \
        ["--child", system, "--configs", ",".join(configs), "--budget", str(budget), "--cell", cell]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2 if condition == "two-processes" else 1)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT_S)
        if p.returncode != 0:
            raise RuntimeError(f"{system} under {condition} failed (exit {p.returncode}): {err[-500:]}")
        result = json.loads(out.strip().splitlines()[-1])
        if condition == "one-core" and result["cores"] != 1:
            raise RuntimeError(f"{system} under one-core: its threads ran on {result['cores']} cores")
        results.append(result["ms"])
    return {c: sum(r[c] for r in results) / len(results) for c in configs}


def run(conditions=CONDITIONS, configs=None, rounds=3, budget=0.8, progress=True, cell="rnn"):
    """rows of (condition, config, fastbptt ms, numpy ms, numpy 1-thread ms, × best numpy):
    medians over ``rounds`` rounds, the systems interleaved within each; ``configs`` some of
    ``configs_of(cell)`` (all if None)"""
    from tqdm.auto import tqdm
    from . import bench
    known = configs_of(cell)
    configs = list(known) if configs is None else list(configs)
    for c in configs:
        if c not in known:
            raise ValueError(f"configs: {c!r} is not timed under load for the {cell} cell "
                             f"(expected some of {', '.join(known)})")
    bench.make_fastbptt(*bench.config_workload(known[configs[0]], cell))()   # warm the cache and plan
    rows = []
    bar = tqdm(total=len(conditions) * rounds * len(SYSTEMS), disable=not progress, leave=False)
    for condition in conditions:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) \
            if condition == "busy-neighbour" else None
        try:
            runs = {s: [] for s in SYSTEMS}
            for _ in range(rounds):
                for s in SYSTEMS:
                    bar.set_description(f"{condition} {s}")
                    runs[s].append(measure(s, condition, configs, budget, cell))
                    bar.update(1)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        for c in configs:
            med = {s: float(np.median([r[c] for r in runs[s]])) for s in SYSTEMS}
            best = min(med["numpy"], med["numpy-1thread"])
            rows.append((condition, c, med["fastbptt"], med["numpy"], med["numpy-1thread"], best / med["fastbptt"]))
    bar.close()
    return rows


def markdown(rows):
    out = ["| condition | config | fastbptt ms | numpy ms | numpy 1-thread ms | × best numpy |",
           "|---|---|---|---|---|---|"]
    out += [f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} |" for r in rows]
    worst = min(rows, key=lambda r: r[5])
    out.append("")
    out.append(f"slowest against numpy: {worst[1]} under {worst[0]} at {worst[5]:.2f}x")
    return "\n".join(out) + "\n"


def _main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", required=True, choices=SYSTEMS)
    ap.add_argument("--configs", required=True)
    ap.add_argument("--budget", type=float, required=True)
    ap.add_argument("--cell", default="rnn", choices=("rnn", "gru", "lstm"))
    a = ap.parse_args()
    child(a.child, a.configs.split(","), a.budget, a.cell)


if __name__ == "__main__":
    _main()
