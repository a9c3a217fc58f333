"""fastbptt.jax against the same model written as a jax.lax.scan, in one process: value and
gradient of the book's concise models under jax.jit.

    python bench/jax_bridge.py [--rounds 20] [--warmup 5] [--only d2l-gru,d2l-lstm,deepbench-lstm]
    python bench/jax_bridge.py --recomputed [...]    # also fastbptt.jax with its forward recomputed
    python bench/jax_bridge.py --before PATH [...]   # also an earlier checkout's fastbptt.jax, same rounds

(a) d2l §9.1/§9.2: token ids -> GRU / LSTM (H=256) -> Linear (28) -> mean cross-entropy,
    T=35, B=32, V=28, float32 (the recurrent layers' input a row gather on both sides);
(b) a DeepBench-like LSTM: T=25, B=64, D=H=512, dense input, the same head.

"lax.scan" is ``fastbptt.peers.make_jax`` (one h W_hh product per step, then the gates; the
input projection over all T and the head outside the scan); "fastbptt.jax" the same loss with
``fastbptt.jax.rnn`` for the recurrence (its forward and backward the numba kernels through
``jax.pure_callback``), the projection inside it.  Both jitted, both on the CPU, the same
params.  Per round each system runs once, the order alternating between rounds.  Printed: each
system's median ms per value_and_grad, lax.scan's over fastbptt.jax's (> 1: fastbptt.jax is
faster), and each one's share of the same-run float32 GEMM rate (numpy 2048³; the FLOPs as
``fastbptt bench`` counts them).  With ``--recomputed`` also "recomputed": fastbptt.jax keeping
no forward for its backward (``fastbptt.jax._kept.MAX = 0``), which then recomputes it.  With
``--before PATH`` (e.g. ``git worktree add /tmp/before REV``) also "before": that checkout's
package, copied as ``fastbptt_before``, in the same rounds.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import fastbptt.jax as fj
from fastbptt import bench, peers
from fastbptt.jax import _KeptForwards
from before import load_before


def make_fastbptt_jax(params, X, Y, h0, kept=True, module=fj):
    """value_and_grad of the same loss as peers.make_jax, the recurrence by ``module``'s rnn
    (fastbptt.jax; with ``kept=False``, its backward recomputing the forward)"""
    tokens = np.issubdtype(np.asarray(X).dtype, np.integer)

    def loss_fn(p, s0, X, Y):
        Hs, _ = module.rnn({k: v for k, v in p.items() if k not in ("W_hq", "b_q")}, X, s0)
        logp = jax.nn.log_softmax(Hs @ p["W_hq"] + p["b_q"], axis=-1)
        return -jnp.take_along_axis(logp, Y[..., None], axis=-1).mean()

    f = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
    s0 = tuple(map(jnp.asarray, h0)) if isinstance(h0, tuple) else jnp.asarray(h0)
    args = ({k: jnp.asarray(v) for k, v in params.items()}, s0,
            jnp.asarray(X, jnp.int32) if tokens else jnp.asarray(X), jnp.asarray(Y, jnp.int32))

    def call():
        if module is fj:
            fj._kept.MAX = _KeptForwards.MAX if kept else 0
        try:
            loss, grads = f(*args)
            jax.block_until_ready(grads)
        finally:
            if module is fj:
                fj._kept.MAX = _KeptForwards.MAX
        return float(loss)
    return call


CASES = {  # name: (cell, T, B, D, H, Q, dense)
    "d2l-gru": ("gru", 35, 32, 28, 256, 28, False),
    "d2l-lstm": ("lstm", 35, 32, 28, 256, 28, False),
    "deepbench-lstm": ("lstm", 25, 64, 512, 512, 28, True),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--only", default=",".join(CASES))
    ap.add_argument("--recomputed", action="store_true", help="also fastbptt.jax with its forward recomputed")
    ap.add_argument("--before", metavar="PATH", help="an earlier checkout whose fastbptt.jax runs too")
    a = ap.parse_args()
    before = None
    if a.before:
        before = load_before(a.before, "jax")
    print(f"jax {jax.__version__} on {jax.devices()[0]}; rounds {a.rounds} (+{a.warmup} warm-up), median ms per "
          f"jitted value_and_grad; % GEMM against numpy's float32 GEMM (2048³) timed once in every round")
    for name in a.only.split(","):
        cell, T, B, D, H, Q, dense = CASES[name]
        params, X, Y, h0 = bench.workload(T, B, D, H, cell=cell, Q=Q, dense=dense)
        systems = {"lax.scan": peers.make_jax(params, X, Y, h0), "fastbptt.jax": make_fastbptt_jax(params, X, Y, h0)}
        if a.recomputed:
            systems["recomputed"] = make_fastbptt_jax(params, X, Y, h0, kept=False)
        if before:
            systems["before"] = make_fastbptt_jax(params, X, Y, h0, module=before)
        losses = {n: f() for n, f in systems.items()}
        for n in systems:
            assert abs(losses[n] - losses["lax.scan"]) <= 1e-4 * max(1.0, abs(losses["lax.scan"])), losses
        times = {n: [] for n in systems}
        gemm = bench.Gemm()
        for r in range(a.warmup + a.rounds):
            for n in list(systems) if r % 2 == 0 else reversed(list(systems)):
                t0 = time.perf_counter()
                systems[n]()
                if r >= a.warmup:
                    times[n].append(time.perf_counter() - t0)
            if r >= a.warmup:
                gemm.time(1)                     # numpy's GEMM ends the round, then its threads idle
                time.sleep(bench.PAUSE)
        med = {n: statistics.median(v) for n, v in times.items()}
        flops = bench.flops(T, B, D, H, Q, bench.GATES[cell], dense=dense)
        rate = gemm.median()
        print(f"{name}: " + ", ".join(f"{n} {med[n] * 1e3:.2f} ms ({100 * flops / med[n] / 1e9 / rate:.1f} % GEMM)"
                                      for n in systems) + f", GEMM {rate:.1f} GFLOP/s" +
              "; lax.scan / " + ", lax.scan / ".join(
                  f"{n} = {med['lax.scan'] / med[n]:.2f}x" for n in list(systems)[1:]))


if __name__ == "__main__":
    main()
