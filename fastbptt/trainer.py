"""The book's character-level RNN language model, trained with fastbptt (d2l 0.17 §8.5).

Each minibatch is one :func:`fastbptt.loss_and_grad` call, then global-norm gradient
clipping and an in-place SGD (or Adam) update.  The cell is ``"rnn"`` (the book's),
``"gru"`` or ``"lstm"``, in a stack of ``num_layers``.  With ``sampling="sequential"`` the
state (h, the LSTM's (h, c); one per layer) is carried from one minibatch to the next as
plain arrays (so no gradient crosses: the book's ``detach``) and reset at each epoch
start; with ``"random"`` it is reset every minibatch.  Checkpoints hold everything needed
to resume *exactly*.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import api, data, distributed
from ._plot import pyplot, save
from ._preflight import (check_distinct, check_figure, check_input, check_output, figure_file, require_cuda,
                         require_matplotlib, write_text_whole, written_whole)
from .corpus import split, token_ids
from .truncation import Randomized, Truncated

CHECKPOINT_FORMAT = "fastbptt-checkpoint/1"
#: the quantiles of the per-step gradient norms kept in each epoch's history row
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)
CELLS = tuple(api.CELLS)              # rnn, gru, lstm
#: the gradients of the initial state, which are not clipped or applied
STATE_GRADS = ("h0", "c0")
LOG_KEYS = ("epoch", "train_ppl", "val_ppl", "tokens_per_s", "grad_norm", "clipped_frac", "lr",
            "elapsed_s")


@dataclass
class TrainConfig:
    """What defines a training run; a checkpoint stores it and ``resume`` must agree with it.

    Defaults are the book's (d2l 0.17 §8.5): H=512, 35 steps, batch 32, SGD lr 1, 500
    epochs, clipping at θ=1, sequential sampling, full BPTT, tanh; one layer of the
    Elman cell ("rnn").  ``activation`` is the rnn cell's: a gated cell takes only "tanh".
    ``init`` is :func:`fastbptt.init_params`'; None: the cell's default ("normal", the book's
    N(0, 0.01²), for rnn; "uniform", PyTorch's, for gru and lstm).  A checkpoint written
    before ``cell`` and ``num_layers`` existed reads as rnn, 1 layer.
    """

    text: str | None = None           # a UTF-8 file; None: the embedded The Time Machine
    tokenize: str = "book"
    max_chars: int | None = None      # keep the first N tokens (the book: 10000)
    val_fraction: float | None = None  # None: 0 with max_chars (the book), else 0.1
    cell: str = "rnn"                 # rnn | gru | lstm
    num_layers: int = 1
    init: str | None = None           # None: the cell's (init_params: normal for rnn, uniform gated)
    hidden: int = 512
    num_steps: int = 35
    batch_size: int = 32
    lr: float | None = None           # None: 1 for sgd (the book), 0.002 for adam
    optimizer: str = "sgd"
    epochs: int = 500
    clip: float = 1.0                 # global-norm threshold θ; inf: no clipping
    sampling: str = "sequential"
    truncation: str = "full"          # full | k:N | random:P
    activation: str = "tanh"
    seed: int = 0
    stored_states: str | None = None  # None (all) | sqrt | N: memory-bounded BPTT, same gradients
    device: str = "cpu"

    # options that may differ between a checkpoint and the run that resumes it
    RESUMABLE = ("epochs", "device", "stored_states")

    def resolved(self) -> "TrainConfig":
        """A copy with the data-dependent defaults filled in, after checking every value."""
        c = dataclasses.replace(self)
        for f in dataclasses.fields(c):                 # numpy scalars as Python's (a checkpoint's JSON)
            if isinstance(getattr(c, f.name), np.generic):
                setattr(c, f.name, getattr(c, f.name).item())
        if c.text is not None:                          # absolute: a resume from another folder finds it
            if not isinstance(c.text, (str, os.PathLike)):
                raise TypeError(f"text: expected a path or None, got {type(c.text).__name__}")
            if str(c.text) == "":
                raise ValueError("text: an empty path names no file")
            c.text = str(Path(c.text).resolve())
        if c.val_fraction is None:
            c.val_fraction = 0.0 if c.max_chars is not None else 0.1
        data.fraction("val_fraction", c.val_fraction)
        if c.lr is None:
            c.lr = 1.0 if c.optimizer == "sgd" else 0.002
        for name in ("num_layers", "hidden", "num_steps", "batch_size", "epochs"):
            data.positive_int(name, getattr(c, name))
        if c.max_chars is not None:
            data.positive_int("max_chars", c.max_chars)
        if isinstance(c.seed, bool) or not isinstance(c.seed, (int, np.integer)) or c.seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {c.seed!r}")
        for name in ("lr", "clip"):
            v = getattr(c, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or math.isnan(v):
                raise ValueError(f"{name}: expected a positive number, got {v!r}")
        if not math.isfinite(c.lr):
            raise ValueError(f"lr: expected a finite positive number, got {c.lr!r}")
        for name, allowed in (("cell", CELLS), ("tokenize", data.TOKENIZERS), ("optimizer", ("sgd", "adam")),
                              ("sampling", tuple(data.SAMPLERS)), ("activation", ("tanh", "relu", "identity")),
                              ("device", ("cpu", "cuda"))):
            if getattr(c, name) not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {getattr(c, name)!r}")
        if c.cell != "rnn" and c.activation != "tanh":
            raise ValueError(f"activation: applies to the rnn cell only, got {c.activation!r} with "
                             f"cell {c.cell!r} (its nonlinearities are fixed)")
        c.init = api._init_kind(c.init, c.cell)
        parse_truncation(c.truncation)
        c.stored_states = parse_stored_states(c.stored_states)
        return c


@dataclass
class TrainResult:
    params: dict
    vocab: data.Vocab
    history: list
    config: TrainConfig
    stopped: str = "done"             # done | max-minutes | nothing (resumed at or past its epochs)
    checkpointed: int | None = None   # the epoch of the checkpoint written or kept (None: none)
    generated: dict = field(default_factory=dict)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C: stopped after saving the last completed epoch."""


class OutputError(OSError):
    """Writing the checkpoint, the JSON log or the plot failed (a full disk, ...); the
    checkpoint written before, if any, is kept."""


def perplexity(mean_loss):
    """exp(mean loss); inf where that is beyond the float range (a loss above ~709.78)."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


@contextlib.contextmanager
def _named(param, option):
    """A ValueError raised inside that starts with ``param:`` (the parameter of a function
    called, e.g. :func:`data.load_text`'s ``path``) starts with ``option:`` instead: the
    name the caller of :func:`train` gave it (``text``)."""
    try:
        yield
    except ValueError as e:
        msg = str(e)
        if not msg.startswith(f"{param}: "):
            raise
        raise ValueError(f"{option}: {msg[len(param) + 2:]}") from None


def parse_truncation(spec):
    """``full`` → None, ``k:N`` → Truncated(N), ``random:P`` → p (Randomized is drawn per step)."""
    if spec == "full":
        return None
    m = re.fullmatch(r"k:(\d+)|random:([0-9.eE+-]+)", str(spec))
    try:
        if m and m.group(1) is not None:
            return Truncated(int(m.group(1)))
        if m:
            return Randomized(float(m.group(2))).p
    except (TypeError, ValueError) as e:
        raise ValueError(f"truncation: {e}") from None
    raise ValueError(f"truncation: expected full, k:N (N >= 1) or random:P (0 < P <= 1), got {spec!r}")


def parse_stored_states(spec):
    """None, "sqrt" or a positive int, from the CLI's text ("all" and "none" are None) or the API's value"""
    if spec is None:
        return None
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s in ("all", "none", "sqrt"):
            return "sqrt" if s == "sqrt" else None
        if s.isdigit() and int(s) >= 1:
            return int(s)
    elif not isinstance(spec, (int, np.integer)) or isinstance(spec, bool):
        raise TypeError(f"stored_states: expected all, sqrt or an integer N >= 1, got {type(spec).__name__}")
    elif spec >= 1:
        return int(spec)
    raise ValueError(f"stored_states: expected all, sqrt or an integer N >= 1, got {spec!r}")


# --------------------------------------------------------------------------- corpus
@dataclass
class Corpus:
    """The training and validation ids (slices of one read-only memmap for a cached text), the
    training split's vocabulary and the sha256 of the text's bytes (what resume checks)."""

    vocab: data.Vocab
    train: np.ndarray
    val: np.ndarray
    sha256: str
    file: str | None = None           # the cached ids file they are mapped from; None: in memory


def load_corpus(cfg: TrainConfig, quiet=False) -> Corpus:
    """``cfg.text`` tokenized once into the cache and mapped from it (:func:`fastbptt.corpus.token_ids`;
    a small text in memory), cut by ``max_chars`` and ``val_fraction`` without copying
    (:func:`fastbptt.corpus.split`): the same vocabulary and ids as tokenizing it in memory."""
    with _named("path", "text"), _named("mode", "tokenize"):
        ids = token_ids(cfg.text, cfg.tokenize, quiet=quiet)
    vocab, train, val = split(ids, cfg.max_chars, cfg.val_fraction)
    with _named("n_tokens", "max_chars" if cfg.max_chars is not None else "text"):   # what cut it short
        data.check_length(len(train), cfg.num_steps, cfg.batch_size, "training split")
    return Corpus(vocab, train, val, ids.sha256, ids.file)


# ---------------------------------------------------------------------- optimization
def clip_gradients(grads, theta):
    """Global-norm clipping over the parameter gradients (not ∂h0, ∂c0), in place; returns the norm."""
    gs = [g.ravel() for k, g in grads.items() if k not in STATE_GRADS]
    with np.errstate(over="ignore", invalid="ignore"):
        norm = math.sqrt(sum(float(np.dot(g, g)) for g in gs))
        if math.isinf(norm):             # a float32 sum of squares past 3.4e38: summed scaled instead
            top = max(float(np.abs(g).max(initial=0)) for g in gs)
            if math.isfinite(top):
                norm = top * math.sqrt(sum(float(np.dot(g / top, g / top)) for g in gs))
    if norm > theta:
        s = theta / norm
        for k, g in grads.items():
            if k not in STATE_GRADS:
                g *= s
    return norm


class SGD:
    """p ← p − lr·g (the book's ``sgd`` with batch_size=1: the loss is already a mean)."""

    def __init__(self, params, lr):
        self.lr = lr

    def step(self, params, grads):
        for k, p in params.items():
            g = grads[k]
            g *= self.lr
            p -= g

    def state(self):
        return {}

    @staticmethod
    def state_shapes(shapes):
        """the shapes of state()'s arrays for params of these shapes"""
        return {}

    def load(self, state):
        pass


class Adam:
    """Adam (Kingma & Ba 2015), bias-corrected, in place: no temporaries, the gradient
    array (the trainer's own) serves as scratch."""

    def __init__(self, params, lr, beta1=0.9, beta2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, beta1, beta2, eps
        self.m = {k: np.zeros_like(p) for k, p in params.items()}
        self.v = {k: np.zeros_like(p) for k, p in params.items()}
        self.t = 0

    def step(self, params, grads):
        self.t += 1
        c1 = 1.0 - self.b1 ** self.t
        c2 = 1.0 - self.b2 ** self.t
        for k, p in params.items():
            g, m, v = grads[k], self.m[k], self.v[k]
            m -= g                          # m ← b1·m + (1−b1)·g  =  b1·(m − g) + g
            m *= self.b1
            m += g
            g *= g                          # v ← b2·v + (1−b2)·g²
            v -= g
            v *= self.b2
            v += g
            np.divide(v, c2, out=g)         # p ← p − lr/c1 · m / (√(v/c2) + eps)
            np.sqrt(g, out=g)
            g += self.eps
            np.divide(m, g, out=g)
            g *= self.lr / c1
            p -= g

    def state(self):
        out = {f"m/{k}": v for k, v in self.m.items()}
        out.update({f"v/{k}": v for k, v in self.v.items()})
        out["t"] = np.array(self.t)
        return out

    @staticmethod
    def state_shapes(shapes):
        """the shapes of state()'s arrays for params of these shapes"""
        out = {f"{moment}/{k}": shape for moment in "mv" for k, shape in shapes.items()}
        out["t"] = ()
        return out

    def load(self, state):
        for k in self.m:
            self.m[k][...] = state[f"m/{k}"]
            self.v[k][...] = state[f"v/{k}"]
        self.t = int(state["t"])


OPTIMIZERS = {"sgd": SGD, "adam": Adam}


# ---------------------------------------------------------------------- epochs
def rank_columns(B, comm):
    """The columns [lo, hi) of a global batch of B streams that ``comm``'s rank owns:
    [r·B/N, (r+1)·B/N), so the N slices tile the batch in rank order."""
    return comm.rank * B // comm.size, (comm.rank + 1) * B // comm.size


class GradReducer:
    """One minibatch's (loss, gradients) summed over the ranks with one Allreduce: each rank
    packs its gradients, scaled by its share of the batch (B_r/B: its loss is a mean over
    T·B_r tokens), and its scaled loss into one flat buffer; the sum is the global mean's.
    The reduced gradients are views of the buffer (the optimizer may scratch them).  With
    one process it hands everything back untouched."""

    def __init__(self, params, comm, B):
        self.comm, self.keys = comm, list(params)
        lo, hi = rank_columns(B, comm)
        dtype = next(iter(params.values())).dtype
        self.scale = dtype.type((hi - lo) / B)
        self.buf = np.empty(sum(p.size for p in params.values()) + 1, dtype) if comm.size > 1 else None

    def __call__(self, loss, grads):
        if self.buf is None:
            return loss, grads
        views = distributed.pack(grads, self.keys, self.buf, self.scale, (float(loss) * float(self.scale),))
        self.comm.allreduce(self.buf)
        return float(self.buf[-1]), views


def train_epoch(params, opt, corpus_ids, cfg, rng, trunc, comm=None, deadline=None):
    """One pass over the training split.  Returns (Σ loss·tokens, tokens, norms, clipped, steps,
    complete) with ``norms`` the list of the steps' gradient norms before clipping; with a
    ``deadline`` (a time.perf_counter() value), the pass stops at the first minibatch past it
    (rank 0's clock decides for every rank) and ``complete`` is False.  The state carried
    is what loss_and_grad returns and takes: an array, or the LSTM's (h, c).

    With ``comm`` of N ranks, every rank draws the same global batch from the same ``rng``
    (so the draws are one process's) and computes on its own columns (:func:`rank_columns`),
    carrying their state; the losses and gradients are summed by :class:`GradReducer`, so the
    clipping, the update and every figure returned are the global batch's on every rank."""
    comm = comm or distributed.SelfComm()
    lo, hi = rank_columns(cfg.batch_size, comm)
    reduce = GradReducer(params, comm, cfg.batch_size)
    total, n, norms, clipped, steps = 0.0, 0, [], 0, 0
    state = None
    sampler = data.SAMPLERS[cfg.sampling]
    for X, Y in sampler(corpus_ids, cfg.batch_size, cfg.num_steps, rng):
        if deadline is not None and steps and comm.bcast(time.perf_counter() > deadline):
            return total, n, norms, clipped, steps, False
        if cfg.sampling == "random":
            state = None
        tr = Randomized(trunc, seed=int(rng.integers(2**63))) if isinstance(trunc, float) else trunc
        if comm.size > 1:
            X, Y, size = X[:, lo:hi], Y[:, lo:hi], X.size
        else:
            size = X.size
        loss, grads, state = api.loss_and_grad(params, X, Y, state, activation=cfg.activation,
                                               truncation=tr, device=cfg.device,
                                               stored_states=cfg.stored_states)
        loss, grads = reduce(loss, grads)
        if not math.isfinite(loss):
            return loss, n, norms, clipped, steps, True
        norm = clip_gradients(grads, cfg.clip)
        with np.errstate(over="ignore", invalid="ignore"):
            opt.step(params, grads)
            # ‖p‖² is inf/nan iff an update overflowed; one BLAS dot per array, no copy
            if not all(math.isfinite(np.dot(p.ravel(), p.ravel())) for p in params.values()):
                return math.inf, n, norms, clipped, steps, True
        total += loss * size
        n += size
        norms.append(norm)
        clipped += norm > cfg.clip
        steps += 1
    return total, n, norms, clipped, steps, True


def evaluate(params, ids, cfg, comm=None):
    """Perplexity of ``ids``: forward only, state carried across windows of num_steps.  With
    ``comm``, each rank runs its columns of the streams and one Allreduce sums the losses
    and token counts."""
    comm = comm or distributed.SelfComm()
    total, n, state = 0.0, 0, None
    for X, Y in data.eval_batches(ids, cfg.batch_size, cfg.num_steps):
        if comm.size > 1:
            lo, hi = rank_columns(X.shape[1], comm)
            if lo == hi:
                continue
            X, Y = X[:, lo:hi], Y[:, lo:hi]
        loss, state = api.loss(params, X, Y, state, activation=cfg.activation, reduction="sum",
                               device=cfg.device)
        total += loss
        n += X.size
    if comm.size > 1:
        total, n = comm.allreduce(np.array([total, n], np.float64))
    return perplexity(total / n)


# ------------------------------------------------------------------------ checkpoints
def save_checkpoint(path, params, opt_state, vocab, cfg, rng_state, epoch, history, sha256):
    """Atomically (temporary file + rename) write everything needed to resume exactly."""
    meta = {"config": dataclasses.asdict(cfg), "vocab": vocab.idx_to_token, "epoch": epoch,
            "history": history, "rng": rng_state, "text_sha256": sha256}
    arrays = {f"param/{k}": v for k, v in params.items()}
    arrays.update({f"opt/{k}": v for k, v in opt_state.items()})
    arrays["format"] = np.array(CHECKPOINT_FORMAT)
    arrays["meta"] = np.array(json.dumps(meta))
    with written_whole(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def param_shapes(cell, num_layers, V, H):
    """The shapes of the params of a model on a vocabulary of V: the API's schema of the cell
    (layer l's keys carry the suffix ``_l{l}`` from l = 1, and read the layer below: D = H),
    one-hot input (D = V) and a head onto the vocabulary (Q = V)."""
    return api._schema(cell, num_layers, V, H, V)


def load_checkpoint(path):
    """(params, optimizer state, meta) of a checkpoint, or ValueError saying what is wrong."""
    p = check_input("path", path)
    try:
        with open(p, "rb") as f:
            if f.read(4) != b"PK\x03\x04":      # not even the start of a zip (an .npz)
                raise ValueError(f"path: {path} is not a fastbptt checkpoint (not an .npz archive)")
        with np.load(p, allow_pickle=False) as z:
            files = set(z.files)
            if "format" not in files or str(z["format"]) != CHECKPOINT_FORMAT:
                raise ValueError(f"path: {path} is not a fastbptt checkpoint")
            meta = json.loads(str(z["meta"]))
            params = {k[6:]: z[k] for k in files if k.startswith("param/")}
            opt = {k[4:]: z[k] for k in files if k.startswith("opt/")}
    except ValueError as e:
        if str(e).startswith("path: "):
            raise
        raise ValueError(f"path: {path} is not a fastbptt checkpoint ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"path: {path} is truncated or corrupt ({type(e).__name__}: {e})") from None
    try:
        cfg = TrainConfig(**meta["config"])
        shapes = param_shapes(cfg.cell, cfg.num_layers, len(meta["vocab"]), cfg.hidden)
        if {k: tuple(v.shape) for k, v in params.items()} != shapes:
            raise ValueError("parameter shapes do not match its vocabulary, hidden, cell and num_layers")
        if {k: tuple(v.shape) for k, v in opt.items()} != OPTIMIZERS[cfg.optimizer].state_shapes(shapes):
            raise ValueError(f"its optimizer state is not that of {cfg.optimizer} for its parameters")
        np.random.default_rng().bit_generator.state = meta["rng"]      # a generator's state, or an error
        epoch, history = meta["epoch"], meta["history"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch {epoch!r} is not a count of epochs")
        if not isinstance(history, list) or not all(
                isinstance(r, dict) and isinstance(r.get("epoch"), int) and isinstance(r.get("elapsed_s"), (int, float))
                for r in history):
            raise ValueError("its history is not a list of epoch rows")
        meta["config"] = cfg
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"path: {path} is truncated or corrupt ({e})") from None
    return params, opt, meta


def merge_resume_config(saved: TrainConfig, given: dict) -> TrainConfig:
    """The saved configuration, with the options that may change taken from ``given``;
    any other given option that differs from the saved one is an error."""
    def same(k, v, was):
        if k == "text" and v is not None and was is not None and isinstance(v, (str, os.PathLike)):
            return Path(v).resolve() == Path(was).resolve()     # as given, or as the run stored it
        return v == was
    conflicts = [f"{k}={v!r} (checkpoint: {getattr(saved, k)!r})" for k, v in given.items()
                 if k not in TrainConfig.RESUMABLE and not same(k, v, getattr(saved, k))]
    if conflicts:
        raise ValueError("resume: options conflict with the checkpoint's configuration: "
                         + "; ".join(conflicts))
    return dataclasses.replace(saved, **{k: v for k, v in given.items() if k in TrainConfig.RESUMABLE})


# ------------------------------------------------------------------------------- train
#: the book's prefixes of the samples printed after training; for a text whose vocabulary
#: lacks their characters, the samples start from that text's opening instead
BOOK_PREFIXES = ("time traveller", "traveller")


def train(*, checkpoint=None, checkpoint_every=1, resume=False, overwrite=False, json_log=None, plot=None,
          max_minutes=None, quiet=False, sample_prefixes=BOOK_PREFIXES, comm=None,
          **options) -> TrainResult:
    """Train the character-level language model; returns params, vocab and history.

    ``options`` are the fields of :class:`TrainConfig` (``text``, ``hidden``, ``lr``, …).
    ``checkpoint``: a ``.npz`` path written atomically every ``checkpoint_every`` epochs;
    one that exists is an error unless ``resume=True``, which continues from it exactly
    (options not given, ``cell`` and ``num_layers`` among them, are the checkpoint's; those
    given must agree with it, except ``epochs``, ``device`` and ``stored_states``), or ``overwrite=True``,
    which starts over.  ``json_log``: one JSON object per epoch with :data:`LOG_KEYS`.
    ``plot``: a PNG of perplexity against epoch (needs matplotlib).  ``sample_prefixes``: the
    texts generated after training (50 tokens from each prefix; None or () for none); by
    default :data:`BOOK_PREFIXES`, or the text's first ten tokens where its vocabulary lacks
    their characters.  ``max_minutes``: stop
    at the first minibatch past that; an epoch stopped within is in the history (its row
    has ``"partial": True``, no validation) and in the params returned, not in a checkpoint.

    ``comm``: an mpi4py communicator to train data-parallel on (None: MPI_COMM_WORLD when
    started by ``mpiexec -n N`` with N > 1, else one process).  Each rank computes its
    ``batch_size/N`` columns of every global batch, one Allreduce per minibatch sums the
    gradients and loss, and rank 0 alone writes the checkpoint, log and plot (and reads the
    checkpoint to resume, for all); the perplexities are one process's with the same batch,
    up to the order of float summation.  ``batch_size`` must divide across the ranks.  Every
    rank raises the same exception for an error found on any (an exception on one rank
    alone aborts the job, exit 2: see :mod:`fastbptt.distributed`).

    Everything that can be checked before training is: bad options, output folders that
    are missing or not writable, a missing extra (matplotlib for ``plot``, numba-cuda and a
    GPU for ``device="cuda"``) and a model larger than the memory.  Raises ValueError for
    those, :class:`fastbptt._preflight.MissingExtra` (an ImportError) for a missing extra,
    :class:`TrainingDiverged` on a NaN/inf loss or perplexity, :class:`OutputError` when a
    write fails mid-run and :class:`TrainingInterrupted` on Ctrl-C; the checkpoint last
    written is kept in each case.
    """
    sample_prefixes = _prefixes(sample_prefixes)
    comm = distributed.communicator(comm)
    with distributed.guard(comm, "fastbptt train"), distributed.rank_threads(comm), contextlib.ExitStack() as held:
        return _train(comm, held, checkpoint, checkpoint_every, resume, overwrite, json_log, plot, max_minutes,
                      quiet, sample_prefixes, options)


def _prefixes(sample_prefixes):
    """the prefixes to sample from after training: a tuple of non-empty strings (None: none;
    one string: that one)"""
    if sample_prefixes is None:
        return ()
    if isinstance(sample_prefixes, str):
        sample_prefixes = (sample_prefixes,)
    try:
        prefixes = tuple(sample_prefixes)
    except TypeError:
        raise TypeError(f"sample_prefixes: expected strings, got {type(sample_prefixes).__name__}") from None
    if not all(isinstance(p, str) and p for p in prefixes):
        raise ValueError(f"sample_prefixes: expected non-empty strings, got {prefixes!r}")
    return prefixes


def _check_options(options, checkpoint, checkpoint_every, resume, overwrite, max_minutes):
    """TypeError/ValueError for options that are wrong whatever the files say."""
    unknown = set(options) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"train: unknown option(s) {', '.join(sorted(unknown))}")
    data.positive_int("checkpoint_every", checkpoint_every)
    if max_minutes is not None and not (isinstance(max_minutes, (int, float)) and max_minutes > 0):
        raise ValueError(f"max_minutes: expected a positive number, got {max_minutes!r}")
    if resume and overwrite:
        raise ValueError("overwrite: starts the checkpoint over, resume continues it: give one of them")
    if resume and checkpoint is None:
        raise ValueError("resume: needs checkpoint=PATH, the checkpoint of the run to continue")


def _check_ranks(cfg, comm):
    """ValueError unless the global batch divides across the ranks."""
    if cfg.batch_size % comm.size:
        raise ValueError(f"batch_size: {cfg.batch_size} does not divide across {comm.size} MPI ranks: "
                         f"give a multiple of {comm.size} (each rank computes batch_size/{comm.size} streams)")


def _train(comm, held, checkpoint, checkpoint_every, resume, overwrite, json_log, plot, max_minutes, quiet,
           sample_prefixes, options):
    root = comm.rank == 0
    distributed.agree(comm, lambda: _check_options(options, checkpoint, checkpoint_every, resume, overwrite,
                                                   max_minutes))
    # every rank's own command line (the text by its bytes, below): the same, or a rank would
    # wait in a collective call that another never makes (an epoch more, a checkpoint, a log)
    distributed.check_same(comm, {**{k: v for k, v in options.items() if k != "text"}, "resume": resume,
                                  "checkpoint": checkpoint is not None, "checkpoint_every": checkpoint_every,
                                  "json_log": json_log is not None, "plot": plot is not None,
                                  "max_minutes": max_minutes})
    saved = None
    if resume:                       # rank 0 reads it for all: the other ranks need no shared disk

        def read():
            with _named("path", "checkpoint"):
                check_input("path", checkpoint)
                held.enter_context(_checkpoint_lock(checkpoint))    # before reading: no other trainer's run
                return load_checkpoint(checkpoint)
        saved = distributed.agree_root(comm, read)

    def configure():
        if resume:
            cfg = merge_resume_config(saved[2]["config"], options).resolved()
        else:
            cfg = TrainConfig(**options).resolved()
        _check_ranks(cfg, comm)
        if root:
            _check_outputs(checkpoint, json_log, plot, resume, overwrite, cfg.text)
            if checkpoint is not None and not resume:      # until train returns (``held``: an ExitStack)
                held.enter_context(_checkpoint_lock(checkpoint))
        if cfg.device == "cuda":
            require_cuda("device")
        return cfg

    cfg = distributed.agree(comm, configure)
    if comm.size > 1:                # rank 0 tokenizes a new text into the cache once; the others map it
        distributed.agree_root(comm, lambda: load_corpus(cfg, quiet=quiet) and None)

    def prepare():
        corpus = load_corpus(cfg, quiet=quiet or not root)
        check_memory(cfg, len(corpus.vocab))
        if resume and (saved[2]["text_sha256"] != corpus.sha256 or saved[2]["vocab"] != corpus.vocab.idx_to_token):
            raise ValueError("resume: the text differs from the one the checkpoint was trained on")
        try:
            params = api.init_params(len(corpus.vocab), cfg.hidden, len(corpus.vocab), seed=cfg.seed,
                                     cell=cfg.cell, num_layers=cfg.num_layers, init=cfg.init)
            opt = OPTIMIZERS[cfg.optimizer](params, cfg.lr)
        except (MemoryError, ValueError) as e:     # init_params says "hidden_size: ..." for its MemoryError
            if isinstance(e, ValueError) and not str(e).startswith("hidden_size: "):
                raise
            raise ValueError(f"hidden: not enough memory for the model ({cfg.cell}, hidden={cfg.hidden}, "
                             f"num_layers={cfg.num_layers}): {_first_line(e)}") from None
        return corpus, params, opt

    corpus, params, opt = distributed.agree(comm, prepare)
    distributed.check_same(comm, {"text": f"a text of sha256 {corpus.sha256[:16]}"})
    rng = np.random.default_rng(cfg.seed)
    history, start = [], 0
    if resume:
        saved_params, saved_opt, meta = saved
        for k in params:
            params[k][...] = saved_params[k]
        opt.load(saved_opt)
        rng.bit_generator.state = meta["rng"]
        history, start = meta["history"], meta["epoch"]
    trunc = parse_truncation(cfg.truncation)
    elapsed0 = history[-1]["elapsed_s"] if history else 0.0
    t_start = time.perf_counter()
    deadline = None if max_minutes is None else t_start + 60 * max_minutes
    snapshot = None                  # the last epoch end not yet on disk (for Ctrl-C)
    saved_epoch = start if resume else None
    stopped = "done" if start < cfg.epochs else "nothing"
    epoch = start                    # the epoch running, from 0

    def kept():
        if not checkpoint:
            return ""
        if saved_epoch is None:
            return "; no checkpoint of this run was written"
        return f"; the checkpoint of epoch {saved_epoch} is kept"

    def write(state):
        done, p, o, r, h = state
        try:
            save_checkpoint(checkpoint, p, o, corpus.vocab, cfg, r, done, h, corpus.sha256)
        except OSError as e:
            raise OutputError(f"checkpoint: could not write {checkpoint} at epoch {done} "
                              f"({_reason(e)}){kept()}") from None

    def save(state):
        """rank 0 writes; a failure is raised on every rank (one bcast)"""
        distributed.agree_root(comm, lambda: write(state))

    def diverged(what, value):       # every rank sees the same reduced values: all come here
        nonlocal saved_epoch, snapshot
        if snapshot is not None:     # the last good epoch, not yet on disk
            save(snapshot)
            saved_epoch, snapshot = snapshot[0], None
        return distributed.collective(TrainingDiverged(
            f"epoch {epoch + 1}: the {what} became {value} — lower lr (now {cfg.lr}) "
            f"or clip harder (clip, now {cfg.clip}){kept()}"))

    def log():
        try:
            _write_json_log(json_log, history)
        except OSError as e:
            raise OutputError(f"json_log: could not write {json_log} at epoch {epoch + 1} "
                              f"({_reason(e)}){kept()}") from None

    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.epochs, initial=start, disable=quiet or not root, unit="epoch", dynamic_ncols=True)
    try:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            total, n, norms, clipped, steps, complete = train_epoch(params, opt, corpus.train, cfg, rng, trunc,
                                                                    comm, deadline)
            dt = time.perf_counter() - t0
            if not math.isfinite(total):
                raise diverged("loss", total)
            train_ppl = perplexity(total / n)
            if not math.isfinite(train_ppl):
                raise diverged("perplexity", f"{train_ppl} (a mean loss of {total / n:.4g})")
            val_ppl = evaluate(params, corpus.val, cfg, comm) if complete and len(corpus.val) > 1 else None
            if val_ppl is not None and not math.isfinite(val_ppl):
                raise diverged("validation perplexity", val_ppl)
            row = {"epoch": epoch + 1, "train_ppl": train_ppl, "val_ppl": val_ppl,
                   "tokens_per_s": n / dt, "grad_norm": float(np.mean(norms)),
                   "clipped_frac": clipped / steps, "lr": cfg.lr,
                   "elapsed_s": elapsed0 + time.perf_counter() - t_start,
                   # beyond the JSON log: for diagnostics (fastbptt diagnose)
                   "tokens": n, "grad_norm_quantiles": np.quantile(norms, QUANTILES).tolist()}
            if not complete:         # --max-minutes within an epoch: no validation, no checkpoint of it
                row["partial"] = True
            history.append(row)
            if json_log:
                distributed.agree_root(comm, log)
            if not complete:
                bar.set_postfix({"ppl": f"{train_ppl:.2f}", "stopped": f"after {steps} minibatches"})
                stopped = "max-minutes"
                break
            if checkpoint:
                state = (epoch + 1, params, opt.state(), rng.bit_generator.state, history)
                if (epoch + 1) % checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                    save(state)
                    saved_epoch, snapshot = epoch + 1, None
                elif root:           # keep a copy: a Ctrl-C mid-epoch must not save half an epoch
                    snapshot = (epoch + 1, {k: v.copy() for k, v in params.items()},
                                {k: np.copy(v) for k, v in opt.state().items()}, state[3], list(history))
                else:                # the other ranks only need to know there is one
                    snapshot = (epoch + 1, None, None, None, None)
            post = {"ppl": f"{row['train_ppl']:.2f}", "tok/s": f"{row['tokens_per_s']:,.0f}"}
            if row["val_ppl"] is not None:
                post["val"] = f"{row['val_ppl']:.2f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            # rank 0's clock decides for all: the ranks must leave the loop at the same epoch
            if max_minutes is not None and comm.bcast(time.perf_counter() - t_start > 60 * max_minutes):
                stopped = "max-minutes"
                break
        if snapshot is not None:     # stopped early between two checkpoint epochs
            save(snapshot)
            saved_epoch, snapshot = snapshot[0], None
    except KeyboardInterrupt:
        if snapshot is not None and root:      # rank 0 alone, no collective: the others stopped anywhere
            write(snapshot)
            saved_epoch = snapshot[0]
        if checkpoint and saved_epoch is not None:
            raise _interrupted(f"interrupted after epoch {saved_epoch}; resume with: fastbptt train "
                               f"--checkpoint {checkpoint} --resume") from None
        if checkpoint:
            raise _interrupted(f"interrupted in epoch {epoch + 1}, before the first checkpoint: "
                               "nothing of this run was saved") from None
        done = f"after epoch {history[-1]['epoch']}" if history else f"in epoch {epoch + 1}"
        raise _interrupted(f"interrupted {done}; pass --checkpoint PATH to be able to resume") from None
    finally:
        bar.close()
    if plot:
        def draw():
            try:
                plot_history(history, plot)
            except OSError as e:
                raise OutputError(f"plot: could not write {plot} ({_reason(e)}){kept()}") from None
        distributed.agree_root(comm, draw)
    result = TrainResult(params, corpus.vocab, history, cfg, stopped, saved_epoch)
    from .generation import generate
    if sample_prefixes is BOOK_PREFIXES:
        sample_prefixes = ([p for p in sample_prefixes if not corpus.vocab.unknown(p)]
                           or [corpus.vocab.decode(corpus.train[:10])])
    for prefix in sample_prefixes:
        result.generated[prefix] = generate(params, corpus.vocab, prefix, 50, activation=cfg.activation)
    return result


def _interrupted(message):
    """TrainingInterrupted; under MPI, :func:`distributed.guard` ends the job with it (exit 130)."""
    e = TrainingInterrupted(message)
    e.interrupted = True
    return e


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _reason(e):
    """An OSError's reason, without the file name the message names already."""
    return e.strerror or _first_line(e)


def _check_outputs(checkpoint, json_log, plot, resume, overwrite, text):
    """ValueError unless every output can be written, is a file of its own (not the text, not
    another output), and a checkpoint that exists is resumed or to be overwritten; MissingExtra
    for a plot without matplotlib."""
    check_distinct({"checkpoint": checkpoint, "json_log": json_log, "plot": figure_file(plot)}, [text])
    if checkpoint is not None:
        check_output("checkpoint", checkpoint, replaced=True)
        if not resume and not overwrite and Path(checkpoint).exists():
            raise ValueError(f"checkpoint: {checkpoint} exists: continue it with --resume, or start "
                             "over with --overwrite")
    if json_log is not None:
        check_output("json_log", json_log)
    if plot is not None:
        require_matplotlib("plot")
        check_figure("plot", plot)


@contextlib.contextmanager
def _checkpoint_lock(checkpoint):
    """hold the lock file ``.NAME.lock`` beside the checkpoint while a trainer may write it: a
    second trainer on the same checkpoint is refused (ValueError) instead of both writing it.
    The file is removed by its holder; one removed between another's open and lock is opened
    again.  Where there is no flock (Windows, some network file systems), nothing is held."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    p = Path(checkpoint)
    path = p.parent / f".{p.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:                      # a folder it cannot write in (the outputs' checks say so)
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(f"checkpoint: {checkpoint} is in use by another fastbptt train (pid {pid})") from None
        except OSError:                      # no locks here: run unguarded
            os.close(fd)
            yield
            return
        try:
            current = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _physical_memory():
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(cfg, V):
    """ValueError if the parameters, their gradients (and Adam's moments) alone exceed the
    machine's memory: fail now, not in an allocation minutes later or by the OOM killer."""
    n = sum(math.prod(s) for s in param_shapes(cfg.cell, cfg.num_layers, V, cfg.hidden).values())
    need = 4 * n * (4 if cfg.optimizer == "adam" else 2)     # float32: params and gradients (m, v)
    ram = _physical_memory()
    if ram and need > ram:
        raise ValueError(f"hidden: the {cfg.cell} model of hidden={cfg.hidden}, num_layers={cfg.num_layers} "
                         f"has {n:,} parameters, {need / 2**30:,.1f} GiB with its gradients"
                         f"{' and Adam moments' if cfg.optimizer == 'adam' else ''}: more than this "
                         f"machine's {ram / 2**30:,.1f} GiB of memory")


def _write_json_log(path, history):
    """the log, written whole (a full disk leaves the log of the epochs before as it was)"""
    buf = io.StringIO()
    for row in history:
        buf.write(json.dumps({k: row[k] for k in LOG_KEYS + ("partial",) if k in row}) + "\n")
    write_text_whole(path, buf.getvalue())


def plot_history(history, path):
    """PNG of train (and validation) perplexity against epoch."""
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_ppl"] for r in history], label="train")
    if any(r["val_ppl"] is not None for r in history):
        ax.plot(epochs, [r["val_ppl"] for r in history], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save(fig, path)
