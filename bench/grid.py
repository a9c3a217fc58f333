"""fastbptt against the plain numpy BPTT on a grid of (B, H), T = 32, V = 64, float32.

    python bench/grid.py                      # H = 64 .. 2048, B = 1 .. 256, the Elman cell
    python bench/grid.py 2048 256             # some points again: H list, then B list (comma-separated)
    python bench/grid.py --cell lstm          # a gated cell (gru, lstm) against numpy's of the same cell

Per point: median ms of each system over four rounds of 0.25 s, the order alternating
between rounds, each slice after ``fastbptt bench``'s pause and warm-up (``bench.PAUSE``,
``bench.warmup_calls``), and numpy's time over fastbptt's.
"""
import argparse
import time

import numpy as np

from fastbptt import bench, peers

T, V = 32, 64


def ints(s):
    return [int(v) for v in s.split(",")]


ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("H", nargs="?", type=ints, default=[64, 128, 256, 512, 1024, 2048], help="hidden sizes")
ap.add_argument("B", nargs="?", type=ints, default=[1, 4, 16, 64, 256], help="batch sizes")
ap.add_argument("--cell", choices=("rnn", "gru", "lstm"), default="rnn")
a = ap.parse_args()
res = []
for H in a.H:
    for B in a.B:
        p, X, Y, h0 = bench.workload(T, B, V, H, cell=a.cell)
        f, g = bench.make_fastbptt(p, X, Y, h0), peers.make_numpy(p, X, Y, h0)
        for _ in range(bench.warmup_calls()):      # compiles, and the engine's first choice of threads
            f()
            g()
        tf, tg = [], []
        for rnd in range(4):
            for fn, ts in (((f, tf), (g, tg)) if rnd % 2 else ((g, tg), (f, tf))):
                time.sleep(bench.PAUSE)                # the other system's threads idle first
                end = time.perf_counter() + 0.25
                while True:
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                    if time.perf_counter() > end and len(ts) >= 2 * (rnd + 1):
                        break
        r = np.median(tg) / np.median(tf)
        res.append(r)
        print(f"B={B:4d} H={H:5d} fastbptt {np.median(tf) * 1e3:9.3f} ms numpy {np.median(tg) * 1e3:9.3f} ms"
              f"  x{r:.2f}", flush=True)
print("lowest ratio", min(res))
