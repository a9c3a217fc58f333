"""The book's chapter-9 training run, by fastbptt and by torch's nn.RNN/nn.GRU/nn.LSTM, in one process.

    python bench/train_peer.py --cell gru|lstm|rnn [--num-layers N] [--hidden 256] [--max-chars 10000]
                               [--epochs 500] [--lr 1] [--seed 0] [--init normal|uniform] [--json PATH]

The same model, data and optimization on both sides (d2l 0.17 §8.5 / §9.1-9.3): the trainer's
own corpus (``trainer.load_corpus``) and minibatches (``data.sequential_batches``, one rng
seeded as the trainer's: identical minibatches), batch 32 × 35 steps, sequential sampling with
the state carried and detached, reset at each epoch start; fastbptt's initial weights
(``init_params``) copied into torch (weight_ih = W_xhᵀ, weight_hh = W_hhᵀ, bias_ih = b_h,
bias_hh = 0 but the GRU's n block b_hn; the bias_hh blocks fastbptt lacks get no gradient, so
both train the same parameters); one-hot input, nn.Linear head, mean cross-entropy; global-norm
clipping at θ=1 over all parameters and plain SGD (p -= lr·g), float32, torch on as many threads
as numba.  fastbptt runs ``fastbptt.train``'s epochs (``trainer.train_epoch``, from the same
weights and rng as ``fastbptt train``: the same run).  The two alternate in blocks of ten
epochs (each going first every other block, after ``fastbptt.bench.PAUSE`` so that the other's
threads are idle), so that both meet the same spells of a shared host.
Per system: the final epoch's training perplexity and tokens/s as the trainer counts it (an
epoch's tokens over the wall time of its training steps), the median over the epochs
(robust to compilation and warm-up in the first ones); then fastbptt's tokens/s over
torch's.  The first minibatch's loss of both, from the same weights, checks the
mapping.
"""
import argparse
import json
import math
import time

import numba
import numpy as np
import torch
import torch.nn.functional as F

import fastbptt
from fastbptt import bench, data, trainer

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--cell", choices=("rnn", "gru", "lstm"), required=True)
ap.add_argument("--num-layers", type=int, default=1)
ap.add_argument("--hidden", type=int, default=256)
ap.add_argument("--max-chars", type=int, default=10000)
ap.add_argument("--epochs", type=int, default=500)
ap.add_argument("--lr", type=float, default=1.0)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--init", choices=fastbptt.api.INITS, help="initial weights (default: the cell's, as train's)")
ap.add_argument("--json", help="write the results here as JSON")
a = ap.parse_args()
cfg = trainer.TrainConfig(cell=a.cell, num_layers=a.num_layers, init=a.init, hidden=a.hidden, max_chars=a.max_chars,
                          epochs=a.epochs, lr=a.lr, seed=a.seed).resolved()
torch.set_num_threads(numba.get_num_threads())
corpus = trainer.load_corpus(cfg)
V, H, L, G = len(corpus.vocab), cfg.hidden, cfg.num_layers, fastbptt.api.CELLS[cfg.cell]
params = fastbptt.init_params(V, H, V, seed=cfg.seed, cell=cfg.cell, num_layers=L, init=cfg.init)   # train()'s start


def summary(history):
    """final training perplexity, median tokens/s of the epochs"""
    return history[-1]["train_ppl"], float(np.median([r["tokens_per_s"] for r in history]))


# ------------------------------------------------------------------------- torch
rnn = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cfg.cell](V, H, L)
head = torch.nn.Linear(H, V)
with torch.no_grad():
    for l in range(L):
        s = f"_l{l}" if l else ""
        getattr(rnn, f"weight_ih_l{l}").copy_(torch.from_numpy(params[f"W_xh{s}"].T.copy()))
        getattr(rnn, f"weight_hh_l{l}").copy_(torch.from_numpy(params[f"W_hh{s}"].T.copy()))
        getattr(rnn, f"bias_ih_l{l}").copy_(torch.from_numpy(params[f"b_h{s}"]))
        getattr(rnn, f"bias_hh_l{l}").zero_()
        if cfg.cell == "gru":
            getattr(rnn, f"bias_hh_l{l}")[2 * H:] = torch.from_numpy(params[f"b_hn{s}"])
    head.weight.copy_(torch.from_numpy(params["W_hq"].T.copy()))
    head.bias.copy_(torch.from_numpy(params["b_q"]))
