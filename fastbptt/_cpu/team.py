"""How many threads a call runs on: measured while it runs, so that other work on the
cores never makes fastbptt slower than it would be alone on one core.

The most a call uses is numba's thread count for the calling thread, capped at the cores
this process may run on (its affinity mask): more threads than cores only queue behind
each other.  Between that and one thread, the faster one wins, by the calls' own times:
each (kind of call, shape) keeps its recent times with each count and uses the faster
(the median of the last few, so one slow call does not flip it).  The other count is
tried again from time to time (less often while it keeps losing), and at once when the
count in use becomes slower than the other's typical time: a training process starting
beside it, or a busy neighbour, moves the choice within a few calls.  A one-thread call
opens no parallel region that another thread must join: with numba's thread count set
to 1 every region runs on the calling thread alone, and no waiting thread of the team
can stand in its way.

The kernels' results do not depend on the thread count (every element sums in the same
order however the work is split), so this choice changes speed only.
"""
import collections
import os
import statistics
import threading
import time

import numba

from ..config import CPU_TEAM_ADAPT, CPU_TEAM_EXPLORE, CPU_TEAM_EXPLORE_MAX, CPU_TEAM_RETRY_ALL
from .plan import numba_threads

_WINDOW = 3           # the recent calls whose median time stands for a thread count
_FIRST = 2            # calls measured with each count before the first choice
#: the calls of one kind before its first choice: each count's warm-up and _FIRST measured
#: calls (a benchmark's warm-up covers these to time the steady state)
FIRST_CHOICE_CALLS = 2 * (1 + _FIRST)


def max_threads():
    """numba's thread count for this thread, capped at the cores this process may use"""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(numba.get_num_threads(), cores))


class _Arm:
    """the recent times of one thread count; its first call (a warm-up) is not kept"""

    def __init__(self):
        self.calls = 0
        self.times = collections.deque(maxlen=_WINDOW)

    def typical(self):
        return statistics.median(self.times)


class _Choice:
    """one kind of call: its two arms, the count in use, and when to try the other"""

    def __init__(self, most):
        self.arms = {most: _Arm(), 1: _Arm()}
        self.current = most
        self.calls = 0
        self.interval = CPU_TEAM_EXPLORE
        self.next_try = 0


class Team:
    """The thread count of each kind of call, chosen by its measured times (see the module
    notes).  The other count is tried again after ``interval`` calls: a try that wins
    switches, a try that loses doubles the interval (up to CPU_TEAM_EXPLORE_MAX).  After a
    switch to one thread, all the threads are tried again after only CPU_TEAM_RETRY_ALL
    calls (the load that sent the call to one thread often passes: another pool's threads
    still spinning after their own calls); after a switch to all the threads, one thread
    after CPU_TEAM_EXPLORE.  A call in use that becomes slower than the other count's
    typical time brings the next try forward (the load changed)."""

    def __init__(self):
        self.stats = {}
        self._lock = threading.Lock()
        self._last = threading.local()         # .n: the count of this thread's last call

    def recent(self):
        """the thread count of this Python thread's last call (all of them before its first):
        for a short pass between calls, such as a framework's weights made contiguous for the
        next call, which then wakes no thread that the calls themselves leave idle"""
        most = max_threads()
        return min(getattr(self._last, "n", most), most)

    def choose(self, key, most):
        if most == 1 or not CPU_TEAM_ADAPT:
            return most
        with self._lock:
            c = self.stats.setdefault(key, _Choice(most))
            c.calls += 1
            for n, arm in c.arms.items():
                if arm.calls < 1 + _FIRST:               # a warm-up, then _FIRST measured
                    return n
            if c.calls >= c.next_try:
                return 1 if c.current == most else most
            return c.current

    def record(self, key, n, most, seconds):
        if most == 1 or not CPU_TEAM_ADAPT:
            return
        with self._lock:
            c = self.stats[key]
            arm = c.arms[n]
            arm.calls += 1
            if arm.calls == 1:
                return                                   # the warm-up call
            other = c.arms[1 if n == most else most]
            if other.calls < 1 + _FIRST or arm.calls <= 1 + _FIRST:
                arm.times.append(seconds)                # the first measurements
                if other.calls >= 1 + _FIRST and arm.calls == 1 + _FIRST:
                    c.current = n if arm.typical() < other.typical() else (1 if n == most else most)
                    c.interval = CPU_TEAM_RETRY_ALL if c.current == 1 else CPU_TEAM_EXPLORE
                    c.next_try = c.calls + c.interval
            elif n != c.current:                         # a try: the old times are stale
                arm.times.clear()
                arm.times.append(seconds)
                if seconds < c.arms[c.current].typical():     # switch
                    c.current = n
                    c.interval = CPU_TEAM_RETRY_ALL if n == 1 else CPU_TEAM_EXPLORE
                else:                                    # lost: try it less often
                    c.interval = min(2 * c.interval, CPU_TEAM_EXPLORE_MAX)
                c.next_try = c.calls + c.interval
            else:
                arm.times.append(seconds)
                if seconds > other.typical() and c.next_try > c.calls + 1:
                    c.next_try = c.calls + 1             # slower than the other: try it

    def call(self, key):
        """``with team.call(key) as n:`` run the call's kernels with n threads"""
        return _Call(self, key)


class _Call:
    def __init__(self, team, key):
        self.team, self.key = team, key

    def __enter__(self):
        self.most = max_threads()
        self.n = self.team.choose(self.key, self.most)
        self.team._last.n = self.n
        self.threads = numba_threads(self.n)
        self.threads.__enter__()
        self.t0 = time.perf_counter()
        return self.n

    def __exit__(self, kind, value, tb):
        seconds = time.perf_counter() - self.t0
        self.threads.__exit__(kind, value, tb)
        if kind is None:
            self.team.record(self.key, self.n, self.most, seconds)


team = Team()


# A forked child cannot open the OpenMP parallel regions its parent opened: GNU OpenMP is
# not fork-safe, and numba's OpenMP layer ends such a child (SIGTERM) at its first region.
_forked = False
FORKED = ("fastbptt: this process was forked from one that had run fastbptt's kernels on numba's "
          "OpenMP threads, which cannot run in a forked child (GNU OpenMP is not fork-safe); start "
          "the child with multiprocessing's 'spawn' or 'forkserver' method "
          "(torch.multiprocessing.set_start_method('spawn'))")


def _after_fork():
    global _forked
    try:
        layer = numba.threading_layer()
    except ValueError:                  # no parallel region has run yet: nothing to inherit
        return
    if layer == "omp":                  # Intel's OpenMP is fork-safe, GNU's is not
        from numba.np.ufunc import omppool
        _forked = _forked or getattr(omppool, "openmp_vendor", "GNU") == "GNU"


os.register_at_fork(after_in_child=_after_fork)


def check_usable():
    """raise RuntimeError (FORKED) in a forked child that cannot run the kernels, instead of
    the child being ended at its first parallel region"""
    if _forked:
        raise RuntimeError(FORKED)
