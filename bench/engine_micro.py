"""Micro-benchmarks of the CPU engine's parts, the figures behind docs/performance.md.

    python bench/engine_micro.py products   # the tile on packed B against numpy's BLAS, one thread each
                                            # (BLAS limited through threadpoolctl, the peers extra)
    python bench/engine_micro.py sweeps     # a forward sweep: lanes x K slice
    python bench/engine_micro.py align      # a sweep with its packed W_hh 64-byte aligned or not
    python bench/engine_micro.py firstcall  # a fresh process's first loss_and_grad (warm cache)
    python bench/engine_micro.py coldcall   # ... and with an empty cache (the compile)
    python bench/engine_micro.py compile    # each cell's first call, float32 then float64, empty cache
    python bench/engine_micro.py interleave # d2l-scratch calls after numpy's: the team's thread counts
    python bench/engine_micro.py phases CELL T B D H  # where a loss_and_grad's time goes (cProfile,
                                            # D <= 64: token ids, else dense input), and two of its
                                            # short passes alone in a loop
    python bench/engine_micro.py spells CELL T B D H  # loss_and_grad and numpy's GEMM in turn for 30 s:
                                            # each block's call, the GEMM rate beside it, the share
    python bench/engine_micro.py overhead   # the fixed cost of a call: loss_and_grad of one step, one unit
    python bench/engine_micro.py redraw     # d2l-concise's best call, again after each of six fresh draws of
                                            # its kept buffers (the old ones held), and the team's times
    python bench/engine_micro.py copy       # a weight given as its transpose made contiguous: numpy, blocks,
                                            # the engine's transpose, torch
    python bench/engine_micro.py blas CELL T B D H  # rnn_forward + rnn_backward with the weight gradients
                                            # by the tile or by numpy's BLAS (each in a process of its own)
    python bench/engine_micro.py cellsweeps # each cell's forward sweep with the lanes and blocking chosen on
                                            # the Elman cell's and on its own
    python bench/engine_micro.py waits      # the plan's sweep measurements quiet and beside 1 or 2 busy
                                            # processes: how long this process's threads waited for a core
    python bench/engine_micro.py choices CELL T B D H  # whole loss_and_grad calls (2 threads) alternating
                                            # the plan's choices: a sweep on one lane, column lanes or rows
                                            # split, and the products' blocking per shape or their kind's
    python bench/engine_micro.py blocking   # products over all rows, on every thread, with each blocking:
                                            # the worst, the kind's one blocking, the shape's own (the plan's)
    python bench/engine_micro.py tiles      # one thread's product with register tiles of R rows x NV vectors
                                            # (the engine's _outer_tile), at a sweep's and at all rows' shapes
    python bench/engine_micro.py packrows   # packing B (every thread) in blocks of 16, 32, 64 rows, from memory
                                            # (caches flushed first) and from cache
    python bench/engine_micro.py packs      # each of the engine's packings (every thread, from cache)
    python bench/engine_micro.py sums       # dZ's packing with its sums and token scatter-add, and the GRU's
                                            # token scatter-add (every thread, from cache)
    python bench/engine_micro.py split      # the GRU's split of its input projection (every thread, from cache)
    python bench/engine_micro.py embed      # a gated cell's token projection over its column order's runs
    python bench/engine_micro.py passes PATH  # the dense input projection, ∂W_hh, the head and the scan of a
                                            # weight for non-finite values, against an earlier checkout's
                                            # (PATH) in the same process, alternating (medians)

Each prints one line per case; every figure is the best of several timed runs.
"""
import subprocess
import sys
import time

import numba
import numpy as np

from fastbptt._cpu import elman, products
from fastbptt.config import FASTMATH


def best_ms(fn, reps=20, rounds=5):
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e3


def bench_products():
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    for M, K, N in [(32, 512, 512), (32, 256, 256), (32, 1024, 1024), (64, 1024, 1024), (1024, 2048, 1024),
                    (1, 256, 256)]:
        A = rng.standard_normal((M, K), dtype=np.float32)
        B = rng.standard_normal((K, N), dtype=np.float32)
        C = np.zeros((M, N), np.float32)
        Bp = products.packed(B, 1)
        rate = {}
        for kc in (128, 256, 512):
            blk = np.array([kc, 64])
            ms = best_ms(lambda: products.matmul(C, A, Bp, np.float32(1), 0, N, 0, products.NO_POST, blk, products.ADD))
            rate[f"tile kc={kc}"] = 2 * M * K * N / ms / 1e6
        try:
            from threadpoolctl import threadpool_limits
            with threadpool_limits(1):
                rate["numpy BLAS, one thread"] = 2 * M * K * N / best_ms(lambda: np.dot(A, B, out=C)) / 1e6
        except ImportError:
            rate["numpy BLAS, its threads"] = 2 * M * K * N / best_ms(lambda: np.dot(A, B, out=C)) / 1e6
        print(f"({M},{K})·({K},{N}) GFLOP/s, one thread: " + ", ".join(f"{k} {v:.1f}" for k, v in rate.items()))


