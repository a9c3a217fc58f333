"""Host arrays as the API's validation sees them on the CPU: the counterpart of
:mod:`fastbptt._cuda.arrays`, :mod:`fastbptt._host`'s two scans as kernels (the rest of
``_host`` serves as it is).

Also the PyTorch bridge's test of a float input for being a one-hot (whose ids then run
in its place), in one pass that stops at the first row that is not.

``fastbptt.api`` decides what to check; :mod:`fastbptt._host` says how, and describes a bad
value.  The non-finite count and the id range run here as one pass each with no temporary
array (numpy's ``isfinite(a).all()`` writes a boolean array and reads it again, and ``min``
and ``max`` read the ids twice): every call checks every parameter, so these scans are
part of every call's fixed cost (docs/performance.md, "the validation's scans").
"""
import numpy as np
from numba import njit, prange

from .. import _host
from .plan import numba_threads
from .team import team


@njit(cache=True, error_model="numpy")
def _count_masked(bits, mask):
    """how many elements of ``bits`` have every bit of ``mask`` set (an integer loop that
    vectorizes)"""
    n = 0
    for i in range(bits.shape[0]):
        n += (bits[i] & mask) == mask
    return n


@njit(cache=True, error_model="numpy")
def count_nonfinite_cpu(a):
    """the number of NaN/inf values of a (C-contiguous float32 or float64): those whose
    exponent bits are all set"""
    v = a.reshape(-1)
    if a.itemsize == 4:
        return _count_masked(v.view(np.uint32), np.uint32(0x7F800000))
    return _count_masked(v.view(np.uint64), np.uint64(0x7FF0000000000000))


@njit(cache=True, parallel=True, error_model="numpy")
def count_nonfinite_par(a, n):
    """count_nonfinite_cpu(a) in n chunks, one per thread (a count: the same whatever n)"""
    v = a.reshape(-1)
    N = v.shape[0]
    counts = np.zeros(n, np.int64)
    for c in prange(n):
        counts[c] = count_nonfinite_cpu(v[N * c // n:N * (c + 1) // n])
    return counts.sum()


#: arrays of at least this many elements (1 MiB of float32) are scanned on the threads of this
#: thread's last call (team.recent); a smaller one stays on one thread, where a parallel
#: region's launch would weigh on the scan (docs/performance.md, "Products that overwrite
#: their output")
PARALLEL_SCAN = 1 << 18


def _count_nonfinite(c):
    if c.size < PARALLEL_SCAN:
        return count_nonfinite_cpu(c)
    with numba_threads(team.recent()) as n:
        return count_nonfinite_par(c, n)


@njit(cache=True, error_model="numpy")
def id_range_cpu(ids):
    """(min, max) of ids (C-contiguous int64, not empty), in one pass"""
    v = ids.reshape(-1)
    lo = hi = v[0]
    for i in range(v.shape[0]):
        lo = min(lo, v[i])
        hi = max(hi, v[i])
    return lo, hi


@njit(cache=True, error_model="numpy")
def one_hot_ids_cpu(ids, X):
    """True, with ids[r] = the column of row r's one 1, if every row of X (R,D) is one-hot
    (a single 1, every other value 0); False at the first row that is not"""
    for r in range(X.shape[0]):
        at = -1
        for j in range(X.shape[1]):
            v = X[r, j]
            if v != 0:
                if v != 1 or at >= 0:
                    return False
                at = j
        if at < 0:
            return False
        ids[r] = at
    return True


def first_nonfinite(a):
    """None if every value is finite, else a description of the first one that is not
    (fastbptt._host's)"""
    c = a.T if a.ndim == 2 and not a.flags.c_contiguous else a    # a weight given as its transpose
    if c.size and c.flags.c_contiguous and c.dtype in (np.float32, np.float64) and _count_nonfinite(c) == 0:
        return None
    return _host.first_nonfinite(a)


def id_range(ids):
    """(min, max) of the token ids, as Python ints (fastbptt._host's for any other array)"""
    if ids.size and ids.flags.c_contiguous and ids.dtype == np.int64:
        lo, hi = id_range_cpu(ids)
        return int(lo), int(hi)
    return _host.id_range(ids)
