"""The lane scheduler of the CPU engine: the T steps of a sweep in one parallel region.

Each thread owns a chunk of the output columns (a *lane*), so its slice of the packed
W_hh stays in its own cache for all T steps; between steps the lanes meet at a barrier
on atomic flags instead of a parallel region per step.  The engine knows no cell: a
sweep calls :func:`cell_step`, a stub that each cell overloads for its own namedtuple
context (see ``fastbptt._cpu.elman``); the overload is resolved at compile time, so the
cell's sweep is one cached kernel.

Waits are bounded.  Nothing may assume that the lanes' threads run at the same time: a
threading layer may run them one after another, and other work may hold the cores.
Steps are claimed with a compare-and-swap, so each is computed exactly once, by
whichever thread gets it.  A thread waiting for step s - 1 of another lane:

- after ``CPU_WAIT_SPINS`` polls for a lane whose thread has not started, computes that
  lane's steps itself from then on (until that thread shows up);
- after ``CPU_STEAL_SPINS`` polls for a lane that has started, takes that lane's next
  step if its thread has not claimed it yet (the thread lost its core between steps),
  else yields its core between polls (the lane's thread may be waiting for it);
- once it has waited ``CPU_SOLO_WAIT`` times its own last step for a step another
  thread holds (that thread lost its core in the middle of a step), runs every
  remaining step of every lane itself: the sweep falls back to one lane, and the
  other threads stop after the step they hold.
"""
import sys

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..config import CPU_SOLO_WAIT, CPU_STEAL_SPINS, CPU_WAIT_SPINS, FASTMATH
from .products import chunk


def cell_step(ctx, s, j0, j1):
    """Step s (0-based, in sweep order) of a sweep on columns [j0, j1).  A stub: each cell
    overloads it for its own namedtuple ``ctx``."""


@intrinsic
def _load_acquire(typingctx, flags, i):
    """flags[i], an atomic load with acquire ordering (flags: 1-D int64)"""
    def codegen(context, builder, sig, args):
        return builder.load_atomic(_flag_ptr(context, builder, sig, args), "acquire", 8)
    return types.int64(flags, i), codegen


@intrinsic
def _store_release(typingctx, flags, i, value):
    """flags[i] = value, an atomic store with release ordering"""
    def codegen(context, builder, sig, args):
        value = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(value, _flag_ptr(context, builder, sig, args), "release", 8)
        return context.get_dummy_value()
    return types.void(flags, i, value), codegen


@intrinsic
def _cas(typingctx, flags, i, expected, new):
    """atomically flags[i] = new if flags[i] == expected; True when this call did it"""
    def codegen(context, builder, sig, args):
        old = context.cast(builder, args[2], sig.args[2], types.int64)
        value = context.cast(builder, args[3], sig.args[3], types.int64)
        pair = builder.cmpxchg(_flag_ptr(context, builder, sig, args), old, value, "acq_rel", "acquire")
        return builder.extract_value(pair, 1)
    return types.boolean(flags, i, expected, new), codegen


@intrinsic
def _yield_thread(typingctx):
    """let the OS run another thread on this core (sched_yield; SwitchToThread on Windows)"""
    def codegen(context, builder, sig, args):
        name = "SwitchToThread" if sys.platform == "win32" else "sched_yield"
        builder.call(cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(32), []), name), [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def _cycles(typingctx):
    """the CPU's cycle (or time-stamp) counter: rdtsc on x86, cntvct on arm64; 0 where there
    is none"""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                            "llvm.readcyclecounter")
        return builder.call(fn, [])
    return types.int64(), codegen


def _flag_ptr(context, builder, sig, args):
    ary = context.make_array(sig.args[0])(context, builder, args[0])
    i = context.cast(builder, args[1], sig.args[1], types.intp)
    return cgutils.get_item_pointer(context, builder, sig.args[0], ary, [i])


_LINE = 16                  # int64 flags per lane: [started, claimed steps, done steps], padded
_STARTED, _CLAIMED, _DONE = 0, 1, 2
_SOLO_MIN_CYCLES = 200_000  # a wait shorter than this (~0.1 ms) never sends a sweep solo


@njit(inline="always")
def _take(ctx, flags, o, s, H, n):
    """claim and run step s of lane o; True if this thread did"""
    f = o * _LINE
    if _cas(flags, f + _CLAIMED, s, s + 1):
        j0, j1 = chunk(H, o, n)
        cell_step(ctx, s, j0, j1)
        _store_release(flags, f + _DONE, s + 1)
        return True
    return False


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def run_lanes(ctx, steps, H, n):
    """cell_step(ctx, s, j0, j1) for s = 0..steps-1 on n column chunks of [0, H): on this
    thread when n = 1, else in one parallel region, one lane per chunk, step s + 1 of any
    lane starting once every lane has done step s.

    A thread that has waited CPU_SOLO_WAIT times its own last step (and at least
    _SOLO_MIN_CYCLES) for a lane whose thread holds that lane's step runs every remaining
    step of every lane itself ("solo"): the others stop after the step they hold.
    """
    if n == 1:
        for s in range(steps):
            cell_step(ctx, s, 0, H)
        return
    solo = n * _LINE                            # 0: lanes; c + 1: lane c's thread runs the rest
    flags = np.zeros(n * _LINE + _LINE, np.int64)
    for c in prange(n):
        _store_release(flags, c * _LINE + _STARTED, 1)
        patient = True
        step_cycles = 0
        for s in range(steps):
            for o in range(n):                 # wait until every lane has done step s - 1
                f = o * _LINE
                spins = 0
                t0 = _cycles()
                while _load_acquire(flags, f + _DONE) < s:
                    spins += 1
                    if _load_acquire(flags, f + _STARTED) == 0:
                        if not patient or spins > CPU_WAIT_SPINS:
                            patient = False
                            _take(ctx, flags, o, s - 1, H, n)
                    elif spins > CPU_STEAL_SPINS and not _take(ctx, flags, o, s - 1, H, n):
                        waited = _cycles() - t0
                        if waited > CPU_SOLO_WAIT * step_cycles and waited > _SOLO_MIN_CYCLES:
                            _cas(flags, solo, 0, c + 1)    # the first to get here runs the rest
                        _yield_thread()        # the lane's thread has the step: let it run
            who = _load_acquire(flags, solo)
            if who == 0:
                t0 = _cycles()
                if _take(ctx, flags, c, s, H, n):
                    step_cycles = _cycles() - t0
            elif who == c + 1:
                for o in range(n):             # every lane's step s that no thread holds
                    _take(ctx, flags, o, s, H, n)
            else:
                break                          # another thread runs the rest