def _sweep_case(B, H, T, rng):
    W = (rng.standard_normal((H, H)) / np.sqrt(H)).astype(np.float32)
    pre = rng.standard_normal((T + 1, B, H)).astype(np.float32)
    return W, pre, products.empty(pre.shape, np.float32)


def bench_sweeps():
    rng = np.random.default_rng(0)
    for B, H, T in [(32, 512, 35), (32, 256, 35), (1, 256, 256)]:
        W, pre, S = _sweep_case(B, H, T, rng)
        Wp = products.packed(W, 1)
        for kc in (64, 128, 256, 512):
            out = []
            for lanes in (1, 2):
                numba.set_num_threads(lanes)
                blk = np.array([kc, 64])
                ms = best_ms(lambda: (S.__setitem__(slice(None), pre),
                                      elman.forward_cpu(S, Wp, 0, blk, lanes, lanes, False)), reps=5)
                out.append(f"{lanes} lane(s) {ms:.3f} ms ({2 * B * H * H * T / ms / 1e6:.0f} GFLOP/s)")
            print(f"forward sweep B={B} H={H} T={T} kc={kc}: " + ", ".join(out))


def bench_align():
    rng = np.random.default_rng(0)
    B, H, T = 1, 256, 256
    W, pre, S = _sweep_case(B, H, T, rng)
    aligned = products.packed(W, 1)
    raw = np.empty(aligned.size * 4 + 128, np.uint8)
    skip = (-raw.ctypes.data % 64) + 16                 # 16 bytes past a cache line, as numpy's big arrays
    off = raw[skip:skip + aligned.size * 4].view(np.float32).reshape(aligned.shape)
    off[:] = aligned
    blk = np.array([512, 64])
    for name, Wp in (("64-byte aligned", aligned), ("16 bytes off", off)):
        ms = best_ms(lambda: (S.__setitem__(slice(None), pre), elman.forward_cpu(S, Wp, 0, blk, 2, 2, False)), reps=10)
        print(f"forward sweep B={B} H={H} T={T}, 2 lanes, packed W_hh {name}: {ms:.3f} ms")


_FIRST = """
import time
t0 = time.perf_counter()
import numpy as np, fastbptt
from fastbptt import bench
p, X, Y, h0 = bench.workload(35, 32, 28, 512)
t1 = time.perf_counter()
fastbptt.loss_and_grad(p, X, Y, h0)
t2 = time.perf_counter()
print(f"import + setup {t1 - t0:.2f} s, first loss_and_grad at d2l-scratch {t2 - t1:.2f} s")
"""


def _with_empty_cache(script, *args):
    """run ``script`` (python -c) in a fresh process whose kernel cache and plan start empty"""
    import os
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-c", script, *args], check=True,
                       env=dict(os.environ, FASTBPTT_CACHE_DIR=folder))


def bench_coldcall():
    _with_empty_cache(_FIRST)


_COMPILE = """
import sys, time
import numpy as np, fastbptt
X = np.random.default_rng(0).integers(0, 20, (5, 3))
for dtype in ("float32", "float64"):
    p = fastbptt.init_params(20, 16, 20, seed=0, cell=sys.argv[1], dtype=dtype)
    t = time.perf_counter()
    fastbptt.loss_and_grad(p, X, X)
    print(f"{sys.argv[1]} {dtype}: first loss_and_grad {time.perf_counter() - t:.1f} s", flush=True)
"""


def bench_compile():
    """each cell's first loss_and_grad (T=5, B=3, H=16) in float32, then float64, in a fresh
    process with an empty kernel cache: numba compiling the cell's kernels"""
    for cell in ("rnn", "gru", "lstm"):
        _with_empty_cache(_COMPILE, cell)


def bench_interleave():
    """rounds of 0.3 s of numpy's BPTT, then of fastbptt's: each fastbptt call's ms and the
    team's thread count after it (in parentheses)"""
    from fastbptt import bench, peers
    from fastbptt._cpu import team
    params, X, Y, h0 = bench.workload(*bench.CONFIGS["d2l-scratch"])
    f = bench.make_fastbptt(params, X, Y, h0)
    g = peers.make_numpy(params, X, Y, h0)
    f()
    g()
    for rnd in range(3):
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            g()
        times, counts = [], []
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            t = time.perf_counter()
            f()
            times.append((time.perf_counter() - t) * 1e3)
            counts.append(next(iter(team.team.stats.values())).current)
        print(f"round {rnd}: " + " ".join(f"{t:.1f}({n})" for t, n in zip(times, counts)))


def _argv_workload():
    """CELL T B D H from the command line, and a float32 model and minibatch of that shape
    (D <= 64: token ids, else dense input; a 28-way head)"""
    import fastbptt
    cell, (T, B, D, H) = sys.argv[2], (int(x) for x in sys.argv[3:7])
    rng = np.random.default_rng(0)
    p = {k: (rng.standard_normal(v.shape) / np.sqrt(H)).astype(np.float32)
         for k, v in fastbptt.init_params(D, H, 28, cell=cell).items()}
    X = rng.integers(0, D, (T, B)) if D <= 64 else rng.standard_normal((T, B, D)).astype(np.float32)
    Y = rng.integers(0, 28, (T, B))
    return cell, T, B, D, H, p, X, Y


