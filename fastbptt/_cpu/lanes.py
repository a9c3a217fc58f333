"""The lane scheduler of the CPU engine: the T steps of a sweep in one parallel region.

A sweep splits its work between threads one of two ways, as the plan measured faster for
its shape: by rows (the batch's sequences are independent, so each thread runs its own
rows' steps from the first to the last with no waits at all; see :func:`run_lanes`), or
by columns, as follows.

Each thread owns a chunk of the output columns (a *lane*), so its slice of the packed
W_hh stays in its own cache for all T steps.  Step s + 1 of a lane needs every lane's
part of the state made at step s, but its own part first: a lane adds the product over
its own K range as soon as it has finished step s, and waits (on atomic flags, not a
parallel region per step) only before the other lanes' ranges, which it adds in a fixed
order.  That order is the plan's (its lanes), not the thread count's: one thread running
every lane sums the same way.  The engine knows no cell: a
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
from numba.extending import intrinsic, overload

from ..config import CPU_SOLO_WAIT, CPU_STEAL_SPINS, CPU_WAIT_SPINS, FASTMATH
from .products import _0, chunk, of_type, row_chunk


def cell_step(ctx, s, r0, r1, j0, j1, k0, k1, last):
    """Step s (0-based, in sweep order) on rows [r0, r1) and columns [j0, j1): add the
    recurrent product over the K range [k0, k1) of the previous step's state; with ``last``,
    the step's pointwise part.  A stub: each cell overloads it for its own namedtuple ``ctx``."""


def cell_steps(forward_ctx, forward_step, backward_ctx, backward_step):
    """Overload :func:`cell_step` for a cell's two sweep contexts (namedtuple classes), with its
    forward and reverse step functions (``@njit``, cell_step's signature)."""
    @overload(cell_step, jit_options={"cache": True})
    def _cell_step(ctx, s, r0, r1, j0, j1, k0, k1, last):
        if of_type(ctx, forward_ctx):
            return lambda ctx, s, r0, r1, j0, j1, k0, k1, last: forward_step(ctx, s, r0, r1, j0, j1, k0, k1, last)
        if of_type(ctx, backward_ctx):
            return lambda ctx, s, r0, r1, j0, j1, k0, k1, last: backward_step(ctx, s, r0, r1, j0, j1, k0, k1,
                                                                              last)


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
# The helpers below are functions of their own, not inlined into run_lanes: numba's passes over
# a parallel region grow faster than its code, so inlined they lengthened every cell's compile
# for no measurable speed (docs/performance.md, "compile time").  Their arguments are typed
# alike at every call (int64, bool; not a prange index's uint64 or Literal[bool]) so that each
# compiles once per cell and direction.
_TRUE, _FALSE = np.bool_(True), np.bool_(False)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _own(ctx, s, o, B, H, n):
    """lane o's step s over its own K range: the state that lane made at step s - 1"""
    j0, j1 = chunk(H, o, n)
    cell_step(ctx, s, 0, B, j0, j1, j0, j1, n == 1)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _rest(ctx, s, o, B, H, n):
    """lane o's step s over the other lanes' K ranges, in the order o+1, o+2, ... (mod n),
    then the pointwise part"""
    j0, j1 = chunk(H, o, n)
    for i in range(1, n):
        k0, k1 = chunk(H, (o + i) % n, n)
        cell_step(ctx, s, 0, B, j0, j1, k0, k1, i == n - 1)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _row_chunk(ctx, steps, B, H, c, r):
    """every step of row chunk c of r (``row_chunk``): a one-lane sweep of its own rows"""
    r0, r1 = row_chunk(B, c, r)
    for s in range(steps):
        cell_step(ctx, s, r0, r1, 0, H, 0, H, True)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _ready(flags, s, n):
    """every lane has done step s - 1"""
    for q in range(n):
        if _load_acquire(flags, q * _LINE + _DONE) < s:
            return False
    return True


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _take(ctx, flags, o, s, B, H, n):
    """claim and run all of step s of lane o, whose inputs are ready; True if this thread did"""
    f = o * _LINE
    if _ready(flags, s, n) and _cas(flags, f + _CLAIMED, s, s + 1):
        _own(ctx, s, o, B, H, n)
        _rest(ctx, s, o, B, H, n)
        _store_release(flags, f + _DONE, s + 1)
        return True
    return False


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _wait(ctx, flags, q, s, B, H, n, c, patient, step_cycles):
    """until lane q has done step s - 1, taking that step over if its thread is away (see
    the module notes); returns whether this thread is still patient with unstarted lanes"""
    f = q * _LINE
    spins = 0
    t0 = _cycles()
    while _load_acquire(flags, f + _DONE) < s:
        spins += 1
        if _load_acquire(flags, f + _STARTED) == 0:
            if not patient or spins > CPU_WAIT_SPINS:
                patient = False
                _take(ctx, flags, q, s - 1, B, H, n)
        elif spins > CPU_STEAL_SPINS and not _take(ctx, flags, q, s - 1, B, H, n):
            waited = _cycles() - t0
            if waited > CPU_SOLO_WAIT * step_cycles and waited > _SOLO_MIN_CYCLES:
                _cas(flags, n * _LINE, 0, c + 1)       # the first to get here runs the rest
            _yield_thread()                            # the lane's thread has the step
    return patient


@njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def run_lanes(ctx, steps, B, H, n, threads):
    """Every step s = 0..steps-1 of a sweep of B rows on n column chunks ("lanes") of
    [0, H): each lane's step over its own K range first, then the others' (see _own,
    _rest).  On this thread when threads = 1 (the same order of sums, so the same results),
    else in one parallel region, one thread per lane: a lane starts step s + 1 on its own K
    range as soon as it has done step s, and waits for the other lanes only before their
    ranges.

    n = -r < 0: the rows split instead, in r chunks (``row_chunk``), each a one-lane sweep
    of its own rows from the first step to the last, with no waits at all: the rows are
    independent sequences.  Each row is summed as in a one-lane sweep, whatever r and the
    thread count.

    A thread that has waited CPU_SOLO_WAIT times its own last step (and at least
    _SOLO_MIN_CYCLES) for a step another thread holds runs every remaining step of every
    lane itself ("solo"): the others stop after the step they hold.
    """
    if n < 0 and threads == 1:
        for c in range(-n):
            _row_chunk(ctx, steps, B, H, c, -n)
        return
    if n < 0:
        for c in prange(-n):
            _row_chunk(ctx, steps, B, H, np.int64(c), -n)
        return
    if n == 1 or threads == 1:
        for s in range(steps):
            for o in range(n):
                _own(ctx, s, o, B, H, n)
                _rest(ctx, s, o, B, H, n)
        return
    solo = n * _LINE                            # 0: lanes; c + 1: lane c's thread runs the rest
    flags = np.zeros(n * _LINE + _LINE, np.int64)
    for ci in prange(n):
        c = np.int64(ci)                        # prange's index is unsigned: one type for every call
        _store_release(flags, c * _LINE + _STARTED, 1)
        patient = _TRUE
        step_cycles = _0
        for s in range(steps):
            patient = _wait(ctx, flags, c, s, B, H, n, c, patient, step_cycles)
            who = _load_acquire(flags, solo)
            if who != 0 and who != c + 1:
                break                              # another thread runs the rest
            for o in range(n):
                if (o != c and who == 0) or not _cas(flags, o * _LINE + _CLAIMED, s, s + 1):
                    continue
                t0 = _cycles()
                patient = _wait(ctx, flags, o, s, B, H, n, c, patient, step_cycles)
                _own(ctx, s, o, B, H, n)
                for i in range(1, n):
                    patient = _wait(ctx, flags, (o + i) % n, s, B, H, n, c, patient, step_cycles)
                _rest(ctx, s, o, B, H, n)
                _store_release(flags, o * _LINE + _DONE, s + 1)
                if o == c:
                    step_cycles = _cycles() - t0
        # Leave only when every step of every lane is done: a thread that stopped for a solo
        # one may have left its lane's next step unclaimed after the solo one's last check.
        for s in range(1, steps + 1):
            for o in range(n):
                _wait(ctx, flags, o, s, B, H, n, c, _FALSE, step_cycles)
