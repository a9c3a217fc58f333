"""``fastbptt train | generate | bench | diagnose | tune`` — the command line (also ``python -m fastbptt``).

Bad input prints one line on stderr and exits with code 2, and so does a run that needs
an extra that is not installed (matplotlib for figures, torch/jax for the peers asked
for, numba-cuda and a GPU for ``--device cuda``), an output folder that is missing or
read-only, or a write that fails (a full disk) — all but the last checked before any
work; a diverged training exits with 3; Ctrl-C with 130.  The library's errors name the
parameter at fault (``path: no such file: …``); here they name the flag that fed it
(``--text: no such file: …``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import warnings

import numpy as np

from . import __version__
from ._preflight import (MissingExtra, check_distinct, check_figure, check_folder, check_output, figure_file,
                         require_cuda, require_matplotlib, require_modules)

EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130

#: The flags of the library's parameters that are not named like an option of the command
#: (those are that option: ``num_steps`` is ``--num-steps``, ``prefix`` ``--prefix``).
PARAM_FLAGS = {"path": "--text",          # data.load_text (load_checkpoint's: _load_checkpoint)
               "mode": "--tokenize",      # data.tokenize
               "n_tokens": "--text"}      # data.check_length


def flag_message(message, options, aliases=PARAM_FLAGS):
    """``message`` — a library error or warning, ``name: …`` — with ``name`` replaced by the
    flag that fed it: ``aliases[name]``, else ``--name`` (``_`` as ``-``), provided that flag
    is one of ``options`` (the command's option names, as argparse's ``dest``); else as is."""
    name, sep, rest = message.partition(": ")
    if not sep:
        return message
    flag = aliases.get(name) or f"--{name.replace('_', '-')}"
    return f"{flag}: {rest}" if flag[2:].replace("-", "_") in options else message


def _load_checkpoint(path):
    """:func:`trainer.load_checkpoint` of ``--checkpoint``, whose ``path`` is that flag."""
    from .trainer import load_checkpoint
    try:
        return load_checkpoint(path)
    except ValueError as e:
        raise ValueError(flag_message(str(e), {"checkpoint"}, {"path": "--checkpoint"})) from None


def _train_parser(sub):
    p = sub.add_parser("train", help="train the character-level RNN language model",
                       description="Train the book's character-level RNN language model (d2l 0.17 "
                                   "§8.5), or a GRU or LSTM, in a stack of layers. Defaults are the book's.")
    # every model/data option defaults to None here: "not given", so that --resume can
    # tell given options (which must agree with the checkpoint) from defaults
    g = p.add_argument_group("data")
    g.add_argument("--text", metavar="PATH", help="UTF-8 text file (default: the embedded The Time Machine)")
    g.add_argument("--tokenize", choices=["book", "chars"],
                   help="book: letters only, lower case, lines joined (d2l 0.17); chars: raw characters "
                        "(default: book)")
    g.add_argument("--max-chars", type=int, metavar="N", help="keep the first N tokens (the book: 10000)")
    g.add_argument("--val-fraction", type=float, metavar="F",
                   help="hold out the last F of the tokens for validation (default: 0 with --max-chars, else 0.1)")
    g = p.add_argument_group("model and optimization")
    g.add_argument("--cell", metavar="rnn|gru|lstm", help="the recurrent cell (default: rnn)")
    g.add_argument("--num-layers", type=int, metavar="N", help="stacked layers of the cell (default: 1)")
    g.add_argument("--init", choices=["normal", "uniform"],
                   help="initial weights: normal: N(0, 0.01²), zero biases (the book's from scratch); "
                        "uniform: U(±1/√H) (PyTorch's; the book's concise) (default: normal for rnn, "
                        "uniform for gru and lstm)")
    g.add_argument("--hidden", type=int, help="hidden size H (default: 512)")
    g.add_argument("--num-steps", type=int, help="time steps T per minibatch (default: 35)")
    g.add_argument("--batch-size", type=int, help="sequences B per minibatch (default: 32)")
    g.add_argument("--lr", type=float, help="learning rate (default: 1 for sgd, 0.002 for adam)")
    g.add_argument("--optimizer", choices=["sgd", "adam"], help="(default: sgd)")
    g.add_argument("--epochs", type=int, help="epochs to train to (default: 500)")
    g.add_argument("--clip", type=float, metavar="THETA",
                   help="global gradient-norm clipping threshold; inf disables (default: 1)")
    g.add_argument("--sampling", choices=["sequential", "random"],
                   help="sequential: state carried across minibatches (detached); random: shuffled "
                        "windows, state reset (default: sequential)")
    g.add_argument("--truncation", metavar="full|k:N|random:P",
                   help="full BPTT, Truncated(N) per loss term, or Randomized(P) (default: full)")
    g.add_argument("--stored-states", metavar="all|sqrt|N",
                   help="hidden states the forward keeps for the backward: all, about sqrt(T), or N with "
                        "the binomial (revolve) schedule; the rest are recomputed, same gradients (default: all)")
    g.add_argument("--activation", choices=["tanh", "relu", "identity"],
                   help="of the rnn cell; gru and lstm take only tanh (default: tanh)")
    g.add_argument("--seed", type=int, help="seed of every random draw (default: 0)")
    g.add_argument("--device", choices=["cpu", "cuda"], help="(default: cpu)")
    g = p.add_argument_group("run")
    g.add_argument("--checkpoint", metavar="PATH", help=".npz checkpoint written atomically at epoch ends")
    g.add_argument("--checkpoint-every", type=int, default=1, metavar="N", help="write it every N epochs (default: 1)")
    g.add_argument("--resume", action="store_true",
                   help="continue exactly from --checkpoint: model and data options not given (--cell, "
                        "--num-layers, --hidden, ...) are the checkpoint's; one given must match it, "
                        "except --epochs, --device and --stored-states")
    g.add_argument("--overwrite", action="store_true",
                   help="start over when --checkpoint exists (without it or --resume, that is an error)")
    g.add_argument("--json-log", metavar="PATH", help="one JSON object per epoch")
    g.add_argument("--plot", metavar="PATH", help="PNG of perplexity against epoch")
    g.add_argument("--max-minutes", type=float, metavar="M",
                   help="stop at the first minibatch past M minutes (an epoch stopped within is not checkpointed)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_train)


def _run_train(args):
    """Under ``mpiexec -n N`` every rank runs this; rank 0 alone prints (the progress bar, the
    result, an error every rank raised alike)."""
    from . import distributed
    from . import trainer as tr
    comm = distributed.communicator()
    root = comm.rank == 0
    fields = {f.name for f in dataclasses.fields(tr.TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    for flag, value, default in (("--overwrite", args.overwrite, False),
                                 ("--checkpoint-every", max(1, args.checkpoint_every), 1)):   # < 1: an error below
        if root and args.checkpoint is None and value != default:       # given, with nothing to apply it to
            warnings.warn(f"{flag}: applies to the checkpoint, and none is written (no --checkpoint)",
                          RuntimeWarning, stacklevel=2)
    try:
        if args.resume and args.checkpoint is None:
            raise distributed.collective(ValueError("--resume: needs --checkpoint PATH of the run to continue"))
        result = tr.train(checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                          resume=args.resume, overwrite=args.overwrite, json_log=args.json_log, plot=args.plot,
                          max_minutes=args.max_minutes, quiet=args.quiet or not root, comm=comm, **given)
    except tr.TrainingDiverged as e:
        if root:                             # the config's fields named as the flags that set them
            told = str(e).replace("lower lr (", "lower --lr (").replace("(clip, now", "(--clip, now")
            print(f"fastbptt train: {told}", file=sys.stderr)
        return EXIT_DIVERGED
    except tr.TrainingInterrupted as e:
        if root:
            print(f"fastbptt train: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, MissingExtra, OSError) as e:
        if not root and distributed.is_collective(e):
            return EXIT_USAGE            # rank 0 says it
        if str(e).startswith("resume: options conflict"):       # the config's fields as the flags that set them
            e.args = (re.sub(r"(: |; )([a-z_]+)=", lambda m: f"{m.group(1)}--{m.group(2).replace('_', '-')} ",
                             str(e)),)
        raise
    if not root:
        return 0
    last = result.history[-1] if result.history else None
    if result.stopped == "nothing":
        print(f"nothing to do: the checkpoint is already at epoch {result.checkpointed} "
              f"(--epochs {result.config.epochs})")
    elif last is not None:
        val = f", validation perplexity {last['val_ppl']:.2f}" if last["val_ppl"] is not None else ""
        stop = ""
        if result.stopped == "max-minutes":
            within = ""
            if last.get("partial"):               # an epoch stopped within is not checkpointed
                within = ", within the epoch"
                if args.checkpoint and result.checkpointed is None:
                    within += f"; no epoch finished: {args.checkpoint} was not written"
                elif args.checkpoint:
                    within += f"; {args.checkpoint} holds epoch {result.checkpointed}"
            stop = f" (stopped: --max-minutes{within})"
        ranks = f" ({comm.size} MPI ranks)" if comm.size > 1 else ""
        print(f"epoch {last['epoch']}: perplexity {last['train_ppl']:.2f}{val}, "
              f"{last['tokens_per_s']:,.1f} tokens/s on {result.config.device}{ranks}{stop}")
    for text in result.generated.values():
        print(text)
    return 0


def _generate_parser(sub):
    p = sub.add_parser("generate", help="generate text from a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", metavar="PATH", required=True, help="a checkpoint of fastbptt train")
    p.add_argument("--prefix", default="time traveller",
                   help="text to warm the state up on, tokenized as the checkpoint's text was")
    p.add_argument("--length", type=int, default=50, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the book); > 0: sampled")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    p.set_defaults(run=_run_generate)


def _run_generate(args):
    from .data import Vocab, tokenize
    from .generation import generate
    params, _, meta = _load_checkpoint(args.checkpoint)
    params = {k: v.astype(np.float32) for k, v in params.items()}
    mode = meta["config"].tokenize                  # the prefix read as the model's text was
    prefix = "".join(tokenize(args.prefix, mode)) if args.prefix else args.prefix
    if args.prefix and not prefix:
        raise ValueError(f"--prefix: {args.prefix!r} has no letters, all that the checkpoint's {mode} "
                         "tokenizer keeps")
    print(generate(params, Vocab(idx_to_token=meta["vocab"]), prefix, args.length,
                   temperature=args.temperature, seed=args.seed, activation=meta["config"].activation))
    return 0


#: diagnose's options of the model it makes with --init: (default, argparse keywords); the
#: parser's default is None, so that one given with --checkpoint is told from one left out
INIT_MODEL = {
    "cell": ("rnn", dict(metavar="rnn|gru|lstm", help="the cell, with --init")),
    "num_layers": (1, dict(type=int, metavar="N", help="stacked layers, with --init; the per-lag norms and "
                                                       "the spectrum are the top layer's")),
    "hidden": (64, dict(type=int, help="H, with --init")),
    "scale": (0.01, dict(type=float, help="std of the initial weights, with --init")),
    "activation": ("tanh", dict(choices=["tanh", "relu", "identity"], help="of the rnn cell, with --init")),
}


def _diagnose_parser(sub):
    p = sub.add_parser("diagnose", help="how gradients flow back in time, and what truncation costs",
                       description="Per-lag gradient norms, the spectrum of W_hh and of the step "
                                   "Jacobians, truncation bias/variance/time, the book's three-way "
                                   "comparison and clipping statistics, as figures, JSON and a report.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="a checkpoint of fastbptt train")
    src.add_argument("--init", action="store_true", help="freshly initialized parameters instead")
    for name, (default, kw) in INIT_MODEL.items():
        p.add_argument("--" + name.replace("_", "-"), default=None,
                       **dict(kw, help=f"{kw['help']} (default: {default})"))
    p.add_argument("--text", metavar="PATH", help="UTF-8 text (default: the checkpoint's, or the embedded corpus)")
    p.add_argument("--tokenize", choices=["book", "chars"], default=None, help="(default: the checkpoint's, or book)")
    p.add_argument("--max-chars", type=int, metavar="N", help="keep the first N tokens")
    p.add_argument("--num-steps", type=int, default=32,
                   help="T of the probe window and of the trained models (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="B of the probe and of the trained models (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=30,
                   help="seeds per Randomized(p) in the truncation study (default: %(default)s)")
    p.add_argument("--train-epochs", type=int, default=10,
                   help="epochs of each model of the book's comparison (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe batch and the trained models (default: 0)")
    p.add_argument("--report", metavar="DIR", help="write the figures, diagnostics.json and report.md here")
    p.add_argument("--json", metavar="PATH", help="write every number plotted as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_diagnose)


def _run_diagnose(args):
    from . import api, data, diagnostics
    from .trainer import CELLS, TrainConfig, TrainingDiverged, TrainingInterrupted, check_memory
    given = [name for name in INIT_MODEL if getattr(args, name) is not None]
    if args.checkpoint is not None and given:
        flag = "--" + given[0].replace("_", "-")
        raise ValueError(f"{flag}: sets the model of --init; with --checkpoint the model is the checkpoint's")
    for name, (default, _) in INIT_MODEL.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.cell not in CELLS:
        raise ValueError(f"--cell: expected one of {', '.join(CELLS)}, got {args.cell!r}")
    for name in ("num_layers", "hidden", "num_steps", "batch_size", "seeds", "train_epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.max_chars is not None and args.max_chars < 1:
        raise ValueError(f"--max-chars: expected a positive integer, got {args.max_chars}")
    if args.seed < 0:
        raise ValueError(f"--seed: expected a non-negative integer, got {args.seed}")
    if not 0 < args.scale < math.inf:
        raise ValueError(f"--scale: expected a finite positive number, got {args.scale}")
    if args.init and args.cell != "rnn" and args.activation != "tanh":
        raise ValueError(f"--activation: applies to --cell rnn only, got {args.activation!r} with --cell {args.cell}")
    history, text, tokenize, activation = None, args.text, args.tokenize or "book", args.activation
    if args.checkpoint is not None:
        params, _, meta = _load_checkpoint(args.checkpoint)
        params = {k: v.astype(np.float32) for k, v in params.items()}
        cfg = meta["config"]
        vocab = data.Vocab(idx_to_token=meta["vocab"])
        history, activation = meta["history"], cfg.activation
        tokenize = args.tokenize or cfg.tokenize
        if text is None and cfg.text is not None:       # the checkpoint's text, where it was
            try:
                tokens = data.tokenize(data.load_text(cfg.text), tokenize)
            except ValueError as e:
                raise ValueError(f"--checkpoint: its text cannot be read ({str(e).partition(': ')[2]}); "
                                 f"give it with --text") from None
            text = cfg.text
        else:
            tokens = data.tokenize(data.load_text(text), tokenize)
    else:
        tokens = data.tokenize(data.load_text(text), tokenize)
        vocab = data.Vocab(tokens)
        diagnostics.check_splits(len(tokens[:args.max_chars]), args.num_steps, args.batch_size)   # before init
        check_memory(TrainConfig(cell=args.cell, num_layers=args.num_layers, hidden=args.hidden), len(vocab))
        params = api.init_params(len(vocab), args.hidden, len(vocab), seed=args.seed, cell=args.cell,
                                 num_layers=args.num_layers, init="normal")     # --scale: its std
        params = {k: v * np.float32(args.scale / 0.01) for k, v in params.items()}
    if args.max_chars is not None:
        tokens = tokens[:args.max_chars]
    if args.checkpoint is not None and (unknown := vocab.unknown(tokens)):
        unk = set(unknown)
        share = sum(t in unk for t in tokens) / len(tokens)
        warnings.warn(f"text: {share:.1%} of its tokens are not in the checkpoint's vocabulary ({len(unknown)} "
                      f"distinct, e.g. {unknown[0]!r}); the probe reads them as <unk>: diagnose the model on "
                      f"a text it was trained on", RuntimeWarning, stacklevel=2)
    try:
        result = diagnostics.run(params, vocab, vocab.encode(tokens), text=text, tokenize=tokenize,
                                 max_chars=args.max_chars, activation=activation, num_steps=args.num_steps,
                                 batch_size=args.batch_size, seeds=args.seeds, train_epochs=args.train_epochs,
                                 history=history, report=args.report, json_path=args.json, seed=args.seed,
                                 progress=not args.quiet)
    except diagnostics.StatesOverflow as e:
        if args.init:                           # the weights are the --scale drawn
            raise ValueError(f"--scale: {str(e).partition(': ')[2]}; use a smaller --scale") from None
        raise
    except TrainingInterrupted:                 # Ctrl-C in part 4's training: as anywhere else
        raise KeyboardInterrupt from None
    except TrainingDiverged as e:               # part 4 trains models with train's lr and clip
        print(f"fastbptt diagnose: part 4 (the book's comparison) trains models with fastbptt train's lr and "
              f"clip, and one diverged: {str(e).split(' — ')[0]}", file=sys.stderr)
        return EXIT_DIVERGED
    for name, run in result["book_figure"].items():
        print(f"{name:>10}: final validation perplexity {run['history'][-1]['val_ppl']:.3f}")
    if args.report:
        print(f"report: {args.report}/report.md")
    return 0


def _tune_parser(sub):
    p = sub.add_parser("tune", help="measure this machine's plan for the CPU kernels now",
                       description="Measure the CPU engine's plan on this machine up front: the blocking "
                                   "of the products over all rows, and the lanes and blocking of the sweeps "
                                   "at the benchmark's shapes and a grid of (B, H). Otherwise each is "
                                   "measured the first time it is needed. The plan is kept beside the "
                                   "kernel cache, one per CPU, versions and thread count.")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32, 64, 256], metavar="B",
                   help="batch sizes of the sweeps to measure (default: %(default)s)")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048], metavar="H",
                   help="hidden sizes of the sweeps to measure (default: %(default)s)")
    p.add_argument("--cell", nargs="+", choices=("rnn", "gru", "lstm"), default=["rnn", "gru", "lstm"],
                   help="the cells whose sweeps to measure again (default: all); the other cells' "
                        "sweeps in the plan are kept")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_tune)


def _run_tune(args):
    import numpy as np
    from . import bench
    from ._cpu import plan, tune
    for name in ("batch", "hidden"):
        if min(getattr(args, name)) < 1:
            raise ValueError(f"--{name}: expected positive integers, got {getattr(args, name)}")
    from .trainer import TrainConfig, check_memory
    for cell in args.cell:                    # a sweep's weights at the largest --hidden: fail now
        check_memory(TrainConfig(cell=cell, hidden=max(args.hidden)), 1)
    shapes = {(B, H) for B in args.batch for H in args.hidden}
    shapes |= {(B, H) for _, B, _, H in bench.CONFIGS.values()}
    shapes |= {(B, H) for _, B, _, H, _, _ in bench.GATED_CONFIGS.values()}
    sweeps = [(cell, np.float32, B, H) for cell in args.cell for B, H in sorted(shapes)]
    p = tune(progress=not args.quiet, sweeps=sweeps)
    print(plan.describe(p))
    print(f"written: {p.path}")
    return 0


#: the modules each peer of ``fastbptt bench`` imports
PEER_MODULES = {"numpy": (), "torch": ("torch",), "torch-rnn": ("torch",), "torch-scratch": ("torch",),
                "jax": ("jax",)}


def _bench_needs(args):
    """``fastbptt bench``: the extras and outputs it was asked for.  Peers are required only
    when named with --peers; by default a missing one is reported as skipped."""
    if args.peers:
        require_modules("peers", [m for p in args.peers for m in PEER_MODULES.get(p, ())])
    from . import bench
    bench.check_threads(args.threads)
    if args.device == "cuda":
        require_cuda("device")
    for name in ("json", "markdown"):
        if getattr(args, name) is not None:
            check_output(name, getattr(args, name))
    if args.plot is not None:
        require_matplotlib("plot")
        check_figure("plot", args.plot)
    sweep = {"plot (its -sweep figure)": bench.sweep_figure(args.plot)} if args.sweep and args.plot else {}
    check_distinct({**sweep, "json": args.json, "markdown": args.markdown, "plot": figure_file(args.plot)})


def _diagnose_needs(args):
    """``fastbptt diagnose``: the report's figures need matplotlib; outputs must be writable."""
    if args.report is not None:
        check_folder("report", args.report)
        require_matplotlib("report")
    if args.json is not None:
        check_output("json", args.json)
    from .diagnostics import REPORT_FILES
    report = {} if args.report is None else {f"report ({name})": os.path.join(args.report, name)
                                             for name in REPORT_FILES}
    check_distinct({**report, "json": args.json}, inputs=(args.checkpoint, args.text))