def bench_phases():
    """ms per call of each kernel of a float32 loss_and_grad (the rows summing to the call)"""
    import cProfile
    import pstats

    import fastbptt
    cell, T, B, D, H, p, X, Y = _argv_workload()
    call = lambda: fastbptt.loss_and_grad(p, X, Y)                      # noqa: E731
    print(f"{cell} T={T} B={B} D={D} H={H}: {best_ms(call, reps=10):.2f} ms per call (best)")
    prof = cProfile.Profile()
    prof.runcall(lambda: [call() for _ in range(20)])
    stats = pstats.Stats(prof).stats
    rows = sorted(((tt / 20 * 1e3, f"{fn[0].split('fastbptt/')[-1]}:{fn[2]}") for fn, (_, _, tt, _, _) in
                   stats.items() if "fastbptt" in fn[0]), reverse=True)
    for ms, name in rows[:12]:
        print(f"  {ms:7.3f} ms  {name}")
    # two of the call's short passes alone in a loop, in the same process (their buffers
    # stay in cache): beside their rows above, what a pass costs inside the call
    from fastbptt._cpu import projections, team
    n = team.max_threads()
    G = p["W_hh"].shape[1] // H
    S = np.random.default_rng(1).standard_normal(((T + 1) * B, H)).astype(np.float32)
    ST = np.empty((H, (T + 1) * B), np.float32)
    print(f"  alone: transpose_cpu {best_ms(lambda: products.transpose_cpu(ST, S, n), reps=50):.3f} ms", end="")
    if X.ndim == 2:
        pre = np.empty((T, B, G * H), np.float32)
        one = products.runs_of(np.arange(G * H))
        embed = lambda: projections.embed_tokens_cpu(pre, X, p["W_xh"], p["b_h"], one, n)   # noqa: E731
        print(f"   embed_tokens_cpu {best_ms(embed, reps=50):.3f} ms", end="")
    print()


def bench_spells():
    """a float32 loss_and_grad and numpy's 2048³ GEMM in turn for about 30 s: each block's
    median call, the GEMM rate beside it and the call's share of that rate, so that a slow
    spell of the host shows in both (every thread, as fastbptt bench runs them)"""
    import fastbptt
    from fastbptt import bench
    cell, T, B, D, H, p, X, Y = _argv_workload()
    G = p["W_hh"].shape[1] // H
    flops = bench.flops(T, B, D, H, 28, G, dense=X.ndim == 3)
    call = lambda: fastbptt.loss_and_grad(p, X, Y)                      # noqa: E731
    best_ms(call)
    start = time.perf_counter()
    while time.perf_counter() - start < 30:
        ms = float(np.median([best_ms(call, reps=1, rounds=1) for _ in range(20)]))
        time.sleep(bench.PAUSE)                   # numba's threads idle before numpy's BLAS runs
        gemm = bench.gemm_rate(runs=3)
        time.sleep(bench.PAUSE)                   # and OpenBLAS's before the next block
        print(f"{time.perf_counter() - start:5.1f} s  {cell} T={T} B={B} D={D} H={H}: {ms:.2f} ms, GEMM "
              f"{gemm:.0f} GFLOP/s, {100 * flops / ms / 1e6 / gemm:.1f} % of it", flush=True)


def bench_overhead():
    """µs per loss_and_grad where the kernels do almost nothing: what every call costs"""
    import fastbptt
    from fastbptt import bench
    for T, B, V, H in [(1, 1, 2, 1), (32, 1, 64, 64)]:
        p, X, Y, h0 = bench.workload(T, B, V, H)
        call = lambda: fastbptt.loss_and_grad(p, X, Y, h0)               # noqa: E731
        for _ in range(200):                      # past the team's first choice of threads
            call()
        print(f"T={T} B={B} V={V} H={H}: {best_ms(call, reps=400) * 1e3:.1f} µs per call (best)")


def bench_redraw():
    """d2l-concise's best call; then six times: its kept buffers dropped (and held, so that
    fresh pages back the new ones) and the best call again; the team's last times per thread
    count.  A slow call that stays slow on fresh buffers is the host's, not the buffers'."""
    import fastbptt
    import fastbptt._cpu as cpu
    from fastbptt import bench
    from fastbptt._cpu import team
    p, X, Y, h0 = bench.workload(*bench.CONFIGS["d2l-concise"])
    call = lambda: fastbptt.loss_and_grad(p, X, Y, h0)                   # noqa: E731
    for _ in range(100):                          # past the team's first choice of threads
        call()
    held, out = [], [best_ms(call, reps=20, rounds=3)]
    for _ in range(6):
        held.append(dict(cpu._scratch.sets))
        cpu._scratch.sets.clear()
        out.append(best_ms(call, reps=20, rounds=3))
    times = {n: round(1e3 * min(arm.times), 2) for c in team.team.stats.values() for n, arm in c.arms.items()
             if arm.times}
    print("best call (ms), then after each draw: " + " ".join(f"{t:.2f}" for t in out) +
          f"; team's best by thread count (ms): {times}")


