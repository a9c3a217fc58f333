"""The CPU engine's plan: choices measured on the machine that runs them, kept on disk.

A constant tuned on one CPU is wrong on the next, so what depends on the CPU is chosen by
timing the candidates here, once, and kept in a plan file beside the kernel cache
(:func:`fastbptt._cpu.cache.cache_dir`), one file per machine key: the CPU model and
the features numba compiles for, the numba and numpy versions, and the thread count.

- **blocking**, per product kind: (kc, mc), the K slice and the row panel of the
  register tile (:func:`fastbptt._cpu.products.matmul`).  Kinds: "step" (a sweep's
  product, B rows), "rows" (the head and the input projection, T·B rows), "grad" (the
  weight gradients, K = T·B).  Measured by :func:`tune` (``fastbptt tune``); until then
  DEFAULT_BLOCKING, documented in docs/performance.md.
- **lanes**, per (dtype, B, H): how many lanes a sweep's steps run on (1 or all the
  threads).  Measured the first time a
  sweep of that shape runs (a few steps of each candidate, well under a second) and
  added to the plan; ``fastbptt tune`` measures a grid up front.

A plan file that cannot be read, has another format, or was made on another machine
(its key differs) is ignored with a warning.  Results are deterministic for a fixed plan
and thread count: the plan is the only thing chosen by timing, and a choice once made
stays.
"""
from __future__ import annotations

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

from .cache import cache_dir

FORMAT = 1
#: the tile's blocking until a plan exists: K slices of 128 keep a tile column's slice of
#: B (128 x 64 float32) in a 48 KiB L1; see docs/performance.md
DEFAULT_BLOCKING = {"step": (128, 64), "rows": (128, 64), "grad": (128, 64)}
KC_CANDIDATES = (64, 128, 256, 512)
MC_CANDIDATES = (32, 64, 128)
#: a sweep step of at least this many multiply-adds (B·H²) runs on every thread unmeasured
SPLIT_ALWAYS_MACS = 1 << 22


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


def _lanes_key(dtype, B, H):
    return f"{np.dtype(dtype).name} B={B} H={H}"


class Plan:
    """The choices for one machine key; ``path`` is its file."""

    def __init__(self, key, path):
        self.key = key
        self.path = path
        self.blocking = dict(DEFAULT_BLOCKING)
        self.lanes = {}
        self.tuned = False                    # blocking measured (by tune), not the default
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
            blocking = {k: tuple(int(x) for x in v) for k, v in data["blocking"].items()}
            lanes = {str(k): int(v) for k, v in data["lanes"].items()}
            if set(blocking) != set(DEFAULT_BLOCKING) or any(
                    len(v) != 2 or min(v) < 1 for v in blocking.values()):
                raise ValueError(f"blocking {data['blocking']!r}")
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            warnings.warn(f"fastbptt: ignoring the unreadable plan {self.path} ({e}); "
                          f"using the defaults", RuntimeWarning, stacklevel=2)
            return self
        self.blocking, self.lanes, self.tuned = blocking, lanes, bool(data.get("tuned"))
        return self

    def save(self):
        """write the plan atomically (other processes may read it meanwhile)"""
        data = {"format": FORMAT, "key": self.key, "tuned": self.tuned,
                "blocking": {k: list(v) for k, v in self.blocking.items()},
                "lanes": dict(sorted(self.lanes.items()))}
        tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as e:
            warnings.warn(f"fastbptt: cannot write the plan {self.path} ({e})", RuntimeWarning,
                          stacklevel=2)

    # ---------------------------------------------------------------------- choices
    def blk(self, kind):
        """the blocking of a product kind, as the kernels take it: int64 [kc, mc]"""
        return np.array(self.blocking[kind], np.int64)

    def sweep(self, dtype, B, H, threads):
        """lanes for a sweep of B rows and H columns: from the plan, else measured now and
        added to it"""
        if threads == 1:
            return 1
        if B * H * H >= SPLIT_ALWAYS_MACS:
            return threads
        key = _lanes_key(dtype, B, H)
        choice = self.lanes.get(key)
        if choice is None:
            with self._lock:
                choice = self.lanes.get(key)
                if choice is None:
                    choice = self.lanes[key] = measure_sweep(dtype, B, H, threads, self.blk("step"))
                    self.save()
        return min(choice, threads)


