"""fastbptt.torch against torch.nn in one process: forward + backward of the same models.

    python bench/torch_bridge.py [--rounds 10] [--warmup 8] [--only d2l-gru,d2l-lstm,deepbench-lstm]
    python bench/torch_bridge.py --kernels [--only ...]   # where fastbptt.torch's step goes
    python bench/torch_bridge.py --before PATH [...]      # also an earlier checkout's, same rounds
    python bench/torch_bridge.py --device cuda [...]      # CUDA tensors (fastbptt's CUDA backend; a GPU)
    python bench/torch_bridge.py --inference [...]        # the forward alone, under torch.no_grad()

(a) the book's concise models (d2l §9.1: one-hot -> nn.GRU / nn.LSTM(28, 256) -> Linear -> mean CE),
    T=35, B=32, V=28, H=256, float32; fastbptt.torch also with the token ids as its input
    (no one-hot: its extension beyond torch.nn);
(b) a DeepBench-like LSTM: T=25, B=64, D=H=512, dense input, loss = output.sum(), float32; with
    ``--only deepbench-gru,wide-gru,wide-lstm`` the rest of ``fastbptt bench --cell gru|lstm``'s
    shapes the same way (DeepBench's GRU; T=32, B=32, D=H=1024);
(c) with ``--only bidir-gru,bidir-lstm,dropout-lstm,packed-gru,packed-lstm,proj-lstm``: two layers of
    T=35, B=32, D=H=256, dense input, bidirectional, or with dropout 0.3 between the layers in
    training mode, or one layer on a PackedSequence of 32 lengths drawn from 10..35, or one LSTM
    layer with proj_size=128 (the bridge's layer-and-direction-at-a-time path), loss = the
    output's sum;
(d) with ``--only step-gru,step-lstm``: one step of one sequence (T=B=1, D=28, H=256), a
    generation loop's shape, where the fixed cost of a call is most of it;
(e) with ``--only generate-gru,generate-lstm``: the d2l model (a) predicting 50 characters one at
    a time under torch.no_grad(), each fed back (one "step" is the 50 calls in a row).

With ``--before PATH`` (an earlier checkout, e.g. ``git worktree add /tmp/before REV``) its
package, copied as ``fastbptt_before``, runs as one more system ("before") beside the others.
With ``--blocks`` each system runs all its rounds in a row instead of in turn (a loop of calls
with no other system's threads between them).

Per round and model each system runs once (zero_grad, forward, loss, backward), the order
alternating between rounds; the same weights on both sides (load_state_dict); torch on as many
threads as numba.  Printed: each system's median seconds per forward+backward and torch.nn's
median over fastbptt.torch's (> 1: fastbptt.torch is faster); for (a) and (b) also each system's
GFLOP/s and its share of the same-run float32 GEMM rate (numpy 2048³, measured before the
rounds), the FLOPs counted as ``fastbptt bench`` counts them (``fastbptt.bench.flops``: the
one-hot input a gather; the DeepBench LSTM's input product and ∂W_xh, no ∂X).
"""
import argparse
import statistics
import time

import numba
import torch
import torch.nn.functional as F
from torch import nn

import fastbptt.torch as ft
from fastbptt import bench
from before import load_before

BEFORE = None          # --before: the earlier checkout's fastbptt.torch
INFERENCE = False      # --inference: each step the forward alone, under torch.no_grad()


class RNNModel(nn.Module):
    """d2l's concise RNNModel (§8.6), with ``ids=True`` passing the token ids instead of one-hot"""

    def __init__(self, rnn_layer, vocab_size, ids=False):
        super().__init__()
        self.rnn, self.vocab_size, self.ids = rnn_layer, vocab_size, ids
        self.linear = nn.Linear(rnn_layer.hidden_size, vocab_size)

    def forward(self, inputs, state):
        X = inputs.T if self.ids else F.one_hot(inputs.T.long(), self.vocab_size).to(torch.float32)
        Y, state = self.rnn(X, state)
        return self.linear(Y.reshape((-1, Y.shape[-1]))), state


def d2l_case(kind, device):
    T, B, V, H = 35, 32, 28, 256
    torch.manual_seed(0)
    ours = getattr(ft, kind)(V, H)
    theirs = getattr(nn, kind)(V, H)
    theirs.load_state_dict(ours.state_dict())
    models = {"torch.nn": RNNModel(theirs, V), "fastbptt.torch": RNNModel(ours, V),
              "fastbptt.torch ids": RNNModel(ours, V, ids=True)}
    if BEFORE:
        before = getattr(BEFORE, kind)(V, H)
        before.load_state_dict(ours.state_dict())
        models["before"] = RNNModel(before, V)
    for m in models.values():
        m.linear.load_state_dict(models["torch.nn"].linear.state_dict())
        m.to(device)
    X = torch.randint(0, V, (B, T), device=device)
    Y = torch.randint(0, V, (B, T), device=device)

    def step(m):
        if INFERENCE:
            with torch.no_grad():
                return m(X, None)
        m.zero_grad()
        y_hat, _ = m(X, None)
        F.cross_entropy(y_hat, Y.T.reshape(-1)).backward()
    return models, step