def bench_copy():
    """a 2048 x 512 weight given as its transpose, made C-contiguous: by numpy, by square
    blocks (any strided array; fastbptt._host), by the engine's vector transpose (fastbptt._cpu)
    and, with torch installed, by torch's .contiguous()"""
    from fastbptt import _cpu, _host
    try:
        import torch
    except ImportError:
        torch = None
    for dt in (np.float32, np.float64):
        W = np.random.default_rng(0).standard_normal((2048, 512)).astype(dt).T
        line = (f"{np.dtype(dt).name}: numpy ascontiguousarray {best_ms(lambda: np.ascontiguousarray(W)):.2f} ms, "
                f"64 x 64 blocks {best_ms(lambda: _host.normalized('W', W, dt)):.2f} ms, "
                f"engine transpose {best_ms(lambda: _cpu.normalized('W', W, dt)):.2f} ms")
        if torch is not None:
            t = torch.from_numpy(W.T.copy())
            line += f", torch .t().contiguous() {best_ms(lambda: t.t().contiguous()):.2f} ms"
        print(line)


def _blas_child(cell, T, B, D, H, mode):
    """one process: rnn_forward + rnn_backward, its weight gradients by the tile or by np.dot"""
    import fastbptt
    from fastbptt import _cpu
    if mode == "blas":
        def weight_grads(self, X, S, dP, dR, cols=None):
            t0 = 0 if S[0].any() else 1
            dW_hh = np.dot(S[t0:self.T].reshape(-1, self.H).T, dR[t0:].reshape(-1, dR.shape[-1]))
            dW_xh = np.dot(X.reshape(self.T * self.B, -1).T, dP.reshape(-1, dP.shape[-1]))
            db = dR.reshape(-1, dR.shape[-1]).sum(0)
            return self.natural(dW_xh, cols), self.natural(dW_hh, cols), self.natural(db, cols)
        _cpu.Run.weight_grads = weight_grads
    rng = np.random.default_rng(0)
    p = {k: (rng.standard_normal(v.shape) / np.sqrt(H)).astype(np.float32)
         for k, v in fastbptt.init_params(D, H, 28, cell=cell).items() if k not in ("W_hq", "b_q")}
    X = rng.standard_normal((T, B, D)).astype(np.float32)
    dH = np.ones((T, B, H), np.float32)

    def call():
        Hs, _, kept = fastbptt.rnn_forward(p, X, cell=cell, keep=True)
        fastbptt.rnn_backward(p, X, Hs, dH, cell=cell, input_grad=True, forward=kept)
    for _ in range(15):
        call()
    print(f"{cell} T={T} B={B} D={D} H={H}, weight gradients by {mode}: {best_ms(call, reps=5):.2f} ms")


def bench_blas():
    args = sys.argv[2:7]
    for mode in ("tile", "blas"):
        subprocess.run([sys.executable, __file__, "blas-child", *args, mode], check=True)


def bench_blocking():
    """GFLOP/s of the products over all rows of the gated configs, split as their kernels
    split them, with the grid's worst blocking, the kind's one blocking (the plan's, for
    every shape of that kind) and the blocking measured for the shape"""
    from fastbptt._cpu import plan, products, projections, team
    threads = team.max_threads()
    p = plan.current(threads)
    rng = np.random.default_rng(0)
    cases = [("rows", "rows", 1600, 512, 2048, "deepbench x W_xh"), ("rows", "rows", 1024, 1024, 3072, "wide x W_xh"),
             ("grad", "cols", 512, 1600, 2048, "deepbench dW"), ("grad", "cols", 1024, 1024, 3072, "wide dW"),
             ("grad", "cols", 256, 1120, 1024, "d2l lstm dW_hh")]
    for kind, split, M, K, N, name in cases:
        A = rng.standard_normal((M, K)).astype(np.float32)
        Bp = products.packed(rng.standard_normal((K, N)).astype(np.float32), threads)
        C, b = products.empty((M, N), np.float32), np.zeros(N, np.float32)

        def rate(blk):
            blk = np.array(blk, np.int64)
            if split == "rows":
                ms = best_ms(lambda: projections.embed_dense_cpu(C, A, Bp, b, blk, threads), reps=3)
            else:
                ms = best_ms(lambda: products.gemm_cpu(C, A, Bp, np.float32(1), blk, threads, products.OVERWRITE),
                             reps=3)
            return 2 * M * K * N / ms / 1e6
        grid = {(kc, mc): rate((kc, mc)) for kc in plan.KC_CANDIDATES for mc in plan.MC_CANDIDATES}
        own = tuple(int(x) for x in p.blk(kind, np.float32, M, K, N, split))
        print(f"{name} ({M},{K})·({K},{N}), {threads} threads, GFLOP/s: worst {min(grid.values()):.0f}, "
              f"kind's {p.blocking[kind]} {grid[p.blocking[kind]]:.0f}, shape's own {own} {grid[own]:.0f}, "
              f"best {max(grid.values()):.0f}")


