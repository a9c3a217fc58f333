"""Host (numpy) arrays as the API's validation sees them, for every backend.

``fastbptt.api`` decides what to check; these say how on numpy arrays.  The CUDA backend
handles device arrays itself and hands host arrays here.
"""
import numpy as np


def as_array(name, a):
    """``a`` as a numpy array; a CUDA array is an error on the CPU."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        raise TypeError(f"{name}: a CUDA array needs device='cuda'")
    try:
        return np.asarray(a)
    except Exception as e:
        raise TypeError(f"{name}: expected an array, got {type(a).__name__} ({e})") from None


#: a strided 2-D array is copied in square blocks of this side: numpy's element-order copy of a
#: transposed view (a weight given as Wᵀ) misses the cache on every element (see docs/performance.md)
COPY_BLOCK = 64


def normalized(name, a, dtype, copy=False, weight=False):
    """C-contiguous, writeable, of ``dtype``: ``a`` itself only if it already is all that and no
    copy is asked for (``weight``: a parameter matrix; the same here)."""
    if a.ndim == 2 and not a.flags.c_contiguous and a.size > COPY_BLOCK * COPY_BLOCK:
        out = np.empty(a.shape, dtype)
        for i in range(0, a.shape[0], COPY_BLOCK):
            for j in range(0, a.shape[1], COPY_BLOCK):
                out[i:i + COPY_BLOCK, j:j + COPY_BLOCK] = a[i:i + COPY_BLOCK, j:j + COPY_BLOCK]
        return out
    if copy:
        return np.array(a, dtype=dtype, order="C", copy=True)
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.writeable else a.copy()


def first_nonfinite(a):
    """None if every value is finite, else a description of the first one that is not."""
    if np.isfinite(a).all():
        return None
    bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
    return f"{a[bad]} at index {bad}"


def equal(a, b):
    """whether a and b have one shape and hold the same values (a NaN equal to a NaN: values
    that check_finite=False lets through compare as the same input)"""
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f"))


def id_range(ids):
    return int(ids.min()), int(ids.max())


def stack_states(h0, Hs):
    """Hx (T+1,B,H) = h_0, h_1..h_T, as the forward keeps them."""
    return np.concatenate([h0[None], Hs])
