"""The CPU engine's plan: choices measured on the machine that runs them, kept on disk.

A constant tuned on one CPU is wrong on the next, so what depends on the CPU is chosen by
timing the candidates here, once, and kept in a plan file beside the kernel cache
(:func:`fastbptt._cpu.cache.cache_dir`), one file per machine key: the CPU model and
the features numba compiles for, the numba and numpy versions, and the thread count.

- **blocking** of the products over all rows: (kc, mc), the K slice and the row panel
  of the register tile (:func:`fastbptt._cpu.products.matmul`), per kind: "rows" (the
  head, the input projection: T·B rows) and "grad" (the weight gradients: K = T·B).
  Measured the first time the engine runs on a machine (about two seconds) and again by
  :func:`tune` (``fastbptt tune``); DEFAULT_BLOCKING with ``config.CPU_AUTOTUNE = False``.
- **products**, per (kind, split, dtype, shape class) of a product of at least
  MEASURE_MACS multiply-adds: its own blocking, measured as its kernel splits it between
  threads (by rows or by columns) on at most PROBE_ROWS of its rows and PROBE_K of its K,
  each rounded down to a power of two (the class: M and K grow with T·B, which may change
  from call to call; N is a weight's width).  The best blocking moves with the shape
  (docs/performance.md, "blocking per shape"), but by less than this machine's noise at
  many shapes: the kind's blocking stays unless another beats it by PRODUCT_MARGIN in the
  same measurement.  Measured the first time a product of that shape runs, and added to
  the plan.  Smaller products take their kind's blocking.
- **sweeps**, per (cell, dtype, B, H): how a sweep's steps split, 1 (one lane), n (n
  column lanes, one per thread) or -n (the rows in n chunks, each a one-lane sweep of its
  own rows, no waits; ``lanes.run_lanes``), and the blocking of its steps.  Measured on
  that cell's own forward sweep (its ``sweep_probe``: a gated cell's step is a product G
  times as wide, with its own pointwise part) the first time a sweep of that shape runs (a
  few steps of each candidate, well under a second), and added to the plan;
  ``fastbptt tune`` measures each shape in TUNE_PASSES passes apart.  A gated cell's
  column lanes must win by GATED_LANES_MARGIN.  A sweep measured while other processes
  held the cores (this process's threads waited for a core more than LOADED_WAIT of the
  time) is marked as measured under load: one lane wins there, and loses on the quiet
  machine.  ``fastbptt tune`` and ``fastbptt bench`` measure such sweeps again, and
  replace the choice when the machine is quiet.

A plan file that cannot be read, has another format, or was made on another machine
(its key differs) is ignored with a warning.  Results are deterministic for a fixed plan
and thread count: the plan is the only thing chosen by timing, and a choice once made
stays (a training run never changes one; only ``tune`` and ``bench`` replace a choice
measured under load).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import threading
import time
import warnings

import numba
import numpy as np

from .. import config
from .cache import cache_dir

FORMAT = 6
#: the tile's blocking without a plan: K slices of 128 keep a tile column's slice of B
#: (128 x 48 float32) in a 48 KiB L1; see docs/performance.md
DEFAULT_BLOCKING = {"rows": (128, 64), "grad": (128, 64)}
KC_CANDIDATES = (64, 128, 256, 512)
MC_CANDIDATES = (32, 64, 128)
#: a product of at least this many multiply-adds has a blocking of its own shape
MEASURE_MACS = 1 << 25
#: at most this many rows and this K of a product are what its blocking is measured on
PROBE_ROWS, PROBE_K = 1024, 2048
#: a product's own blocking replaces its kind's only when this much faster (a time ratio)
PRODUCT_MARGIN = 1.05
#: a sweep's steps are measured with these (kc, mc)
STEP_BLOCKING = ((64, 64), (128, 64), (256, 64), (512, 64))
#: a gated cell's sweep takes column lanes only when this much faster (a time ratio) than
#: its best sweep in the natural column order: the lanes' order costs outside the sweep
#: (docs/performance.md, "each cell's own sweeps")
GATED_LANES_MARGIN = 1.05
#: a sweep step of at least this many multiply-adds (B·G·H²) runs on every thread, its
#: blocking measured on one
SPLIT_ALWAYS_MACS = 1 << 22
#: a sweep is measured on T steps of about this many multiply-adds in all (4 to 256 steps):
#: enough that entering the parallel region and reading the clock are small beside the
#: steps, or a small step's lanes lose to one lane by noise (docs/performance.md, "lanes")
SWEEP_PROBE_MACS = 1 << 23
SWEEP_PROBE_STEPS = (4, 256)
#: a sweep measured while this process's threads waited for a core (held by another process)
#: for more than this share of the wall time, per thread, is marked as measured under load
#: (docs/performance.md, "a sweep measured under load")
LOADED_WAIT = 0.1
#: ``fastbptt tune`` measures each sweep this many times, a pass over all of them apart, and
#: keeps each candidate's best time
TUNE_PASSES = 3


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(threads):
    """what a plan is valid for"""
    from llvmlite import binding
    features = numba.config.CPU_FEATURES or binding.get_host_cpu_features().flatten()
    return {"cpu": cpu_model(), "cpu_name": numba.config.CPU_NAME or binding.get_host_cpu_name(),
            "features": hashlib.sha1(features.encode()).hexdigest()[:12],
            "numba": numba.__version__, "numpy": np.__version__, "threads": int(threads)}


@functools.lru_cache(maxsize=1024)            # every call asks: numpy's dtype.name is slow
def _sweep_key(cell, dtype, B, H):
    return f"{cell_name(cell)} {np.dtype(dtype).name} B={B} H={H}"


def _sweep_args(key):
    """(cell module, dtype, B, H) of a sweep's key in a plan; None for a key this version
    does not make (another version of fastbptt may share the plan file)"""
    from . import CELLS
    cells = {cell_name(m): m for m in CELLS.values()}
    try:
        cell, dtype, B, H = key.split()
        if not (B.startswith("B=") and H.startswith("H=")):
            return None
        return cells[cell], np.dtype(dtype), int(B[2:]), int(H[2:])
    except (KeyError, ValueError, TypeError):
        return None


def _class(n):
    """the largest power of two <= n"""
    return 1 << (int(n).bit_length() - 1)


@functools.lru_cache(maxsize=1024)
def _product_key(kind, split, dtype, M, K, N):
    return f"{kind} by {split} {np.dtype(dtype).name} M={M} K={K} N={N}"


def cell_name(cell):
    """a cell module's name in the plan: ``elman``, ``gru``, ``lstm``"""
    return cell.__name__.rpartition(".")[2]