def generate_case(kind, device, chars=50):
    """the d2l model's prediction loop (§8.5's predict_ch8): ``chars`` characters one at a time,
    each fed back as the next step's input, its state carried, under torch.no_grad()"""
    models, _ = d2l_case(kind, device)

    def step(m):
        with torch.no_grad():
            x, state = torch.zeros((1, 1), dtype=torch.long, device=device), None
            for _ in range(chars):
                y, state = m(x, state)
                x = y.argmax(1).reshape(1, 1)
    return models, step


def dense_case(kind, device, T, B, D, H, num_layers=1, lengths=None, **kw):
    """torch.nn's and fastbptt.torch's ``kind`` (and --before's) with the same weights on dense
    input (T,B,D), packed with ``lengths`` when given; loss = the output's sum"""
    torch.manual_seed(0)
    ours = getattr(ft, kind)(D, H, num_layers, **kw)
    models = {"torch.nn": getattr(nn, kind)(D, H, num_layers, **kw), "fastbptt.torch": ours}
    if BEFORE:
        models["before"] = getattr(BEFORE, kind)(D, H, num_layers, **kw)
    for m in models.values():
        m.load_state_dict(ours.state_dict())
        m.to(device)
    X = torch.randn(T, B, D, device=device)
    if lengths is not None:
        X = torch.nn.utils.rnn.pack_padded_sequence(X, lengths, enforce_sorted=False)

    def step(m):
        if INFERENCE:
            with torch.no_grad():
                return m(X)
        m.zero_grad()
        out, _ = m(X)
        (out if lengths is None else out.data).sum().backward()
    return models, step


def packed_lengths():
    """32 lengths drawn from 10..35"""
    return torch.randint(10, 36, (32,), generator=torch.Generator().manual_seed(1))


