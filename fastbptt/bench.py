"""``fastbptt bench``: one loss_and_grad (loss + full BPTT gradient of a char-RNN LM
minibatch, float32) against its peers, all timed in the same process run.

Every peer is first checked to give the same loss as fastbptt; compile and warm-up
calls happen before timing and are not counted.  Reported per config and system:
median and IQR ms per call, tokens/s (T·B per call), GFLOP/s with
FLOPs = 6·T·B·G·H² + 6·T·B·H·Q (+ 4·T·B·D·G·H for dense input; one-hot input is a
gather), G = 1 (rnn), 3 (gru), 4 (lstm), the same-run float32 GEMM rate (numpy 2048³)
and the fraction of it reached, and fastbptt's speedup over each peer.

--cell rnn (default) runs the Elman cell on the configs d2l-scratch, d2l-concise, wide,
latency; --cell gru and --cell lstm run the gated cell on d2l (token ids),
deepbench and wide (dense input), against numpy, torch (nn.GRU / nn.LSTM),
torch-scratch and jax.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import api, peers
from ._plot import pyplot, save
from ._preflight import write_json_whole, write_text_whole

#: name: (T, B, V, H) — V = D = Q
CONFIGS = {
    "d2l-scratch": (35, 32, 28, 512),     # the book's from-scratch setting
    "d2l-concise": (35, 32, 28, 256),     # the book's concise setting
    "wide": (64, 64, 256, 1024),          # large layers, GEMM-bound
    "latency": (256, 1, 64, 256),         # one long sequence, sequential-bound
}
SYSTEMS = ("fastbptt", "numpy", "torch-rnn", "torch-scratch", "jax")
#: the gated cells' configs, each run for --cell gru and --cell lstm:
#: name: (T, B, D, H, Q, dense) — D the vocabulary for token ids, else the dense input's width
GATED_CONFIGS = {
    "d2l": (35, 32, 28, 256, 28, False),             # the book's §9.1/§9.2 setting, token ids
    "deepbench": (25, 64, 512, 512, 28, True),       # DeepBench's LSTM training shape, dense input
    "wide": (32, 32, 1024, 1024, 28, True),          # large layers, GEMM-bound, dense input
}
GATED_SYSTEMS = ("fastbptt", "numpy", "torch", "torch-scratch", "jax")
#: gate blocks per cell: W_hh is (H, G·H)
GATES = {"rnn": 1, "gru": 3, "lstm": 4}
SWEEP_H = (64, 128, 256, 512, 1024, 2048)     # at T=64, B=32, V=64
SWEEP_B = (1, 4, 16, 64, 256)                 # at T=64, H=256, V=64


def configs_of(cell):
    return CONFIGS if cell == "rnn" else GATED_CONFIGS


def systems_of(cell):
    return SYSTEMS if cell == "rnn" else GATED_SYSTEMS


def _shape(shape):
    """(T, B, D, H, Q, dense) of a config: an rnn config's (T, B, V, H) is token ids, Q = V"""
    if len(shape) == 4:
        T, B, V, H = shape
        return T, B, V, H, V, False
    return tuple(shape)


def config_workload(shape, cell="rnn"):
    """:func:`workload` of a config's shape (see _shape) for ``cell``"""
    T, B, V, H, Q, dense = _shape(shape)
    return workload(T, B, V, H, cell=cell, Q=Q, dense=dense)


def flops(T, B, V, H, Q=None, G=1, dense=False):
    """forward + backward recurrent products and ∂W_hh (6·T·B·G·H²), the head (6·T·B·H·Q) and,
    for dense input (width V), the input projection and ∂W_xh (4·T·B·V·G·H); Q = V if None"""
    Q = V if Q is None else Q
    return 6 * T * B * G * H * H + 6 * T * B * H * Q + (4 * T * B * V * G * H if dense else 0)


