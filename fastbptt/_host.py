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


def normalized(name, a, dtype, copy=False):
    """C-contiguous, writeable, of ``dtype``: ``a`` itself only if it already is all that and no
    copy is asked for."""
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


def id_range(ids):
    return int(ids.min()), int(ids.max())


def stack_states(h0, Hs):
    """Hx (T+1,B,H) = h_0, h_1..h_T, as the forward keeps them."""
    return np.concatenate([h0[None], Hs])