def bench_cellsweeps():
    """ms of a gated cell's forward sweep (T = 32) with every (lanes, kc) candidate: the
    best for the Elman cell's sweep of the same (B, H), and the best for its own"""
    from fastbptt._cpu import gru, lstm, plan, team
    threads = team.max_threads()
    for B, H in ((32, 256), (64, 512), (32, 1024)):
        cands = [(n, kc, mc) for n in (1, threads, -threads) for kc, mc in plan.STEP_BLOCKING]
        times = {}
        for cell in (elman, gru, lstm):
            probe = cell.sweep_probe(np.dtype(np.float32), B, H, 32, np.random.default_rng(0))
            times[cell] = {}
            for n, kc, mc in cands:
                blk = np.array([kc, mc], np.int64)
                with plan.numba_threads(abs(n)):
                    times[cell][n, kc, mc] = best_ms(lambda: probe(blk, n, abs(n)), reps=3)
        by_elman = min(times[elman], key=times[elman].get)
        for cell in (gru, lstm):
            own = min(times[cell], key=times[cell].get)
            print(f"{plan.cell_name(cell)} B={B} H={H}: Elman's choice {by_elman} {times[cell][by_elman]:.3f} ms, "
                  f"its own {own} {times[cell][own]:.3f} ms (x{times[cell][by_elman] / times[cell][own]:.2f})")


def bench_choices():
    """median ms of whole float32 loss_and_grad calls on both threads (the team's choice
    fixed) with each way of a plan choice forced in turn, six alternating rounds of five
    calls: the cell's sweep on one lane, by column lanes or by rows (when each chunk has a
    4-row tile), and the products' blocking per shape (the plan's) or their kind's at every
    shape"""
    import fastbptt
    from fastbptt._cpu import plan, team
    team.CPU_TEAM_ADAPT = False
    cell, T, B, D, H, p, X, Y = _argv_workload()
    pl = plan.current(team.max_threads())
    fastbptt.loss_and_grad(p, X, Y)                          # the plan's choices for this shape
    key = f"{plan.cell_name(fastbptt._cpu.CELLS[cell])} float32 B={B} H={H}"
    lanes, kc, mc = pl.sweeps[key]
    own = dict(pl.products)
    ways = {"one lane": lambda: pl.sweeps.__setitem__(key, (1, kc, mc)),
            "column lanes": lambda: pl.sweeps.__setitem__(key, (team.max_threads(), kc, mc)),
            "rows split": lambda: pl.sweeps.__setitem__(key, (-team.max_threads(), kc, mc)),
            "blocking per shape": lambda: (pl.sweeps.__setitem__(key, (lanes, kc, mc)), pl.products.update(own)),
            "kind's blocking": lambda: (pl.sweeps.__setitem__(key, (lanes, kc, mc)),
                                        pl.products.update({k: pl.blocking[k.split()[0]] for k in own}))}
    split = ("one lane", "column lanes") + (("rows split",) if B >= 4 * team.max_threads() else ())
    for pair in (split, ("blocking per shape", "kind's blocking")):
        times = {w: [] for w in pair}
        for rnd in range(6):
            for w in (pair if rnd % 2 else pair[::-1]):
                ways[w]()
                for _ in range(2):
                    fastbptt.loss_and_grad(p, X, Y)
                for _ in range(5):
                    t = time.perf_counter()
                    fastbptt.loss_and_grad(p, X, Y)
                    times[w].append(time.perf_counter() - t)
        print(f"{cell} T={T} B={B} D={D} H={H}: " + ", ".join(f"{w} {np.median(ts) * 1e3:.2f} ms"
                                                             for w, ts in times.items()))
    pl.products.update(own)


def _tile_product(R, NV):
    """C += A B on packed B with tiles of R rows x NV vectors (the columns left over in
    one-vector tiles; the rows left over in 4-row, then 1-row tiles): matmul_k's loops with
    the tile's shape as a parameter"""
    tile = products._outer_tile

    @numba.njit(fastmath=FASTMATH, error_model="numpy")
    def product(C, A, Bp, kc, mc):
        M, N = C.shape
        K = A.shape[1]
        L = products.vector_lanes(C)
        W = NV * L
        one = C.dtype.type(1)
        for ks in range(0, K, kc):
            n = min(kc, K - ks)
            for m0 in range(0, M, mc):
                m1 = min(m0 + mc, M)
                for j in range(0, N, W):
                    if j + W <= N:
                        r = m0
                        while r + R <= m1:
                            tile(C, A, Bp, one, r, j, W, ks, ks, n, R, NV)
                            r += R
                        while r + 4 <= m1:
                            tile(C, A, Bp, one, r, j, W, ks, ks, n, 4, NV)
                            r += 4
                        for i in range(r, m1):
                            tile(C, A, Bp, one, i, j, W, ks, ks, n, 1, NV)
                    else:
                        for jj in range(j, N, L):
                            w = min(L, N - jj)
                            r = m0
                            while r + 4 <= m1:
                                tile(C, A, Bp, one, r, jj, w, ks, ks, n, 4, 1)
                                r += 4
                            for i in range(r, m1):
                                tile(C, A, Bp, one, i, jj, w, ks, ks, n, 1, 1)
    return product