def gated_params(D, H, Q, cell, seed=0, x_std=0.5):
    """float32 params of a one-layer "gru" or "lstm" in fastbptt's schema (W_xh (D,G·H),
    W_hh (H,G·H), b_h (G·H,), the GRU's b_hn (H,), W_hq (H,Q), b_q (Q,)), at a scale where
    the gates are nonlinear: W_xh std ``x_std``, W_hh and W_hq std 1/√H, biases std 0.1."""
    G = GATES[cell]
    rng = np.random.default_rng(seed)
    p = {"W_xh": x_std * rng.standard_normal((D, G * H)),
         "W_hh": rng.standard_normal((H, G * H)) / np.sqrt(H),
         "b_h": 0.1 * rng.standard_normal(G * H),
         "W_hq": rng.standard_normal((H, Q)) / np.sqrt(H),
         "b_q": np.zeros(Q)}
    if cell == "gru":
        p["b_hn"] = 0.1 * rng.standard_normal(H)
    return {k: v.astype(np.float32) for k, v in p.items()}


def workload(T, B, V, H, seed=0, *, cell="rnn", Q=None, dense=False):
    """float32 params at a scale where tanh (and the gates) are nonlinear (so the loss check
    means something), input X: token ids (T,B) in [0, V) or, ``dense``, N(0,1) (T,B,V),
    targets Y (T,B) in [0, Q) (Q = V if None), zero h0 (the LSTM's a pair (h0, c0))."""
    if cell != "rnn":
        Q = V if Q is None else Q
        rng = np.random.default_rng(seed)
        p = gated_params(V, H, Q, cell, seed, x_std=1 / np.sqrt(V) if dense else 0.5)
        X = rng.standard_normal((T, B, V), dtype=np.float32) if dense else rng.integers(0, V, (T, B))
        Y = rng.integers(0, Q, (T, B))
        h0 = np.zeros((B, H), np.float32)
        return p, X, Y, ((h0, h0.copy()) if cell == "lstm" else h0)
    rng = np.random.default_rng(seed)
    p = api.init_params(V, H, V, seed=seed)
    p["W_xh"] *= 50.0                                   # std 0.5
    p["W_hh"] *= 100.0 / np.sqrt(H)                     # spectral radius ≈ 1
    p["W_hq"] *= 100.0 / np.sqrt(H)
    X = rng.integers(0, V, (T, B))
    Y = rng.integers(0, V, (T, B))
    return p, X, Y, np.zeros((B, H), np.float32)


def make_fastbptt(params, X, Y, h0, device="cpu"):
    def call():
        loss, grads, _ = api.loss_and_grad(params, X, Y, h0, device=device)
        return loss
    return call


MAKERS = {"fastbptt": make_fastbptt, "numpy": peers.make_numpy, "torch-rnn": peers.make_torch,
          "torch": peers.make_torch, "torch-scratch": peers.make_torch_scratch, "jax": peers.make_jax}


#: interleaved timing rounds per config (see ``run``)
ROUNDS = 5
#: seconds of pause before each system's slice of a round, so that the previous system's
#: thread pool is idle first: OpenBLAS's threads poll for work 2^28 cycles after a call by
#: default (THREAD_TIMEOUT 28), under 0.25 s at any clock above 1.1 GHz; timed beside them,
#: the next system runs on a core that is not free (docs/performance.md, "Benchmark method")
PAUSE = 0.25


def warmup_calls():
    """untimed calls of each system before its rounds, after the check call: compiles,
    caches, and the CPU engine's first choice of its thread count (``fastbptt._cpu.team``),
    so that the rounds time each system's steady state"""
    from ._cpu.team import FIRST_CHOICE_CALLS
    return FIRST_CHOICE_CALLS + 1


def time_call(fn, min_runs, min_seconds):
    """Per-call seconds over at least ``min_runs`` calls and ``min_seconds`` in all."""
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 2000:
            break
    return np.array(times)


def gemm_rate(n=2048, runs=5):
    """The float32 GEMM rate of numpy, GFLOP/s (best of ``runs``), timed now."""
    return Gemm(n).time(runs).best()


#: numpy GEMM calls timed in each round beside the systems (``Gemm``)
GEMM_RUNS = 3