@functools.cache
def _plans():
    return {}


def current(threads):
    """the plan for this machine at ``threads`` threads, loaded once per process"""
    plans = _plans()
    if threads not in plans:
        key = machine_key(threads)
        name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        folder = cache_dir() / "plans"
        folder.mkdir(parents=True, exist_ok=True)
        plans[threads] = Plan(key, str(folder / f"plan-{name}.json")).load()
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


def measure_sweep(dtype, B, H, threads, blk):
    """lanes: the faster of one lane and ``threads`` lanes for forward sweeps of B x H
    steps (a few steps, best of 5)"""
    from . import elman
    from .products import packed
    rng = np.random.default_rng(0)
    dt = np.dtype(dtype)
    T = int(min(64, max(4, (1 << 21) // max(1, B * H * H))))
    W = (rng.standard_normal((H, H)) / np.sqrt(H)).astype(dt)
    Wp = packed(W, 1)
    pre = rng.standard_normal((T + 1, B, H)).astype(dt)
    Hx = np.empty_like(pre)
    act = 0

    def run(lanes):
        def fn():
            Hx[:] = pre
            with numba_threads(lanes):
                elman.forward_cpu(Hx, Wp, act, blk, lanes)
        return fn

    candidates = (1, threads)
    times = [_best(run(c)) for c in candidates]
    return candidates[int(np.argmin(times))]


class numba_threads:
    """numba's thread count for this Python thread set to ``n`` inside the block"""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.prev = numba.get_num_threads()
        if self.prev != self.n:
            numba.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.prev != self.n:
            numba.set_num_threads(self.prev)


def _product_time(M, K, N, kc, mc, dt):
    from .products import NO_POST, matmul, packed
    rng = np.random.default_rng(0)
    A = rng.standard_normal((M, K)).astype(dt)
    Bp = packed(rng.standard_normal((K, N)).astype(dt), 1)
    C = np.zeros((M, N), dt)
    return _best(lambda: matmul(C, A, Bp, dt.type(1), 0, N, np.int64(0), NO_POST, np.array([kc, mc])), reps=3)


#: the shapes each kind's blocking is measured at: (M, K, N), one thread
TUNE_SHAPES = {"step": [(32, 512, 512), (8, 256, 256)],
               "rows": [(1120, 512, 28), (1120, 28, 512)],
               "grad": [(512, 2240, 512), (1024, 1024, 1024)]}


def tune(threads, progress=True, sweeps=()):
    """Measure the blocking of every product kind and the lanes of each (dtype, B, H) in
    ``sweeps``; save the plan and return it."""
    from tqdm.auto import tqdm
    plan = current(threads)
    grid = [(kc, mc) for kc in KC_CANDIDATES for mc in MC_CANDIDATES]
    total = sum(len(s) for s in TUNE_SHAPES.values()) * len(grid) + len(sweeps)
    dt = np.dtype(np.float32)
    with tqdm(total=total, disable=not progress, desc="fastbptt tune", unit="case", leave=False) as bar:
        with numba_threads(1):
            for kind, shapes in TUNE_SHAPES.items():
                score = {}
                for M, K, N in shapes:
                    times = {}
                    for kc, mc in grid:
                        times[kc, mc] = _product_time(M, K, N, kc, mc, dt)
                        bar.update(1)
                    fastest = min(times.values())
                    for b, t in times.items():        # relative to the shape's best
                        score[b] = score.get(b, 0.0) + t / fastest
                plan.blocking[kind] = min(score, key=score.get)
        plan.tuned = True
        plan.lanes.clear()                           # measured with the old blocking
        for dtype, B, H in sweeps:
            plan.sweep(dtype, B, H, threads)
            bar.update(1)
    plan.save()
    return plan


def describe(plan):
    """one line: where the plan is and what it holds"""
    src = "tuned" if plan.tuned else "default blocking"
    blk = ", ".join(f"{k} kc={v[0]} mc={v[1]}" for k, v in plan.blocking.items())
    return (f"plan {os.path.basename(plan.path)} ({src}; {blk}; {len(plan.lanes)} sweep shapes "
            f"measured; {plan.key['threads']} threads on {plan.key['cpu']})")