def bench_tiles():
    """GFLOP/s of one thread's product with each register tile shape (the best of K slices
    128, 256, 512; panels of 64 rows): a sweep's step on one thread's rows, and products
    over all rows"""
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    shapes = [(16, 256, 1024), (16, 512, 512), (32, 512, 2048), (32, 1024, 1024), (16, 1024, 3072),
              (800, 512, 2048), (256, 1088, 512), (512, 1600, 1024)]
    tiles = [(4, 4), (8, 3), (6, 4), (8, 2)] if products.full_tile() == (8, 3) else [(4, 2), (4, 1)]
    for M, K, N in shapes:
        A = rng.standard_normal((M, K), dtype=np.float32)
        B = rng.standard_normal((K, N), dtype=np.float32)
        C = np.zeros((M, N), np.float32)
        Bp = products.packed(B, 1)
        rate = {}
        for R, NV in tiles:
            product = _tile_product(R, NV)
            C[:] = 0
            product(C, A, Bp, 128, 64)
            assert np.allclose(C, A.astype(np.float64) @ B, rtol=1e-3, atol=1e-3), (R, NV)
            reps = max(1, int(1e8 / (2 * M * K * N)))
            ms = min(best_ms(lambda: product(C, A, Bp, kc, 64), reps=reps) for kc in (128, 256, 512))
            rate[f"{R}x{NV}"] = 2 * M * K * N / ms / 1e6
        print(f"({M},{K})·({K},{N}) GFLOP/s, one thread, tile rows x vectors: "
              + ", ".join(f"{k} {v:.1f}" for k, v in rate.items()))


def _pack_in_blocks(rows):
    """products._pack's loops (every thread's chunk of panels) with blocks of ``rows`` rows"""
    panel = products.PANEL

    @numba.njit(parallel=True, fastmath=FASTMATH, error_model="numpy")
    def pack(Bp, B, n):
        P, K, _ = Bp.shape
        for c in numba.prange(n):
            for k0 in range(0, K, rows):
                for p in range(P * c // n, P * (c + 1) // n):
                    dst = Bp[p]
                    for k in range(k0, min(k0 + rows, K)):
                        src = B[k, p * panel:(p + 1) * panel]
                        for j in range(panel):
                            dst[k, j] = src[j]
    return pack


def bench_packrows():
    """ms to pack B (K,N) into panels on every thread, in blocks of 16, 32 and 64 rows (the
    median of 9): "cold" after writing 64 MiB elsewhere (B comes from memory, as a weight
    or dZ does in a call), "warm" straight after the last pack"""
    n = numba.get_num_threads()
    flush = np.ones(64 << 20, np.uint8)
    packs = {rows: _pack_in_blocks(rows) for rows in (16, 32, 64)}

    def median_ms(fn, cold):
        times = []
        for _ in range(9):
            if cold:
                flush[::64] += 1
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[4] * 1e3
    for K, N in ((1024, 4096), (1024, 3072), (512, 2048), (256, 1024), (1600, 2048), (1120, 1024), (2048, 512)):
        B = np.random.default_rng(0).standard_normal((K, N), dtype=np.float32)
        Bp = products.empty(products.packed_shape(K, N), np.float32)
        for cold in (True, False):
            line = []
            for rows, pack in packs.items():
                pack(Bp, B, n)
                line.append(f"{rows} rows {median_ms(lambda: pack(Bp, B, n), cold):.3f} ms")
            print(f"({K},{N}) {'cold' if cold else 'warm'}: " + ", ".join(line))


def bench_packs():
    """ms of the engine's packings as a call runs them (every thread, B in cache, best of
    several): pack_cpu of a weight, pack_columns_cpu of its transpose and of its columns,
    pack_sums_cpu of dZ.  Run it in an earlier checkout too (PYTHONPATH) to compare."""
    n = numba.get_num_threads()
    rng = np.random.default_rng(0)
    for K, N in ((256, 256), (256, 1024), (1024, 256), (1120, 1024), (512, 2048)):
        B = rng.standard_normal((K, N), dtype=np.float32)
        Bp = products.empty(products.packed_shape(K, N), np.float32)
        BTp = products.empty(products.packed_shape(N, K), np.float32)
        sums, cols = np.empty(N, np.float32), np.arange(N)
        runs, E, ids = products.runs_of(cols), np.empty((0, N), np.float32), np.empty(0, np.int64)
        ms = {"pack": best_ms(lambda: products.pack_cpu(Bp, B, n)),
              "pack of the transpose": best_ms(lambda: products.pack_columns_cpu(BTp, B, cols, True, n)),
              "pack_columns": best_ms(lambda: products.pack_columns_cpu(Bp, B, cols, False, n)),
              "pack_sums": best_ms(lambda: products.pack_sums_cpu(Bp, sums, B, runs, E, ids, n))}
        print(f"({K},{N}): " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))


