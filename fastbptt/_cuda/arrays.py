"""Device arrays as the API's validation sees them: the CUDA counterpart of
:mod:`fastbptt._host`, whose functions it takes for host arrays.

``fastbptt.api`` decides what to check; these say how on a device array (numba's, or any
object with the CUDA array interface: CuPy, torch, wrapped zero-copy): casts, the
non-finite count and the id range run as kernels on the device, and only their
summaries come back.  :func:`on_device` and :func:`device` say where an array is and
put it on the device when it is not.
"""
import math

import numpy as np
from numba import cuda

from .. import _host
from .products import launch


def on_device(a):
    """A numba device array, or any object with the CUDA array interface (CuPy, torch)."""
    return not isinstance(a, np.ndarray) and (cuda.devicearray.is_cuda_ndarray(a)
                                               or hasattr(a, "__cuda_array_interface__"))


def device(a):
    """``a`` on the device: itself when it is there, else a copy"""
    return a if on_device(a) else cuda.to_device(a)


@cuda.jit
def _cast_cuda(out, src):
    """out = src with out's dtype, elementwise (1-D views)"""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, out.shape[0], stride):
        out[i] = src[i]


@cuda.jit
def _count_nonfinite_cuda(count, a):
    """count[0] += the number of NaN/inf in a (1-D view)"""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, a.shape[0], stride):
        if not math.isfinite(a[i]):
            cuda.atomic.add(count, 0, 1)


@cuda.jit
def _count_different_cuda(count, a, b):
    """count[0] += the number of i with a[i] != b[i] (1-D views; a NaN equal to a NaN, as
    fastbptt._host.equal)"""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, a.shape[0], stride):
        if not (a[i] == b[i] or (a[i] != a[i] and b[i] != b[i])):
            cuda.atomic.add(count, 0, 1)


@cuda.jit
def _id_range_cuda(lohi, ids):
    """lohi = (min, max) of ids (1-D view), by atomics"""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, ids.shape[0], stride):
        cuda.atomic.min(lohi, 0, ids[i])
        cuda.atomic.max(lohi, 1, ids[i])


def _count(kernel, *arrays):
    """what a counting kernel (count[0] += ...) finds over arrays of one size, as 1-D views"""
    count = cuda.to_device(np.zeros(1, np.int64))
    kernel[launch(arrays[0].size)](count, *(x.reshape(x.size) for x in arrays))
    return int(count.copy_to_host()[0])


def as_array(name, a):
    """A numpy array, or a CUDA-array-interface object (numba, CuPy, torch) wrapped zero-copy."""
    if isinstance(a, np.ndarray) or cuda.devicearray.is_cuda_ndarray(a):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        return cuda.as_cuda_array(a)                 # zero-copy view of CuPy/torch memory
    return _host.as_array(name, a)


def normalized(name, a, dtype, copy=False, weight=False):
    """Host arrays as in fastbptt._host (``weight`` as there); a device array must be
    C-contiguous, and is cast (or copied when asked) on the device."""
    if not on_device(a):
        return _host.normalized(name, a, dtype, copy)
    if not a.is_c_contiguous():
        raise TypeError(f"{name}: a CUDA array must be C-contiguous (copy it on the device first)")
    if a.dtype == dtype and not copy:
        return a
    out = cuda.device_array(a.shape, dtype)
    if a.size:
        _cast_cuda[launch(a.size)](out.reshape(a.size), a.reshape(a.size))
    return out


def first_nonfinite(a):
    if not on_device(a):
        return _host.first_nonfinite(a)
    n = _count(_count_nonfinite_cuda, a)
    return None if n == 0 else f"{n} NaN/inf values on the device"


def equal(a, b):
    """whether a and b have one shape and hold the same values, compared on the device when
    either is there (only the count of differing values comes back)"""
    if not (on_device(a) or on_device(b)):
        return _host.equal(a, b)
    if tuple(a.shape) != tuple(b.shape):
        return False
    a, b = device(a), device(b)
    if a.size == 0:
        return True
    return _count(_count_different_cuda, a, b) == 0


def id_range(ids):
    if not on_device(ids):
        return _host.id_range(ids)
    lohi = cuda.to_device(np.array([np.iinfo(np.int64).max, np.iinfo(np.int64).min], np.int64))
    _id_range_cuda[launch(ids.size)](lohi, ids.reshape(ids.size))
    lo, hi = lohi.copy_to_host()
    return int(lo), int(hi)


def stack_states(h0, Hs):
    """Hx (T+1,B,H) = h_0, h_1..h_T (on the device when either is)."""
    if not (on_device(h0) or on_device(Hs)):
        return _host.stack_states(h0, Hs)
    Hx = cuda.device_array((Hs.shape[0] + 1,) + tuple(Hs.shape[1:]), Hs.dtype)
    Hx[0].copy_to_device(h0)
    Hx[1:].copy_to_device(Hs)
    return Hx
