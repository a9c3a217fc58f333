"""The CUDA backend (numba-cuda): the engine, the cells, and the calls ``fastbptt.api`` makes.

Imported only when ``device="cuda"`` is asked for; ``available()`` says whether it can
run here (a CUDA GPU, or the simulator under ``NUMBA_ENABLE_CUDASIM=1``).  The math is
the CPU backend's (:mod:`fastbptt._cpu`, docs/math.md).

The engine, by concern (it knows no cell):

- ``products``    the GEMM (cuBLAS through CuPy, else a numba-cuda kernel), the launch
                  grid, zeros and column sums
- ``head``        the softmax cross-entropy head over all rows
- ``projections`` the input projection and the weight gradients over all rows
- ``arrays``      device arrays for the API's validation (host arrays: ``fastbptt._host``)

The cells: ``elman`` ("rnn"), with the recurrence's step and persistent paths.  The
order of a call's operations is ``fastbptt._model``; this module gives it a *run* (one
call's params on the device) and the products over all rows.  Inputs arrive validated,
each on the host or on the device: host arrays are copied to the device, and results
come back to the host unless the params live on the device (``fastbptt.to_device``), in
which case they stay there, zero-copy.
"""
import numpy as np
from numba import cuda

from . import elman, head, projections
from .arrays import as_array, device, first_nonfinite, id_range, normalized, on_device, stack_states  # noqa: F401
from .products import SIMULATOR, launch, zero_cuda  # noqa: F401

CELLS = {"rnn": elman}


def available() -> bool:
    """True when kernels can run: a CUDA GPU with its driver, or the CUDA simulator."""
    try:
        return bool(cuda.is_available())
    except Exception:
        return False


def to_device(P):
    return {k: device(v) for k, v in P.items()}


class Run:
    """One call: its params on the device, and how its results leave."""

    def __init__(self, P, X, kind):
        self.kind = kind
        self.keep = on_device(P["W_hh"])      # params on the device: results stay there
        self.P = to_device(P)
        self.X = X
        self.T, self.B = X.shape[:2]
        self.H = P["W_hh"].shape[0]
        self.dtype = P["W_hh"].dtype
        self._X = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    # ------------------------------------------------------------------- the engine
    def inputs(self):
        """X on the device, copied once per call"""
        if self._X is None:
            self._X = device(self.X)
        return self._X

    # ------------------------------------------------------------------- the graph's
    def states(self):
        return cuda.device_array((self.T + 1, self.B, self.H), self.dtype)

    def results(self, arrays):
        """as device arrays when the params are on the device, else copied back"""
        if self.keep:
            return arrays
        return {name: a.copy_to_host() for name, a in arrays.items()}

    def last_state(self, S):
        h_T = S[self.T]
        return h_T if self.keep else h_T.copy_to_host()


def begin(P, X, kind):
    return Run(P, X, kind)


def given(run, a):
    """an array the caller passed (states or direct terms), on the device"""
    return device(a)


def ones(run, T, dtype):
    return np.ones(T, dtype)                  # ξ stays on the host: the step path reads it there


def direct_terms(run, dZ):
    """A (T+1,B,H): A[0] = 0, A[1:] = dZ (before the sweep overwrites it)"""
    T, B, H = dZ.shape
    A = cuda.device_array((T + 1, B, H), dZ.dtype)
    zero_cuda[launch(B * H)](A[0])
    A[1:].copy_to_device(dZ)
    return A


# -------------------------------------------------------------------- rows products
def embed(run, X, S, h0):
    """S[0] = h_0;  S[1:] = pre_t = x_t W_xh + b_h (a row gather for token ids)"""
    T, B, H = run.T, run.B, run.H
    S[0].copy_to_device(h0)
    Xd = run.inputs()
    if X.ndim == 2:
        projections.embed_tokens_cuda[launch(T * B * H)](S[1:], Xd, run.P["W_xh"], run.P["b_h"])
    else:
        projections.embed_dense_cuda(S[1:].reshape(T * B, H), Xd.reshape(T * B, X.shape[2]),
                                     run.P["W_xh"], run.P["b_h"])


def head_loss(run, S, Y):
    T, B, H = run.T, run.B, run.H
    logits = cuda.device_array((T * B, run.P["W_hq"].shape[1]), run.dtype)
    return head.head_loss_cuda(logits, S[1:].reshape(T * B, H), device(Y).reshape(T * B),
                               run.P["W_hq"], run.P["b_q"])


def head_forward_backward(run, S, Y, scale):
    """(loss, dZ = ∂L/∂h_t through the head (T,B,H), {"W_hq", "b_q"} gradients)"""
    T, B, H = run.T, run.B, run.H
    Q = run.P["W_hq"].shape[1]
    dZ = cuda.device_array((T, B, H), run.dtype)
    dW_hq = cuda.device_array((H, Q), run.dtype)
    db_q = cuda.device_array(Q, run.dtype)
    logits = cuda.device_array((T * B, Q), run.dtype)
    loss = head.head_forward_backward_cuda(dZ.reshape(T * B, H), dW_hq, db_q, logits,
                                           S[1:].reshape(T * B, H), device(Y).reshape(T * B),
                                           run.P["W_hq"], run.P["b_q"], scale)
    return loss, dZ, {"W_hq": dW_hq, "b_q": db_q}


def recurrent_grads(run, S, dZ):
    """∂W_hh = Σ_t h_{t-1}ᵀ dz_t, ∂b_h = Σ_t Σ_b dz_t: one GEMM over the T·B rows"""
    H = dZ.shape[2]
    dW_hh = cuda.device_array((H, H), dZ.dtype)
    db_h = cuda.device_array(H, dZ.dtype)
    projections.recurrent_grads_cuda(dW_hh, db_h, dZ, S)
    return dW_hh, db_h


def input_grads(run, X, dZ):
    """∂W_xh = Σ_t x_tᵀ dz_t: an atomic scatter-add for token ids, else one GEMM"""
    T, B, H = dZ.shape
    dW_xh = cuda.device_array(run.P["W_xh"].shape, dZ.dtype)
    zero_cuda[launch(dW_xh.size)](dW_xh)
    Xd = run.inputs()
    if X.ndim == 2:
        projections.embed_tokens_backward_cuda[launch(T * B * H)](dW_xh, dZ, Xd)
    else:
        projections.embed_dense_backward_cuda(dW_xh, dZ.reshape(T * B, H), Xd.reshape(T * B, X.shape[2]))
    return dW_xh