weights = list(rnn.parameters()) + list(head.parameters())
tied = [getattr(rnn, f"bias_hh_l{l}") for l in range(L)]   # fastbptt's b_h holds them: no gradient
fixed = 2 * H if cfg.cell == "gru" else G * H               # (the GRU's b_hn block does train)


def torch_epoch(rng, log):
    total, n, state = 0.0, 0, None
    for X, Y in data.sequential_batches(corpus.train, cfg.batch_size, cfg.num_steps, rng):
        Hs, state = rnn(F.one_hot(torch.from_numpy(X).long(), V).float(), state)
        loss = F.cross_entropy(head(Hs.reshape(-1, H)), torch.from_numpy(Y).reshape(-1).long())
        for w in weights:
            w.grad = None
        loss.backward()
        state = tuple(s.detach() for s in state) if cfg.cell == "lstm" else state.detach()
        with torch.no_grad():
            for b in tied:
                b.grad[:fixed] = 0
            norm = math.sqrt(sum(float((w.grad * w.grad).sum()) for w in weights))
            for w in weights:
                w -= (cfg.lr * min(1.0, cfg.clip / norm)) * w.grad
        value = loss.item()
        log.append(value)
        total += value * X.size
        n += X.size
    return total, n


# ----------------------------------------------- both, blocks of epochs in turn
fast_params = {k: v.copy() for k, v in params.items()}
opt = trainer.OPTIMIZERS[cfg.optimizer](fast_params, cfg.lr)
trunc = trainer.parse_truncation(cfg.truncation)
rngs = {name: np.random.default_rng(cfg.seed) for name in ("torch", "fastbptt")}   # the trainer's rng, each
X0, Y0 = next(data.sequential_batches(corpus.train, cfg.batch_size, cfg.num_steps, np.random.default_rng(cfg.seed)))
fast_loss0 = fastbptt.loss(params, X0, Y0)[0]
losses = []
epochs = {
    "torch": lambda: torch_epoch(rngs["torch"], losses),
    # fastbptt.train's epoch: the same call, state, clipping and update (trainer.train_epoch)
    "fastbptt": lambda: trainer.train_epoch(fast_params, opt, corpus.train, cfg, rngs["fastbptt"], trunc)[:2],
}
histories = {name: [] for name in epochs}
BLOCK = 10             # epochs of one system in a row: about a second, far shorter than the host's spells
for first in range(0, cfg.epochs, BLOCK):
    for name in (("torch", "fastbptt") if first // BLOCK % 2 == 0 else ("fastbptt", "torch")):
        time.sleep(bench.PAUSE)          # the other system's threads idle first (fastbptt bench's rule)
        for epoch in range(first, min(first + BLOCK, cfg.epochs)):
            t0 = time.perf_counter()
            total, n = epochs[name]()
            dt = time.perf_counter() - t0
            histories[name].append({"epoch": epoch + 1, "train_ppl": math.exp(total / n), "tokens_per_s": n / dt,
                                    "tokens": n})
torch_ppl, torch_tps = summary(histories["torch"])
fast_ppl, fast_tps = summary(histories["fastbptt"])

out = {"config": {"cell": cfg.cell, "num_layers": L, "hidden": H, "max_chars": cfg.max_chars,
                  "epochs": cfg.epochs, "lr": cfg.lr, "seed": cfg.seed, "vocab": V,
                  "threads": numba.get_num_threads(), "torch": torch.__version__},
       "first_loss": {"fastbptt": fast_loss0, "torch": losses[0]},
       "epoch1_ppl": {name: h[0]["train_ppl"] for name, h in histories.items()},
       "fastbptt": {"ppl": fast_ppl, "tokens_per_s": fast_tps},
       "torch": {"ppl": torch_ppl, "tokens_per_s": torch_tps}, "ratio": fast_tps / torch_tps}
print(f"{cfg.cell} x{L} H={H} V={V} {cfg.epochs} epochs lr {cfg.lr} threads {numba.get_num_threads()}: "
      f"first minibatch loss fastbptt {fast_loss0:.6f} torch {losses[0]:.6f}")
for name in ("fastbptt", "torch"):
    print(f"{name:9s} final train ppl {out[name]['ppl']:8.3f}  {out[name]['tokens_per_s']:12,.0f} tokens/s")
print(f"fastbptt/torch tokens/s x{out['ratio']:.2f}")
if a.json:
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