class Gemm:
    """numpy's float32 GEMM (n³), timed in the same rounds as the systems: the rate a
    system's % GEMM is taken against.  A rate timed once before the rounds stands for one
    moment of a shared host, which may be quieter or busier than the rounds; timed in
    every round, it meets the same load as the calls (docs/performance.md, "Benchmark method")."""

    def __init__(self, n=2048):
        self.n = n
        self.a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        self.out = np.empty_like(self.a)
        self.call()                              # numpy's threads started, pages touched
        self.times = []

    def call(self):
        np.matmul(self.a, self.a, out=self.out)

    def time(self, runs):
        self.times.extend(time_call(self.call, runs, 0.0))
        return self

    def _rate(self, seconds):
        return 2 * self.n ** 3 / seconds / 1e9

    def median(self, since=0):
        """GFLOP/s at the median of the calls timed so far (from call ``since`` on); with none,
        one is timed now"""
        if len(self.times) <= since:
            self.time(1)
        return self._rate(float(np.median(self.times[since:])))

    def best(self):
        """GFLOP/s at the fastest call timed so far (with none, one is timed now)"""
        if not self.times:
            self.time(1)
        return self._rate(min(self.times))


@dataclass
class Row:
    config: str
    system: str
    T: int
    B: int
    V: int                         # the input size D (the vocabulary for token ids)
    H: int
    status: str                    # ok | skipped: why | mismatch: why
    median_ms: float = float("nan")
    iqr_ms: float = float("nan")
    tokens_per_s: float = float("nan")
    gflops: float = float("nan")
    pct_gemm: float = float("nan")   # of gemm_gflops
    gemm_gflops: float = float("nan")  # numpy's GEMM, median of its calls in this config's rounds
    speedup: float = float("nan")  # fastbptt over this system (time_system / time_fastbptt)
    cell: str = "rnn"
    Q: int = 0                     # head size (0: = V)
    dense: bool = False            # dense input (T,B,V), else token ids


