"""Memory and time of one loss_and_grad against T for stored_states None, "sqrt" and a few n.

    python bench/memory.py                       # the table of docs/memory.md
    python bench/memory.py --T 1000 20000 --stored none sqrt 64 --cell lstm

Each row runs in a fresh process: a small call compiles the kernels, then the measured call.
Peak is the most numpy held during the first call at T (tracemalloc, beyond what was held
before: the call's own buffers and the states); time is the best of --repeat warm calls.
Ratios are against stored_states=None at the same T, measured in the same run.
"""
import argparse
import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, sys, time, tracemalloc
    import numpy as np
    import fastbptt
    a = json.loads(sys.argv[1])
    T, B, H, V, stored = a["T"], a["B"], a["H"], a["V"], a["stored"]
    P = fastbptt.init_params(V, H, V, seed=0, cell=a["cell"], num_layers=a["layers"])
    rng = np.random.default_rng(0)
    X, Y = rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))
    fastbptt.loss_and_grad(P, X[:3], Y[:3], stored_states=stored)       # compile
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    _, g, _ = fastbptt.loss_and_grad(P, X, Y, stored_states=stored)
    first = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    times = [first]
    for _ in range(a["repeat"]):
        t0 = time.perf_counter()
        fastbptt.loss_and_grad(P, X, Y, stored_states=stored)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"peak": peak, "time": min(times), "norm": float(sum(float(np.sum(v * v)) for v in g.values()))}))
""")


def measure(**a):
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(a)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[1000, 10000, 20000, 100000])
    p.add_argument("--stored", nargs="+", default=["none", "sqrt", "16", "64", "256"],
                   help="none, sqrt or ints (default: none sqrt 16 64 256)")
    p.add_argument("--cell", default="rnn")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--B", type=int, default=16)
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--V", type=int, default=28)
    p.add_argument("--repeat", type=int, default=1, help="warm calls after the first (default: 1)")
    p.add_argument("--max-steps", type=float, default=8.0,
                   help="skip an int n whose schedule computes more than this many steps per step "
                        "(default: 8)")
    args = p.parse_args(argv)
    from fastbptt import schedule
    G = {"rnn": 1, "gru": 3, "lstm": 4}[args.cell]
    state_bytes = lambda T: (T + 1) * args.B * args.H * 4 * (2 if args.cell == "lstm" else 1) * args.layers
    print(f"cell {args.cell} x{args.layers}, B={args.B}, H={args.H} (G={G}), V={args.V}, float32; "
          f"states = every h{' and c' if args.cell == 'lstm' else ''} of every step")
    print(f"{'T':>7} {'stored':>7} {'states MB':>10} {'peak MB':>9} {'peak/None':>9} {'time s':>8} "
          f"{'time/None':>9} {'steps/T':>7}")
    for T in args.T:
        ref = None
        for s in args.stored:
            stored = None if s == "none" else s if s == "sqrt" else int(s)
            steps = (1.0 if stored is None else 1 + schedule.advances(schedule.segments(T)) / T
                     if stored == "sqrt" else 1 + schedule.forward_steps(T, stored) / T)
            if steps > args.max_steps:
                print(f"{T:>7} {s:>7}   skipped: {steps:.1f} steps per step")
                continue
            r = measure(T=T, B=args.B, H=args.H, V=args.V, cell=args.cell, layers=args.layers, stored=stored,
                        repeat=args.repeat)
            if stored is None:
                ref = r
            rel = (lambda k: f"{r[k] / ref[k]:9.3f}") if ref else (lambda k: f"{'':>9}")
            print(f"{T:>7} {s:>7} {state_bytes(T) / 1e6:10.1f} {r['peak'] / 1e6:9.1f} {rel('peak')} "
                  f"{r['time']:8.3f} {rel('time')} {steps:7.2f}", flush=True)


if __name__ == "__main__":
    main()
