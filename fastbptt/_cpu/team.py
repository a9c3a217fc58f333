"""How many threads a call runs on: measured while it runs, so that other work on the
cores never makes fastbptt slower than it would be alone on one core.

The most a call uses is numba's thread count for the calling thread, capped at the cores
this process may run on (its affinity mask): more threads than cores only queue behind
each other.  Between that and one thread, the faster one wins, by the calls' own times:
each (kind of call, shape) keeps a moving average of its time with all threads and with
one, uses the faster, and tries the other every ``CPU_TEAM_EXPLORE`` calls, so a change
of load (a training process beside it, a busy neighbour) moves the choice within a few
calls.  A one-thread call opens no parallel region that another thread must join: with
numba's thread count set to 1 every region runs on the calling thread alone, and the
other threads' waiting cannot steal its core.

The kernels' results do not depend on the thread count (every element sums in the same
order however the work is split), so this choice changes speed only.
"""
import os
import threading
import time

import numba

from ..config import CPU_TEAM_ADAPT, CPU_TEAM_EXPLORE
from .plan import numba_threads

_EMA = 0.3            # weight of the newest time in a moving average


def max_threads():
    """numba's thread count for this thread, capped at the cores this process may use"""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(numba.get_num_threads(), cores))


class Team:
    """The thread count of each kind of call, chosen by its measured times (see the module
    notes).  ``stats[key] = [[average seconds, calls] with all threads, [...] with one, calls]``;
    the first call with each count is a warm-up and is not averaged."""

    def __init__(self):
        self.stats = {}
        self._lock = threading.Lock()

    def choose(self, key, most):
        if most == 1 or not CPU_TEAM_ADAPT:
            return most
        with self._lock:
            arms, calls = self.stats.setdefault(key, [[[None, 0], [None, 0]], 0])
            self.stats[key][1] = calls + 1
            for n, (avg, _) in zip((most, 1), arms):
                if avg is None:
                    return n
            fast, slow = (most, 1) if arms[0][0] <= arms[1][0] else (1, most)
            return slow if calls % CPU_TEAM_EXPLORE == 0 else fast

    def record(self, key, n, most, seconds):
        if most == 1 or not CPU_TEAM_ADAPT:
            return
        with self._lock:
            arm = self.stats[key][0][0 if n == most else 1]
            arm[1] += 1
            if arm[1] > 1:
                arm[0] = seconds if arm[0] is None else (1 - _EMA) * arm[0] + _EMA * seconds

    def call(self, key):
        """``with team.call(key) as n:`` run the call's kernels with n threads"""
        return _Call(self, key)


class _Call:
    def __init__(self, team, key):
        self.team, self.key = team, key

    def __enter__(self):
        self.most = max_threads()
        self.n = self.team.choose(self.key, self.most)
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