def bench_sums():
    """ms of the passes that add rows into a few (every thread, in cache, best of several):
    pack_sums_cpu of dZ with the token ids' scatter-add of ∂W_xh (the Elman and LSTM d2l
    models) and without, and embed_tokens_backward_cpu (the GRU's ∂W_xh of token ids), at the
    d2l shapes (T·B = 1120, V = 28).  Run it in an earlier checkout too (PYTHONPATH) to compare."""
    from fastbptt._cpu import projections
    n = numba.get_num_threads()
    rng = np.random.default_rng(0)
    for N in (256, 512, 768, 1024):
        D = rng.standard_normal((1120, N), dtype=np.float32)
        Dp = products.empty(products.packed_shape(1120, N), np.float32)
        sums, runs = np.empty(N, np.float32), products.runs_of(np.arange(N))
        ids = rng.integers(0, 28, 1120)
        E, none, no_ids = np.empty((28, N), np.float32), np.empty((0, N), np.float32), np.empty(0, np.int64)
        ms = {"pack_sums with the scatter-add": best_ms(lambda: products.pack_sums_cpu(Dp, sums, D, runs, E, ids, n)),
              "without": best_ms(lambda: products.pack_sums_cpu(Dp, sums, D, runs, none, no_ids, n)),
              "embed_tokens_backward": best_ms(lambda: projections.embed_tokens_backward_cpu(
                  E, sums, D.reshape(35, 32, N), ids.reshape(35, 32), n))}
        print(f"(1120,{N}): " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))


def bench_split():
    """ms of the GRU's split of its input projection (gru.split_cpu: the n columns out, b_hn
    in) at the d2l, deepbench and wide shapes (every thread, in cache, best of several).  Run
    it in an earlier checkout too (PYTHONPATH) to compare."""
    from fastbptt._cpu import gru
    n = numba.get_num_threads()
    rng = np.random.default_rng(0)
    for rows, H in ((1120, 256), (1600, 512), (1024, 1024)):
        Z = rng.standard_normal((rows, 3 * H), dtype=np.float32)
        N, b_hn = np.empty((rows, H), np.float32), rng.standard_normal(H, dtype=np.float32)
        print(f"({rows},{3 * H}): split_cpu {best_ms(lambda: gru.split_cpu(Z, N, b_hn, 2, n)):.3f} ms")


def bench_embed():
    """ms of a gated cell's token projection at the d2l shape (T·B = 1120, V = 28, H = 256, two
    lanes' column order), every thread, best of several: embed_tokens_cpu over the runs of the
    column order from W_xh as it is, and the way before it, W_xh's and b_h's columns gathered
    into the engine's order by numpy first, then one run"""
    from fastbptt._cpu import projections
    n = numba.get_num_threads()
    rng = np.random.default_rng(0)
    for G in (3, 4):
        W, b = rng.standard_normal((28, G * 256), dtype=np.float32), rng.standard_normal(G * 256, dtype=np.float32)
        X, pre = rng.integers(0, 28, (35, 32)), np.empty((35, 32, G * 256), np.float32)
        cols = products.interleaved(256, G, 2)
        runs, one = products.runs_of(cols), products.runs_of(np.arange(G * 256))
        now = best_ms(lambda: projections.embed_tokens_cpu(pre, X, W, b, runs, n))
        gathered = best_ms(lambda: projections.embed_tokens_cpu(pre, X, np.ascontiguousarray(W[:, cols]), b[cols],
                                                                one, n))
        print(f"G={G}: over the runs {now:.3f} ms, gathered first {gathered:.3f} ms")


def bench_firstcall():
    subprocess.run([sys.executable, "-c", _FIRST], check=True)          # warms the cache if cold
    for _ in range(3):
        subprocess.run([sys.executable, "-c", _FIRST], check=True)