class Plan:
    """The choices for one machine key; ``path`` is its file."""

    def __init__(self, key, path):
        self.key = key
        self.path = path
        self.blocking = dict(DEFAULT_BLOCKING)
        self.sweeps = {}
        self.products = {}
        self.loaded = set()                   # keys of the sweeps measured under load
        self.tuned = False                    # blocking measured (by tune), not the default
        self._unwritable = False              # a save failed (warned once)
        self._arrays = {}                     # a choice as the kernels take it, made once
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ persistence
    def load(self):
        """read the file if it is there and valid for this key; warn and ignore it if not"""
        if not os.path.exists(self.path):
            return self
        try:
            with open(self.path) as f:
                data = json.load(f)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            if data.get("key") != self.key:
                warnings.warn(f"fastbptt: ignoring the plan {self.path}: it was made for "
                              f"{data.get('key')}, this is {self.key}", RuntimeWarning, stacklevel=2)
                return self
            blocking = {k: _ints(v) for k, v in data["blocking"].items()}
            sweeps = {str(k): _ints(v) for k, v in data["sweeps"].items()}
            if any(len(v) != 3 or v[0] in (0, -1) or min(v[1:]) < 1 for v in sweeps.values()):
                raise ValueError(f"sweeps {data['sweeps']!r}")
            loaded = {str(k) for k in data.get("loaded", [])}
            if not loaded <= set(sweeps):
                raise ValueError(f"loaded {sorted(loaded - set(sweeps))!r} are not sweeps")
            products = {str(k): _ints(v) for k, v in data["products"].items()}
            if any(len(v) != 2 or min(v) < 1 for v in products.values()):
                raise ValueError(f"products {data['products']!r}")
            if set(blocking) != set(DEFAULT_BLOCKING) or any(
                    len(v) != 2 or min(v) < 1 for v in blocking.values()):
                raise ValueError(f"blocking {data['blocking']!r}")
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            warnings.warn(f"fastbptt: ignoring the unreadable plan {self.path} ({e}); "
                          f"using the defaults", RuntimeWarning, stacklevel=2)
            return self
        self.blocking, self.sweeps, self.products, self.loaded = blocking, sweeps, products, loaded
        self.tuned = bool(data.get("tuned"))
        return self

    def save(self):
        """write the plan atomically (other processes may read it meanwhile)"""
        data = {"format": FORMAT, "key": self.key, "tuned": self.tuned,
                "blocking": {k: list(v) for k, v in self.blocking.items()},
                "sweeps": {k: list(v) for k, v in sorted(self.sweeps.items())},
                "loaded": sorted(self.loaded),
                "products": {k: list(v) for k, v in sorted(self.products.items())}}
        tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not self._unwritable:             # once: it is kept in memory for this process
                self._unwritable = True
                warnings.warn(f"fastbptt: cannot write the plan {self.path} ({e}); it is kept for this "
                              "process only", RuntimeWarning, stacklevel=2)

    # ---------------------------------------------------------------------- choices
    def blk(self, kind, dtype=None, M=0, K=0, N=0, split="cols"):
        """the blocking of a product (M,K) x (K,N) of ``kind``, its kernel splitting it by
        ``split`` ("rows" or "cols"), as the kernels take it: int64 [kc, mc].  A product of
        at least MEASURE_MACS has its own, from the plan or measured now and added to it; a
        smaller one, a kind alone, or any without ``config.CPU_AUTOTUNE``, the kind's."""
        if M * K * N < MEASURE_MACS or not config.CPU_AUTOTUNE:
            return self._array(self.blocking[kind])
        M, K = _class(min(M, PROBE_ROWS)), _class(min(K, PROBE_K))
        key = _product_key(kind, split, dtype, M, K, N)
        choice = self.products.get(key)
        if choice is None:
            with self._lock:
                choice = self.products.get(key)
                if choice is None:
                    choice = self.products[key] = measure_product(split, dtype, M, K, N, self.key["threads"],
                                                                  self.blocking[kind])
                    self.save()
        return self._array(choice)

    def _array(self, choice):
        """``choice`` (a tuple of ints) as an int64 array, one per distinct choice (never written)"""
        got = self._arrays.get(choice)
        if got is None:
            got = self._arrays[choice] = np.array(choice, np.int64)
        return got

    def sweep(self, cell, dtype, B, H):
        """(lanes, blk) for a sweep of ``cell`` (its module) on B rows and H units: from the
        plan, else measured now and added to it.  The lanes fix the order of the steps' sums
        (each lane adds its own K range first), so they stay whatever thread count a call
        then runs on."""
        key = _sweep_key(cell, dtype, B, H)
        choice = self.sweeps.get(key)
        if choice is None:
            with self._lock:
                choice = self.sweeps.get(key)
                if choice is None:
                    choice, waited = measure_sweep(cell, dtype, B, H, self.key["threads"])
                    self._set_sweep(key, choice, waited > LOADED_WAIT)
                    self.save()
        return choice[0], self._array(choice[1:])

    def _set_sweep(self, key, choice, loaded):
        self.sweeps[key] = choice
        (self.loaded.add if loaded else self.loaded.discard)(key)

    def remeasure_loaded(self, passes=TUNE_PASSES):
        """measure the sweeps that were measured under load again (``passes`` passes over
        them), and replace each choice where a pass found the machine quiet; returns how
        many were replaced.  Later calls take the new choices (a kept forward's backward keeps
        its forward's: ``Run.follow``).  A key this version does not make is left as it is."""
        with self._lock:                           # no other thread measures meanwhile
            seen = {key: {} for key in sorted(self.loaded) if _sweep_args(key) is not None}
            quiet = set()
            for _ in range(passes):
                for key, times in seen.items():
                    cell, dtype, B, H = _sweep_args(key)
                    choice, waited = measure_sweep(cell, dtype, B, H, self.key["threads"], times)
                    if waited <= LOADED_WAIT:
                        quiet.add(key)
                    if key in quiet:               # each candidate's best time, a quiet pass's
                        self._set_sweep(key, choice, False)
            if quiet:
                self.save()
            return len(quiet)