def kernels(name, models, step, rounds):
    """fastbptt.torch's step alone: ms per step in each engine kernel, the API calls, and the
    page faults per step (resource's ru_minflt)"""
    import collections
    import resource

    import fastbptt._cpu as cpu
    from fastbptt import api
    from fastbptt._cpu import elman, gru, lstm, products, projections
    spent = collections.defaultdict(float)

    def timed(mod, fn, label):
        f = getattr(mod, fn)

        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[label] += time.perf_counter() - t
        setattr(mod, fn, g)
        return mod, fn, f
    wrapped = [timed(projections, f, f) for f in ("recurrent_grads_cpu", "embed_dense_backward_cpu",
                                                   "embed_dense_cpu", "embed_tokens_cpu",
                                                   "embed_tokens_backward_cpu")]
    wrapped += [timed(cpu, f, f) for f in ("transpose_cpu", "pack_cpu", "gemm_cpu", "first_nonfinite")]
    wrapped += [timed(products, "pack_columns_cpu", "pack_columns_cpu")]
    wrapped += [timed(c, f, f"{c.__name__.split('.')[-1]}.{f}") for c in (elman, gru, lstm)
                for f in ("forward_cpu", "backward_cpu")]
    wrapped += [timed(api, f, f"api.{f}") for f in ("rnn_forward", "kept_backward")]
    m = models["fastbptt.torch"]
    for _ in range(8):
        step(m)
    spent.clear()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(rounds):
        step(m)
    total = (time.perf_counter() - t0) / rounds
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / rounds
    for mod, fn, f in wrapped:
        setattr(mod, fn, f)
    print(f"{name}: fastbptt.torch alone {total * 1e3:.2f} ms per step, {faults:.0f} page faults per step")
    for label, t in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {label:28s} {t / rounds * 1e3:7.3f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--only", default="d2l-gru,d2l-lstm,deepbench-lstm")
    ap.add_argument("--kernels", action="store_true", help="time the engine's kernels in fastbptt.torch's step")
    ap.add_argument("--before", metavar="PATH", help="an earlier checkout whose fastbptt.torch runs too")
    ap.add_argument("--inference", action="store_true", help="time the forward alone, under torch.no_grad()")
    ap.add_argument("--blocks", action="store_true",
                    help="each system's rounds in a row, not alternating (no other pool's threads between)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the models and tensors live (cuda: fastbptt's CUDA backend)")
    a = ap.parse_args()
    if a.device == "cuda" and (a.kernels or not torch.cuda.is_available()):
        ap.error("--device cuda needs torch with a CUDA GPU, and takes no --kernels (the CPU engine's)")
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    G = {"GRU": 3, "LSTM": 4}
    flops = {f"d2l-{k.lower()}": bench.flops(35, 32, 28, 256, 28, G[k]) for k in G}
    for k in G:
        flops[f"deepbench-{k.lower()}"] = bench.flops(25, 64, 512, 512, 0, G[k], dense=True)
        flops[f"wide-{k.lower()}"] = bench.flops(32, 32, 1024, 1024, 0, G[k], dense=True)
    global BEFORE, INFERENCE
    INFERENCE = a.inference
    if a.before:
        BEFORE = load_before(a.before, "torch")
    torch.set_num_threads(numba.get_num_threads())
    cases = {"d2l-gru": lambda: d2l_case("GRU", a.device), "d2l-lstm": lambda: d2l_case("LSTM", a.device),
             "deepbench-lstm": lambda: dense_case("LSTM", a.device, 25, 64, 512, 512),
             "deepbench-gru": lambda: dense_case("GRU", a.device, 25, 64, 512, 512),
             "wide-gru": lambda: dense_case("GRU", a.device, 32, 32, 1024, 1024),
             "wide-lstm": lambda: dense_case("LSTM", a.device, 32, 32, 1024, 1024),
             "bidir-gru": lambda: dense_case("GRU", a.device, 35, 32, 256, 256, 2, bidirectional=True),
             "bidir-lstm": lambda: dense_case("LSTM", a.device, 35, 32, 256, 256, 2, bidirectional=True),
             "dropout-lstm": lambda: dense_case("LSTM", a.device, 35, 32, 256, 256, 2, dropout=0.3),
             "packed-gru": lambda: dense_case("GRU", a.device, 35, 32, 256, 256, lengths=packed_lengths()),
             "packed-lstm": lambda: dense_case("LSTM", a.device, 35, 32, 256, 256, lengths=packed_lengths()),
             "proj-lstm": lambda: dense_case("LSTM", a.device, 35, 32, 256, 256, proj_size=128),
             "step-gru": lambda: dense_case("GRU", a.device, 1, 1, 28, 256),
             "step-lstm": lambda: dense_case("LSTM", a.device, 1, 1, 28, 256),
             "generate-gru": lambda: generate_case("GRU", a.device),
             "generate-lstm": lambda: generate_case("LSTM", a.device)}
    print(f"threads: torch {torch.get_num_threads()}, numba {numba.get_num_threads()}; "
          f"rounds {a.rounds} (+{a.warmup} warm-up), median ms per "
          f"{'forward under torch.no_grad()' if a.inference else 'forward+backward'} on {a.device}; "
          f"% GEMM against numpy's float32 GEMM (2048³) timed once in every round, after the systems")
    for name in a.only.split(","):
        models, step = cases[name]()
        if a.kernels:
            kernels(name, models, step, a.rounds)
            continue
        names = list(models)
        times = {n: [] for n in names}
        gemm = bench.Gemm()
        order = ([(r, n) for n in names for r in range(a.warmup + a.rounds)] if a.blocks else
                 [(r, n) for r in range(a.warmup + a.rounds) for n in (names if r % 2 == 0 else names[::-1])])
        for i, (r, n) in enumerate(order):
            sync()
            t0 = time.perf_counter()
            step(models[n])
            sync()
            dt = time.perf_counter() - t0
            if r >= a.warmup:
                times[n].append(dt)
            if not a.blocks and r >= a.warmup and (i + 1 == len(order) or order[i + 1][0] != r):
                gemm.time(1)                     # numpy's GEMM ends the round, then its threads idle
                time.sleep(bench.PAUSE)
        if a.blocks:
            gemm.time(a.rounds)                  # a block of its own, as each system's
        med = {n: statistics.median(v) for n, v in times.items()}
        base = med["torch.nn"]
        print(f"{name}: " + ", ".join(f"{n} {med[n] * 1e3:.3f} ms" for n in names) + "; torch.nn / " +
              ", torch.nn / ".join(f"{n} = {base / med[n]:.2f}x" for n in names[1:]))
        if name in flops and not a.inference:
            rate = {n: flops[name] / med[n] / 1e9 for n in names}
            print("  " + ", ".join(f"{n} {rate[n]:.1f} GFLOP/s ({100 * rate[n] / gemm.median():.1f} % GEMM)"
                                   for n in names) + f"; GEMM {gemm.median():.1f} GFLOP/s (median)")


if __name__ == "__main__":
    main()