def bench_passes():
    """median ms of four kernels with the same inputs, this checkout's against an earlier one's
    (sys.argv[2], loaded as ``fastbptt_before``), alternating in one process: the dense input
    projection (pre = X W_xh + b_h), ∂W_hh over all rows, the softmax-CE head, and the scan of
    W_hh for non-finite values"""
    import importlib
    import statistics

    from before import load_before
    from fastbptt._cpu import arrays, head, plan, projections, team
    load_before(sys.argv[2])
    old = {m: importlib.import_module(f"fastbptt_before._cpu.{m}") for m in ("arrays", "head", "projections")}
    n = team.max_threads()
    pl = plan.current(n)
    rng = np.random.default_rng(0)

    def median_ms(now, before, rounds=30):
        times = {"now": [], "before": []}
        for r in range(rounds):
            for k in (("now", "before") if r % 2 else ("before", "now")):
                t = time.perf_counter()
                (now if k == "now" else before)()
                times[k].append(time.perf_counter() - t)
        return [statistics.median(times[k]) * 1e3 for k in ("now", "before")]

    f = np.float32
    for M, D, N in ((4096, 256, 1024), (1024, 1024, 3072), (1600, 512, 2048), (1120, 28, 256)):
        X = rng.standard_normal((M, D)).astype(f)
        Wp, b = products.packed(rng.standard_normal((D, N)).astype(f), n), rng.standard_normal(N).astype(f)
        pre, blk = products.empty((M, N), f), np.array(pl.blk("rows", f, M, D, N, "rows"), np.int64)
        now, before = median_ms(lambda: projections.embed_dense_cpu(pre, X, Wp, b, blk, n),
                                lambda: old["projections"].embed_dense_cpu(pre, X, Wp, b, blk, n))
        print(f"X W_xh + b_h ({M},{D})·({D},{N}): {now:.3f} ms, before {before:.3f} ms (x{before / now:.2f})")
    for T, B, H, G, Q in ((35, 32, 256, 1, 28), (35, 32, 512, 1, 28), (35, 32, 256, 4, 28), (25, 64, 512, 4, 28),
                          (32, 32, 1024, 4, 28)):
        R, GH = T * B, G * H
        HxT = rng.standard_normal((H, R + B)).astype(f)
        dZp = products.packed(rng.standard_normal((R, GH)).astype(f), n)
        dW, blk = products.empty((H, GH), f), np.array(pl.blk("grad", f, H, R, GH), np.int64)
        grads = median_ms(lambda: projections.recurrent_grads_cpu(dW, dZp, HxT, 0, blk, n),
                          lambda: old["projections"].recurrent_grads_cpu(dW, dZp, HxT, 0, blk, n))
        W = (rng.standard_normal((H, Q)) / np.sqrt(H)).astype(f)
        Wp, WTp = products.packed(W, n), products.packed(np.ascontiguousarray(W.T), n)
        out = [products.empty(s, f) for s in ((R, H), (H, Q), (Q,), (R, Q), products.packed_shape(R, Q))]
        Hs, Y, row_loss = rng.standard_normal((R, H)).astype(f), rng.integers(0, Q, R), np.empty(R)
        args = (Hs, HxT, B, Y, Wp, WTp, np.zeros(Q, f), 1 / R, np.array(pl.blk("rows"), np.int64), n)
        heads = median_ms(lambda: head.head_forward_backward_cpu(*out, row_loss, *args),
                          lambda: old["head"].head_forward_backward_cpu(*out, row_loss, *args))
        W_hh = rng.standard_normal((H, GH)).astype(f)
        scans = median_ms(lambda: arrays.first_nonfinite(W_hh), lambda: old["arrays"].first_nonfinite(W_hh))
        print(f"T={T} B={B} H={H} G={G}: ∂W_hh {grads[0]:.3f} ms, before {grads[1]:.3f} (x{grads[1] / grads[0]:.2f}); "
              f"head {heads[0]:.3f}, before {heads[1]:.3f} (x{heads[1] / heads[0]:.2f}); W_hh's scan "
              f"{scans[0]:.3f}, before {scans[1]:.3f} (x{scans[1] / scans[0]:.2f})")


def bench_waits():
    """a sweep's plan measurement (plan.measure_sweep) with 0, 1 and 2 busy processes beside
    it: the share of its time this process's threads waited for a core, and its choice"""
    from fastbptt._cpu import lstm, plan
    for busy in (0, 1, 2):
        spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        time.sleep(0.5)
        try:
            for cell, B, H in ((elman, 1, 256), (elman, 32, 256), (lstm, 32, 256)):
                got = [plan.measure_sweep(cell, np.float32, B, H, 2) for _ in range(4)]
                print(f"{busy} busy  {plan.cell_name(cell)} B={B} H={H}: "
                      + "  ".join(f"{c} waited {w:.3f}" for c, w in got), flush=True)
        finally:
            for p in spin:
                p.kill()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    {"products": bench_products, "sweeps": bench_sweeps, "align": bench_align,
     "phases": bench_phases, "overhead": bench_overhead, "redraw": bench_redraw, "copy": bench_copy, "blas": bench_blas,
     "blas-child": lambda: _blas_child(sys.argv[2], *(int(x) for x in sys.argv[3:7]), sys.argv[7]),
     "blocking": bench_blocking, "tiles": bench_tiles, "packrows": bench_packrows, "packs": bench_packs,
     "sums": bench_sums, "split": bench_split, "embed": bench_embed, "passes": bench_passes,
     "cellsweeps": bench_cellsweeps, "choices": bench_choices, "firstcall": bench_firstcall,
     "coldcall": bench_coldcall, "compile": bench_compile, "spells": bench_spells,
     "interleave": bench_interleave, "waits": bench_waits}[sys.argv[1] if len(sys.argv) > 1 else "products"]()