def run(configs=None, systems=None, quick=False, threads=None, device="cpu",
        shapes=None, progress=True, cell="rnn"):
    """Time every (config, system) for ``cell``; returns (rows, machine info with the GEMM rate).

    configs and systems default to all of the cell's (``configs_of``, ``systems_of``); every
    system's loss is checked against fastbptt's.

    Per config, every system is checked and warmed up first (``warmup_calls``), then timed in ROUNDS
    interleaved rounds (each system a slice of the time in every round, after a PAUSE), so
    that a slow spell of a shared host falls on all of them alike; the median is over all
    calls of all rounds.  numpy's GEMM (``Gemm``) takes a slice of every round too: each
    config's % GEMM is against the median of its GEMM calls.  ``quick``: two rounds of fewer
    calls, with the same warm-up and pauses (its figures mean what a full run's do)."""
    from tqdm.auto import tqdm
    _set_threads(threads)
    known = configs_of(cell)
    configs = tuple(known) if configs is None else configs
    systems = systems_of(cell) if systems is None else systems
    for c in configs if shapes is None else ():
        if c not in known:
            raise ValueError(f"configs: {c!r} is not a {cell} config (expected some of {', '.join(known)})")
    shapes = shapes or {c: known[c] for c in configs}
    rounds = 2 if quick else ROUNDS
    min_runs, min_s = (3, 0.2) if quick else (10, 1.0)
    gemm = Gemm()
    rows = []
    bar = tqdm(total=len(shapes) * rounds, disable=not progress, unit="round", leave=False)
    for name, shape in shapes.items():
        T, B, V, H, Q, dense = _shape(shape)
        params, X, Y, h0 = config_workload(shape, cell)
        ref, want = "fastbptt", make_fastbptt(params, X, Y, h0, device)()
        if device == "cpu":
            remeasure_loaded()
        fns, times = {}, {}
        first_gemm = len(gemm.times)
        for system in systems:
            row = Row(name, system, T, B, V, H, "ok", cell=cell, Q=Q, dense=dense)
            rows.append(row)
            try:
                fn = MAKERS[system](params, X, Y, h0, device)
                got = float(fn())                       # also the warm-up / compile call
            except ImportError as e:
                row.status = f"skipped: {e}"
                continue
            if not abs(got - want) <= 1e-4 * max(1.0, abs(want)):
                row.status = f"mismatch: loss {got:.6f} != {ref} {want:.6f}"
                continue
            for _ in range(warmup_calls()):              # quick too: its rounds time the steady state
                fn()
            fns[system], times[system] = fn, []
        for _ in range(rounds):
            bar.set_description(name)
            for system, fn in fns.items():
                time.sleep(PAUSE)                        # quick too: no slice beside spinning threads
                times[system].extend(time_call(fn, -(-min_runs // rounds), min_s / rounds))
            time.sleep(PAUSE)
            gemm.time(1 if quick else GEMM_RUNS)
            bar.update(1)
        base = np.median(times["fastbptt"]) if "fastbptt" in times else None
        for row in rows:
            if row.config == name and row.system in times:
                _fill(row, np.array(times[row.system]), gemm.median(first_gemm), base)
    bar.close()
    return rows, machine_info(gemm, threads, device) | {"cell": cell}


def _fill(row, t, gemm, base):
    med = float(np.median(t))
    row.median_ms = med * 1e3
    row.iqr_ms = float(np.subtract(*np.percentile(t, [75, 25]))) * 1e3
    row.tokens_per_s = row.T * row.B / med
    row.gflops = flops(row.T, row.B, row.V, row.H, row.Q or row.V, GATES[row.cell], row.dense) / med / 1e9
    row.gemm_gflops = gemm
    row.pct_gemm = 100 * row.gflops / gemm
    if base is not None:
        row.speedup = med / base


def check_threads(threads):
    """ValueError unless ``threads`` is None (all) or 1 to numba's pool: numba, BLAS and torch
    then all run on that many"""
    if threads is None:
        return
    import numba
    most = numba.config.NUMBA_NUM_THREADS        # numba's pool: NUMBA_NUM_THREADS, else the CPU count
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= most:
        raise ValueError(f"threads: expected 1 to {most} (numba's thread pool, NUMBA_NUM_THREADS), got {threads!r}")


def _set_threads(threads):
    check_threads(threads)
    if threads is None:
        return
    import numba
    numba.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
    except ImportError:
        pass
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        pass


def machine_info(gemm, threads, device):
    """the run's facts; ``gemm`` a ``Gemm`` with every GEMM call of the run timed"""
    import numba
    try:
        layer = numba.threading_layer()          # known once a parallel kernel has run
    except ValueError:
        layer = "not started"
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": threads or os.cpu_count(), "device": device,
            "numpy": np.__version__, "numba": numba.__version__, "threading_layer": layer,
            "gemm_gflops": gemm.median(), "gemm_best_gflops": gemm.best(),
            "plan": plan_line() if device == "cpu" else "",
            "note": "compile time excluded (warm-up calls before timing)"}


def remeasure_loaded():
    """the plan's sweeps measured under load (the config's first call may have just measured
    one) measured again, so that a quiet machine is timed on its quiet choices"""
    from ._cpu import current_plan
    return current_plan().remeasure_loaded()


def plan_line():
    """which measured plan the CPU engine ran (``fastbptt tune``)"""
    from ._cpu import current_plan, plan
    return plan.describe(current_plan())


# ------------------------------------------------------------------------------ reports
#: how the reports name the GEMM rate: the median of the GEMM calls of all the rounds (each
#: config's % GEMM is against its own rounds' median)
GEMM_LINE = "same-run float32 GEMM (numpy 2048³, timed in every round beside the systems), median:"
HEADER = ("config", "system", "median ms", "IQR ms", "tokens/s", "GFLOP/s", "% GEMM", "fastbptt ×")


def _cells(r):
    config = r.config if r.cell == "rnn" else f"{r.config} ({r.cell})"
    if r.status != "ok":
        return (config, r.system, r.status, "", "", "", "", "")
    return (config, r.system, f"{r.median_ms:.3f}", f"{r.iqr_ms:.3f}", f"{r.tokens_per_s:,.0f}",
            f"{r.gflops:.1f}", f"{r.pct_gemm:.1f}",
            "" if r.system == "fastbptt" or np.isnan(r.speedup) else f"{r.speedup:.2f}")


def table(rows, info):
    cells = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"{GEMM_LINE} {info['gemm_gflops']:.1f} GFLOP/s (fastest call "
                 f"{info['gemm_best_gflops']:.1f}) · {info['threads']} threads · "
                 f"numba threading layer {info['threading_layer']} · "
                 f"{info['note']}")
    if info.get("plan"):
        lines.append(info["plan"])
    return "\n".join(lines)


def markdown(rows, info):
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    out.append("")
    out.append(f"{GEMM_LINE[0].upper()}{GEMM_LINE[1:]} {info['gemm_gflops']:.1f} GFLOP/s "
               f"(fastest call {info['gemm_best_gflops']:.1f}); "
               f"{info['threads']} threads on {info['cpus']} CPUs ({info['processor']}); numpy "
               f"{info['numpy']}, numba {info['numba']} (threading layer "
               f"{info['threading_layer']}); {info['note']}.")
    if info.get("plan"):
        out.append(f"CPU {info['plan']}.")
    return "\n".join(out) + "\n"


def plot(rows, path):
    """Bar chart: fastbptt's speedup over each peer, and % of the GEMM rate, per config."""
    plt = pyplot()
    configs = list(dict.fromkeys(r.config for r in rows))
    systems = list(dict.fromkeys(r.system for r in rows))
    peers_ = [s for s in systems if s != "fastbptt"]
    get = {(r.config, r.system): r for r in rows}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    w = 0.8 / max(1, len(peers_))
    x = np.arange(len(configs))
    for i, s in enumerate(peers_):
        a1.bar(x + i * w, [get[c, s].speedup if (c, s) in get else np.nan for c in configs], w, label=s)
    a1.axhline(1.0, color="k", lw=0.8)
    a1.axhline(2.0, color="k", lw=0.8, ls="--")
    a1.set_xticks(x + w * (len(peers_) - 1) / 2, configs)
    a1.set_ylabel("fastbptt speedup (× faster)")
    a1.set_yscale("log")
    a1.legend(fontsize=8)
    w = 0.8 / len(systems)
    for i, s in enumerate(systems):
        a2.bar(x + i * w, [get[c, s].pct_gemm if (c, s) in get else np.nan for c in configs], w, label=s)
    a2.set_xticks(x + w * (len(systems) - 1) / 2, configs)
    a2.set_ylabel("% of the same-run GEMM rate")
    a2.legend(fontsize=8)
    save(fig, path)


def sweep(systems=None, quick=False, threads=None, progress=True, cell="rnn"):
    """Time against H (T=64, B=32, V=64) and against B (T=64, H=256, V=64), token ids."""
    by_h = {f"H={h}": (64, 32, 64, h) for h in SWEEP_H}
    by_b = {f"B={b}": (64, b, 64, 256) for b in SWEEP_B}
    rows_h, info = run(systems=systems, quick=quick, threads=threads, shapes=by_h, progress=progress, cell=cell)
    rows_b, _ = run(systems=systems, quick=quick, threads=threads, shapes=by_b, progress=progress, cell=cell)
    return rows_h, rows_b, info


def plot_sweep(rows_h, rows_b, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, rows, key, label in ((axes[0], rows_h, "H", "hidden size H (T=64, B=32)"),
                                 (axes[1], rows_b, "B", "batch size B (T=64, H=256)")):
        for s in dict.fromkeys(r.system for r in rows):
            pts = [(getattr(r, key), r.median_ms) for r in rows if r.system == s and r.status == "ok"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=s)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("ms per loss_and_grad")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, path)


# ---------------------------------------------------------------------------------- CLI
def add_parser(sub):
    import argparse
    p = sub.add_parser("bench", help="time loss_and_grad against numpy, torch and jax (same run)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", choices=list(GATES), default="rnn",
                   help="the recurrent cell (default: rnn); gru and lstm run the gated configs")
    p.add_argument("--configs", nargs="+", choices=list(dict.fromkeys([*CONFIGS, *GATED_CONFIGS])), metavar="NAME",
                   help=f"configs to run (default: all of the cell's: rnn {', '.join(CONFIGS)}; "
                        f"gru and lstm {', '.join(GATED_CONFIGS)})")
    p.add_argument("--peers", nargs="+", choices=list(dict.fromkeys(SYSTEMS[1:] + GATED_SYSTEMS[1:])),
                   metavar="PEER", help="peers to time beside fastbptt (default: all of the cell's; a "
                                        "missing one is skipped; torch and torch-rnn both name the "
                                        "concise nn.RNN / nn.GRU / nn.LSTM model)")
    p.add_argument("--threads", type=int, help="threads for numba, BLAS and torch (default: all cores)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    p.add_argument("--sweep", action="store_true", help="also time against H and B and plot it (--plot)")
    p.add_argument("--json", metavar="PATH", help="write every number as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    p.add_argument("--plot", metavar="PATH", help="PNG bar chart of speedups and %% of GEMM "
                                                  "(with --sweep also PATH-sweep.png)")
    p.add_argument("--load", action="store_true",
                   help="also time fastbptt against numpy under load: a busy neighbour, two processes, "
                        "more threads than cores, one core (minutes; see fastbptt.loadbench)")
    p.set_defaults(run=_run_cli)


def peer_names(names, cell):
    """the cell's peers (all of them for None); the concise torch model is "torch-rnn" for
    the rnn cell and "torch" for the gated ones, either name accepted"""
    if names is None:
        return systems_of(cell)[1:]
    torch_name = "torch-rnn" if cell == "rnn" else "torch"
    return tuple(dict.fromkeys(torch_name if n in ("torch", "torch-rnn") else n for n in names))


def sweep_figure(path):
    """the file of --sweep's figure beside --plot's ``path``: PATH-sweep with its suffix"""
    root, ext = os.path.splitext(path)
    return f"{root}-sweep{ext or '.png'}"


def _run_cli(args):
    known = configs_of(args.cell)
    chosen, args.configs = args.configs, args.configs or list(known)
    wrong = [c for c in args.configs if c not in known]
    if wrong:
        raise ValueError(f"--configs: {', '.join(wrong)} not of --cell {args.cell} "
                         f"(its configs: {', '.join(known)})")
    systems = ("fastbptt",) + peer_names(args.peers, args.cell)
    rows, info = run(args.configs, systems, args.quick, args.threads, args.device, cell=args.cell)
    print(table(rows, info))
    result = {"machine": info, "rows": [asdict(r) for r in rows]}
    if args.sweep:
        rows_h, rows_b, _ = sweep(systems, args.quick, args.threads, cell=args.cell)
        print(table(rows_h + rows_b, info))
        result["sweep"] = [asdict(r) for r in rows_h + rows_b]
        if args.plot:
            plot_sweep(rows_h, rows_b, sweep_figure(args.plot))
    if args.load:
        from . import loadbench
        under_load = loadbench.configs_of(args.cell)
        rows_load = loadbench.run(configs=[c for c in chosen or () if c in under_load] or None,
                                  rounds=1 if args.quick else 3, budget=0.3 if args.quick else 0.8, cell=args.cell)
        print(loadbench.markdown(rows_load))
        result["load"] = [dict(zip(("condition", "config", "fastbptt_ms", "numpy_ms", "numpy_1thread_ms",
                                    "speedup"), r)) for r in rows_load]
    if args.json:
        write_json_whole(args.json, result)
    if args.markdown:
        write_text_whole(args.markdown, markdown(rows, info))
    if args.plot:
        plot(rows, args.plot)
    return 0