def _ints(values):
    """a plan's choice as ints, each within what the kernels take (int64): ValueError if not"""
    got = tuple(int(x) for x in values)
    if any(abs(x) >= 1 << 62 for x in got):
        raise ValueError(f"{list(values)!r} out of range")
    return got


@functools.cache
def _plans():
    return {}


_loading = threading.Lock()


def current(threads):
    """the plan for this machine at ``threads`` threads, loaded once per process (one Plan
    however many threads ask at once); its products' blocking is measured now if no plan
    has it yet (config.CPU_AUTOTUNE)"""
    plans = _plans()
    with _loading:
        if threads not in plans:
            key = machine_key(threads)
            name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
            folder = cache_dir() / "plans"
            with contextlib.suppress(OSError):   # else the plan is this process's alone (Plan.save warns)
                folder.mkdir(parents=True, exist_ok=True)
            p = Plan(key, str(folder / f"plan-{name}.json")).load()
            if not p.tuned and config.CPU_AUTOTUNE:
                tune_products(p)
                p.save()
            plans[threads] = p
        return plans[threads]


def forget():
    """drop the plans loaded by this process (the next call reads the files again)"""
    _plans().clear()


# ------------------------------------------------------------------------ measurements
def _best(fn, reps=5):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _best_times(fns, rounds):
    """the best time of each of fns, the candidates interleaved in every round so that a
    slow spell of the machine falls on all of them"""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def _waited_ns():
    """{thread id: nanoseconds it has waited for a core} of this process's threads (the run
    queue delay of /proc/self/task/*/schedstat); None where the kernel does not say"""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    waited = {}
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat") as f:
                waited[task] = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue                               # a thread that has ended meanwhile
    return waited


