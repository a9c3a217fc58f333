"""The CUDA backend (numba-cuda): the engine, the cells, and the calls ``fastbptt.api`` makes.

Imported only when ``device="cuda"`` is asked for; ``available()`` says whether it can
run here (a CUDA GPU, or the simulator under ``NUMBA_ENABLE_CUDASIM=1``).  The math is
the CPU backend's (:mod:`fastbptt._cpu`, docs/math.md), file for file and name for name.

The engine, by concern (it knows no cell):

- ``products``    the GEMM (cuBLAS through CuPy, else a numba-cuda kernel), the launch
                  grid, zeros, sums and shifts
- ``head``        the softmax cross-entropy head over all rows
- ``projections`` the input projection and the weight gradients over all rows
- ``arrays``      device arrays for the API's validation (host arrays: ``fastbptt._host``)

The cells: ``elman`` ("rnn", with the recurrence's step and persistent paths), ``gru``,
``lstm``.  The order of a call's operations is ``fastbptt._model``; this module gives it a
*run* (one call's params on the device, its buffers) and the products over all rows.  A
gated cell's G·H columns keep their natural layout [gate0 | gate1 | ...] on the device
(``Run.columns`` is None: no interleaving).  Inputs arrive validated, each on the host or
on the device: host arrays are copied to the device, and results come back to the host
unless the params live on the device (``fastbptt.to_device``), in which case they stay
there, zero-copy.
"""
from numba import cuda

from .._model import LayerParams
from . import elman, gru, head, lstm, projections
from .arrays import (as_array, device, equal, first_nonfinite, id_range, normalized, on_device,  # noqa: F401
                     stack_states)
from .products import SIMULATOR, axpy, column_sums_cuda, gemm, launch, shift, times, zero_cuda, zeros  # noqa: F401

CELLS = {"rnn": elman, "gru": gru, "lstm": lstm}


def available() -> bool:
    """True when kernels can run: a CUDA GPU with its driver, or the CUDA simulator."""
    try:
        return bool(cuda.is_available())
    except Exception:
        return False


def work_copy(name, a):
    """a copy of the caller's ``a`` that the call overwrites (a device array: on the device)"""
    return normalized(name, a, a.dtype, copy=True)


def owned(a):
    """``a``: this backend's validation keeps no buffer that a later call reuses"""
    return a


def to_device(P):
    return {k: device(v) for k, v in P.items()}


def copied(a, P):
    """a copy of the device array ``a`` where a call's results go for params P: on the device
    when P is there (fastbptt.to_device), else on the host"""
    return _copied(a, on_device(P["W_hh"]))


def _copied(a, stay):
    if not stay:
        return a.copy_to_host()
    out = cuda.device_array(a.shape, a.dtype)
    out.copy_to_device(a)
    return out