#: checks of a command's needs before it does any work (train's are in :func:`trainer.train`)
PREFLIGHT = {"bench": _bench_needs, "diagnose": _diagnose_needs}


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose errors (a bad choice or number, a missing value) are one line
    naming the flag, as the commands' own are, not the usage text first"""

    def error(self, message):
        from .distributed import launched_rank
        if launched_rank() != 0:              # under mpiexec every rank parses alike: rank 0 says it
            self.exit(EXIT_USAGE)
        flag = re.match(r"argument (\S+?): ", message)           # "argument -c/--cell: invalid choice: ..."
        if flag:
            message = f"{flag.group(1).split('/')[-1]}: {message[flag.end():]}"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser():
    parser = _Parser(prog="fastbptt", description="Fast, exact BPTT for recurrent networks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _generate_parser(sub)
    _diagnose_parser(sub)
    _tune_parser(sub)
    from . import bench
    bench.add_parser(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    options = set(vars(args)) - {"command", "run"}
    warnings.formatwarning = (lambda msg, cat, *a, **k:
                              f"fastbptt {args.command}: warning: {flag_message(str(msg), options)}\n")

    # a text shorter than a minibatch: the flag that cut it short, if given, else the text's
    aliases = dict(PARAM_FLAGS, n_tokens="--max-chars" if getattr(args, "max_chars", None) else "--text")

    def error(message):
        message = " ".join(str(message).split("\n")).strip()       # one line, always
        print(f"fastbptt {args.command}: error: {flag_message(message, options, aliases)}", file=sys.stderr)
        return EXIT_USAGE

    try:
        if args.command in PREFLIGHT:
            PREFLIGHT[args.command](args)
        code = args.run(args)
    except (ValueError, TypeError, MissingExtra, OSError) as e:
        rank = getattr(e, "failed_rank", 0)      # an error another MPI rank found (fastbptt.distributed)
        code = error(f"{e} (on MPI rank {rank})" if rank else e)
    except MemoryError as e:
        code = error(f"out of memory{': ' if str(e) else ''}{e}")
    except KeyboardInterrupt:
        print(f"fastbptt {args.command}: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)