class waits:
    """``share``: the time this process's threads waited for a core in the block (while other
    threads held it: another process's, mostly), per thread of ``threads`` and as a share of
    the block's wall time; 0 where the kernel does not say.  Each thread's own delay counts
    from the block's start (or its own): one that ends inside the block is left out."""

    def __init__(self, threads=1):
        self.threads = max(1, threads)

    def __enter__(self):
        self.share = 0.0
        self._start = _waited_ns(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        end, (start, t0) = _waited_ns(), self._start
        if start is not None and end:
            waited = sum(max(0, ns - start.get(task, 0)) for task, ns in end.items())
            self.share = waited / 1e9 / max(time.perf_counter() - t0, 1e-9) / self.threads


def measure_sweep(cell, dtype, B, H, threads, seen=None):
    """((lanes, kc, mc), waited): the fastest forward sweeps of ``cell`` (its module's
    ``sweep_probe``) on B x H steps (SWEEP_PROBE_MACS in all, best of 7) on one lane,
    ``threads`` column lanes or ``threads`` row chunks (lanes = -threads; when each has a
    4-row tile), with each of STEP_BLOCKING; a step of at least SPLIT_ALWAYS_MACS runs on
    every thread, its blocking measured on one.  ``seen``: {candidate: best time} of earlier
    measurements of the same sweep, updated and chosen from (``fastbptt tune`` measures each
    sweep TUNE_PASSES times, far apart, so that a busy spell of the machine does not decide).
    ``waited``: the share of the measurement's time this process's threads waited for a core
    (:class:`waits`)."""
    seen = {} if seen is None else seen
    dt = np.dtype(dtype)
    macs = B * cell.G * H * H                   # one step's product
    T = int(np.clip(SWEEP_PROBE_MACS // max(1, macs), *SWEEP_PROBE_STEPS))
    probe = cell.sweep_probe(dt, B, H, T, np.random.default_rng(0))

    def run(lanes, kc, mc):
        blk = np.array([kc, mc], np.int64)

        def fn():
            with numba_threads(abs(lanes)):
                probe(blk, lanes, abs(lanes))
        return fn

    def timed(candidates, rounds):
        for c, t in zip(candidates, _best_times([run(*c) for c in candidates], rounds)):
            seen[c] = min(seen.get(c, t), t)
        return [seen[c] for c in candidates]

    split = threads > 1 and macs >= SPLIT_ALWAYS_MACS
    rows = (-threads,) if threads > 1 and B >= 4 * threads else ()     # a 4-row tile per chunk
    lanes = (1,) if threads == 1 or split else (1, threads) + rows
    candidates = [(n, kc, mc) for n in lanes for kc, mc in STEP_BLOCKING]
    run(*candidates[0])()                          # the kernel's compile, if any, outside the waits
    with waits(threads) as w:
        times = timed(candidates, rounds=3 if split else 7)
        if split:
            kc, mc = candidates[int(np.argmin(times))][1:]
            candidates = [(threads, kc, mc)] + [(r, kc, mc) for r in rows]
            times = timed(candidates, rounds=3)
    return _sweep_choice(cell, candidates, times), w.share


def probe_inputs(dt, B, G, H, T, rng):
    """random inputs of a cell's sweep_probe: W_hh (H,G·H) packed, the steps'
    pre-activations (T,B,G·H), the states S (T+1,B,H) and Z, a buffer of pre's shape for the
    sweep to overwrite"""
    from .products import empty, packed
    Wp = packed((rng.standard_normal((H, G * H)) / np.sqrt(H)).astype(dt), 1)
    pre = rng.standard_normal((T, B, G * H)).astype(dt)
    S = empty((T + 1, B, H), dt)
    S[:] = rng.standard_normal((T + 1, B, H))
    return Wp, pre, S, empty(pre.shape, dt)


def _sweep_choice(cell, candidates, times):
    """the fastest candidate; for a gated cell, column lanes (which put its columns in the
    lanes' order: gathers in its packs, its gradients' columns put back) only when faster
    than the best of the others by GATED_LANES_MARGIN"""
    best = int(np.argmin(times))
    if cell.G == 1 or candidates[best][0] <= 1:
        return candidates[best]
    natural = [i for i, c in enumerate(candidates) if c[0] <= 1]
    if not natural:
        return candidates[best]
    other = min(natural, key=lambda i: times[i])
    return candidates[best] if times[best] * GATED_LANES_MARGIN < times[other] else candidates[other]


def measure_product(split, dtype, M, K, N, threads, incumbent):
    """(kc, mc): the fastest blocking of the grid for a product (M,K) x (K,N) split between
    ``threads`` threads by ``split`` ("rows" as the input projection splits, "cols" as the
    weight gradients and the adjoints' products do) if it beats ``incumbent`` (the kind's
    blocking) by PRODUCT_MARGIN, else the incumbent"""
    from .products import OVERWRITE, empty, gemm_cpu, packed
    from .projections import embed_dense_cpu
    dt = np.dtype(dtype)
    rng = np.random.default_rng(0)
    A = rng.standard_normal((M, K)).astype(dt)
    Bp = packed(rng.standard_normal((K, N)).astype(dt), 1)
    C = empty((M, N), dt)
    b = np.zeros(N, dt)
    incumbent = tuple(incumbent)
    grid = [incumbent] + [(kc, mc) for kc in KC_CANDIDATES for mc in MC_CANDIDATES if (kc, mc) != incumbent]

    def run(kc, mc):
        blk = np.array([kc, mc], np.int64)

        def fn():
            with numba_threads(threads):
                if split == "rows":
                    embed_dense_cpu(C, A, Bp, b, blk, threads)
                else:
                    gemm_cpu(C, A, Bp, dt.type(1), blk, threads, OVERWRITE)
        return fn
    best = _best_times([run(*g) for g in grid], rounds=5)
    fastest = int(np.argmin(best))
    return grid[fastest] if best[fastest] * PRODUCT_MARGIN < best[0] else incumbent


class numba_threads:
    """numba's thread count for this Python thread set to ``n`` inside the block"""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.prev = numba.get_num_threads()
        if self.prev != self.n:
            numba.set_num_threads(self.n)
        return self.n

    def __exit__(self, *exc):
        if self.prev != self.n:
            numba.set_num_threads(self.prev)


def _product_time(M, K, N, kc, mc, dt):
    from .products import ADD, NO_POST, matmul, packed
    rng = np.random.default_rng(0)
    A = rng.standard_normal((M, K)).astype(dt)
    Bp = packed(rng.standard_normal((K, N)).astype(dt), 1)
    C = np.zeros((M, N), dt)
    return _best(lambda: matmul(C, A, Bp, dt.type(1), 0, N, np.int64(0), NO_POST, np.array([kc, mc]), ADD), reps=3)


#: the shapes each kind's blocking is measured at: (M, K, N), one thread
TUNE_SHAPES = {"rows": [(1120, 512, 28), (1120, 28, 512), (1024, 256, 256)],
               "grad": [(512, 2240, 512), (1024, 1024, 1024)]}


def tune_products(plan, bar=None):
    """measure the blocking of each product kind over all rows (one thread, float32)"""
    grid = [(kc, mc) for kc in KC_CANDIDATES for mc in MC_CANDIDATES]
    dt = np.dtype(np.float32)
    with numba_threads(1):
        for kind, shapes in TUNE_SHAPES.items():
            score = {}
            for M, K, N in shapes:
                times = {}
                for kc, mc in grid:
                    times[kc, mc] = _product_time(M, K, N, kc, mc, dt)
                    if bar is not None:
                        bar.update(1)
                fastest = min(times.values())
                for b, t in times.items():            # relative to the shape's best
                    score[b] = score.get(b, 0.0) + t / fastest
            plan.blocking[kind] = min(score, key=score.get)
    plan.tuned = True


def tune(threads, progress=True, sweeps=()):
    """Measure the blocking of every product kind, and the sweeps of each (cell module,
    dtype, B, H) in ``sweeps`` (TUNE_PASSES times each, one pass over all of them after
    another), again (with a progress bar); save the plan and return it.  The other sweeps of
    the cells in ``sweeps`` are dropped (measured again when next run), those of other
    cells kept."""
    from tqdm.auto import tqdm
    plan = current(threads)
    grid = len(KC_CANDIDATES) * len(MC_CANDIDATES)
    total = sum(len(s) for s in TUNE_SHAPES.values()) * grid + TUNE_PASSES * len(sweeps)
    with tqdm(total=total, disable=not progress, desc="fastbptt tune", unit="case", leave=False) as bar:
        tune_products(plan, bar)
        cells = {cell_name(c) for c, *_ in sweeps}     # the cells tuned: their old sweeps go
        for key in [k for k in plan.sweeps if k.split(" ", 1)[0] in cells]:
            plan.loaded.discard(key)               # first: a save meanwhile keeps loaded ⊆ sweeps
            del plan.sweeps[key]
        plan.products.clear()                      # each measured against its kind's blocking
        seen = [{} for _ in sweeps]
        quiet = set()                              # measured in a quiet pass at least once
        for _ in range(TUNE_PASSES):
            for (cell, dtype, B, H), times in zip(sweeps, seen):
                key = _sweep_key(cell, dtype, B, H)
                choice, waited = measure_sweep(cell, dtype, B, H, threads, times)
                if waited <= LOADED_WAIT:
                    quiet.add(key)
                plan._set_sweep(key, choice, key not in quiet)
                bar.update(1)
    plan.save()
    return plan


def describe(plan):
    """one line: where the plan is and what it holds"""
    src = "tuned" if plan.tuned else "default blocking"
    blk = ", ".join(f"{k} kc={v[0]} mc={v[1]}" for k, v in plan.blocking.items())
    return (f"plan {os.path.basename(plan.path)} ({src}; {blk}; {len(plan.products)} product shapes and "
            f"{len(plan.sweeps)} sweep shapes "
            f"measured{f' ({len(plan.loaded)} under load)' if plan.loaded else ''}; "
            f"{plan.key['threads']} threads on {plan.key['cpu']})")