class Run(LayerParams):
    """One call: its params on the device, its buffers, how its results leave, and the
    products over all rows that the graph and the cells ask for."""

    def __init__(self, P, X, kind, cell, L):
        self.kind, self.cell, self.L = kind, cell, L
        self.keep = on_device(P["W_hh"])      # params on the device: results stay there
        self.P = to_device(P)
        self.X = X
        self.T, self.B = X.shape[:2]
        self.H = P["W_hh"].shape[0]
        self.dtype = P["W_hh"].dtype
        self._X = None
        self.want_d0 = True                   # the state gradients are asked for (Run.cross)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    # ------------------------------------------------------------------- the engine
    def inputs(self, X):
        """X on the device: the call's X copied once per call; a layer's input (already on
        the device) as it is"""
        if X is not self.X:
            return device(X)
        if self._X is None:
            self._X = device(self.X)
        return self._X

    def scratch(self, name, shapes):
        """work buffers of the call (fresh device arrays, uninitialized)"""
        return tuple(cuda.device_array(tuple(shape), self.dtype) for shape in shapes)

    def zeros(self, name, shape):
        return zeros(tuple(shape), self.dtype)

    def record(self, name, shapes):
        """the buffers of a layer's record: the call's own, as every buffer here"""
        return self.scratch(name, shapes)

    def keep_until(self, holder):
        """nothing to give back: the records are the call's own device arrays"""

    def follow(self, records):
        """nothing to follow: the sweeps here have no plan, and the columns one order"""

    # ---------------------------------------------------------------- layers, columns
    def columns(self, G):
        """a gated cell's column order inside the engine: the natural one (None)"""
        return None

    def natural(self, a, cols):
        return a

    # ------------------------------------------------------------------- the graph's
    def given(self, a):
        """an array the caller passed (states or direct terms), on the device"""
        return device(a)

    def _leave(self, a):
        """a new device array as the API returns it: itself when the params are on the device,
        else a host copy"""
        return a if self.keep else a.copy_to_host()

    def output(self, a):
        """one of the call's own arrays (a kept forward's record, which the caller must not be
        able to change) as the API returns it: a copy, on the device when the params are"""
        return _copied(a, self.keep)

    def prepended(self, a0, A):
        """(T+1,B,H) on the device: a0 (B,H), then A (T,B,H) (the CPU's np.concatenate)"""
        out = cuda.device_array((A.shape[0] + 1,) + tuple(A.shape[1:]), A.dtype)
        out[0].copy_to_device(a0)
        out[1:].copy_to_device(A)
        return out

    def fresh(self, shape):
        """a new zero device array of the call's dtype that outlives the call"""
        return zeros(tuple(shape), self.dtype)

    def stored(self, a):
        """a copy of a state kept between the runs of a memory-bounded call, on the device"""
        out = cuda.device_array(a.shape, a.dtype)
        out.copy_to_device(a)
        return out

    def results(self, arrays):
        """as device arrays when the params are on the device, else copied back"""
        return {name: self._leave(a) for name, a in arrays.items()}

    def _stacked(self, arrays):
        """(L,B,H) on the device from L arrays (B,H)"""
        out = cuda.device_array((len(arrays), self.B, self.H), self.dtype)
        for l, a in enumerate(arrays):
            out[l].copy_to_device(a)
        return out

    def last_states(self, cell, lays):
        """one array (L,B,H) per state of the cell (h, and c for the LSTM)"""
        return tuple(self._leave(self._stacked([getattr(lay, name)[self.T] for lay in lays]))
                     for name in cell.STATES)

    def state_grads(self, d0):
        """one array (L,B,H) per state of the cell, from one tuple per layer"""
        return tuple(self._leave(self._stacked(g)) for g in zip(*d0))

    def add(self, dst, src):
        """dst += src (same shapes, contiguous)"""
        axpy(dst, 1.0, src)

    def times(self, out, a, m):
        """out = a ⊙ m (same shapes; out may be a): a layer's input mask, once per call and layer"""
        times(out, a, m)

    def shift(self, C, n):
        """C[:n-1] = C[1:n] (a chain's carry, one step back)"""
        shift(C, n)

    # ------------------------------------------------------------------ rows products
    def project(self, X, out, key, bias, cols=None):
        """out (T·B,G·H) = X W + b over all rows: a row gather for token ids X (T,B), one
        GEMM for dense X (T,B,D); W = P[key] (natural columns: cols is None)"""
        T, B = self.T, self.B
        W, Xd = self.P[key], self.inputs(X)
        if X.ndim == 2:
            projections.embed_tokens_cuda[launch(out.size)](out.reshape(T, B, out.shape[1]), Xd, W, bias)
        else:
            projections.embed_dense_cuda(out, Xd.reshape(T * B, X.shape[2]), W, bias)

    def head_loss(self, S, Y):
        T, B, H = S.shape[0] - 1, self.B, self.H
        logits = cuda.device_array((T * B, self.P["W_hq"].shape[1]), self.dtype)
        return head.head_loss_cuda(logits, S[1:].reshape(T * B, H), device(Y).reshape(T * B),
                                   self.P["W_hq"], self.P["b_q"])

    def head_forward_backward(self, S, Y, scale):
        """(loss, dH = ∂L/∂h_t through the head (T,B,H), {"W_hq", "b_q"} gradients) of the steps
        of S (T+1,B,H) h_0..h_T: the call's, or a range of them"""
        T, B, H = S.shape[0] - 1, self.B, self.H
        Q = self.P["W_hq"].shape[1]
        dH = cuda.device_array((T, B, H), self.dtype)
        dW_hq = cuda.device_array((H, Q), self.dtype)
        db_q = cuda.device_array(Q, self.dtype)
        logits = cuda.device_array((T * B, Q), self.dtype)
        loss = head.head_forward_backward_cuda(dH.reshape(T * B, H), dW_hq, db_q, logits,
                                               S[1:].reshape(T * B, H), device(Y).reshape(T * B),
                                               self.P["W_hq"], self.P["b_q"], scale)
        return loss, dH, {"W_hq": dW_hq, "b_q": db_q}

    def weight_grads(self, X, S, dP, dR, cols=None):
        """(∂W_xh = Σ_t x_tᵀ dP_t, ∂W_hh = Σ_t h_{t-1}ᵀ dR_t (H,G·H), Σ_t Σ_b dP_t, Σ_t Σ_b dR_t):
        one GEMM over the T·B rows each (an atomic scatter-add for token ids); the columns
        are in the natural order here (cols is None); when dP is dR, the two sums are one array"""
        T, B, GH = dR.shape
        dW_hh = cuda.device_array((self.H, GH), dR.dtype)
        dbR = cuda.device_array(GH, dR.dtype)
        projections.recurrent_grads_cuda(dW_hh, dbR, dR, S)
        dbP = dbR
        if dP is not dR:
            dbP = cuda.device_array(GH, dP.dtype)
            column_sums_cuda[launch(GH)](dbP, dP.reshape(T * B, GH))
        Xd = self.inputs(X)
        if X.ndim == 2:
            dW_xh = zeros((self.P["W_xh"].shape[0], GH), dP.dtype)
            projections.embed_tokens_backward_cuda[launch(dP.size)](dW_xh, dP, Xd)
        else:
            dW_xh = cuda.device_array((X.shape[2], GH), dP.dtype)
            projections.embed_dense_backward_cuda(dW_xh, dP.reshape(T * B, GH), Xd.reshape(T * B, X.shape[2]))
        return dW_xh, dW_hh, dbP, dbR

    def input_adjoint(self, l, dP, G, out=None, add=True):
        """∂L/∂(layer l's input) (rows, D) = dP W_xhᵀ: a new array, or into out (added to it,
        or overwriting it when not ``add``)"""
        W = self.param("W_xh", l)
        beta = 1.0 if out is not None and add else 0.0
        if out is None:
            out = cuda.device_array(tuple(dP.shape[:-1]) + (W.shape[0],), dP.dtype)    # beta = 0 below
        gemm(out.reshape(out.size // W.shape[0], W.shape[0]), dP.reshape(dP.size // W.shape[1], W.shape[1]),
             W, tb=True, beta=beta)
        return out

    def recurrent_adjoint(self, l, dR, G, out):
        """out (rows,H) += dR W_hhᵀ"""
        W = self.param("W_hh", l)
        gemm(out.reshape(out.size // self.H, self.H), dR.reshape(dR.size // W.shape[1], W.shape[1]),
             W, tb=True, beta=1.0)

    def cross(self, dR0, W_hh, x):
        """ξ_1 · dR_1 W_hhᵀ (B,H): the product's share of ∂L/∂h_0 (zeros when the caller asked
        for no state gradients, want_d0)"""
        dh0 = zeros((self.B, self.H), dR0.dtype)
        if x != 0 and self.want_d0:
            gemm(dh0, dR0, W_hh, tb=True, alpha=float(x))
        return dh0


def begin(P, X, kind, cell, L, keep=False):
    # every buffer of a CUDA call is its own (Run.scratch): kept ones need nothing more
    return Run(P, X, kind, cell, L)
