"""The CPU backend (numba): the engine, the cells, and the calls ``fastbptt.api`` makes.

The engine, by concern (it knows no cell):

- ``products``    the register tile, packed right factors, transposes
- ``lanes``       the lane scheduler of a sweep (bounded waits, steps taken over)
- ``fastmath``    float32 tanh and exp that vectorize
- ``head``        the softmax cross-entropy head over all rows
- ``projections`` the input projection and the weight gradients over all rows
- ``plan``        choices measured on this machine (blocking, sweeps' lanes), kept on disk
- ``team``        the threads of each call, measured under the current load
- ``cache``       where kernels and plans live; when a cached kernel is stale

The cells: ``elman`` ("rnn").  The order of a call's operations is ``fastbptt._model``;
this module gives it a *run* (one call's threads, plan, packed weights and buffers) and
the products over all rows.  Inputs arrive validated, C-contiguous, writeable, in one
float dtype (token ids int64).
"""
from . import cache

cache.install()              # before any kernel is defined: every kernel keyed by cache.stamp()

import threading  # noqa: E402

import numpy as np  # noqa: E402

from .. import config  # noqa: E402
from .._host import as_array, first_nonfinite, id_range, normalized, stack_states  # noqa: E402,F401
from . import elman, head, plan, products, projections, team  # noqa: E402
from .products import packed_shape, pack_cpu, transpose_cpu  # noqa: E402

CELLS = {"rnn": elman}


class _Scratch(threading.local):
    """Work buffers that never leave a call, kept for the next call of the same shapes (a
    fresh multi-MB buffer costs a page fault per 4 KiB on first touch).  One set per
    Python thread and kind of call, for the last two call shapes, holding at most
    config.CPU_SCRATCH_BYTES: a buffer beyond that is freed when its call returns."""

    def __init__(self):
        self.sets = {}

    def get(self, call, name, shapes, dtype):
        bufs = self.sets.setdefault(call, {})
        self.sets[call] = self.sets.pop(call)          # most recent last
        while len(self.sets) > 2:
            del self.sets[next(iter(self.sets))]
        got = bufs.get(name)
        if got is None or [b.shape for b in got] != [tuple(shape) for shape in shapes]:
            got = tuple(products.empty(shape, dtype) for shape in shapes)
            kept = sum(b.nbytes for group in bufs.values() for b in group)
            if kept + sum(b.nbytes for b in got) <= config.CPU_SCRATCH_BYTES:
                bufs[name] = got
        return got

    def nbytes(self):
        return sum(b.nbytes for bufs in self.sets.values() for group in bufs.values() for b in group)


_scratch = _Scratch()


class Run:
    """One call: its thread count (from the team), plan, packed weights and buffers."""

    def __init__(self, P, X, kind):
        self.P, self.X, self.kind = P, X, kind
        self.T, self.B = X.shape[:2]
        self.H = P["W_hh"].shape[0]
        self.dtype = P["W_hh"].dtype
        self.h0_zero = False
        self._packed = {}
        self._buffers = {}

    def __enter__(self):
        self._call = team.team.call((self.kind, self.X.ndim, self.T, self.B, self.H, self.dtype.char))
        self.n = self._call.__enter__()
        self.plan = plan.current(self._call.most)
        return self

    def __exit__(self, *exc):
        self._call.__exit__(*exc)

    # ------------------------------------------------------------------- the engine
    def blk(self, kind):
        return self.plan.blk(kind)

    def sweep(self, B, H):
        """(lanes, blk) of a sweep of B x H steps"""
        return self.plan.sweep(self.dtype, B, H)

    def packed(self, key, transposed=False):
        """the weight P[key] (or its transpose) packed for the tile, once per call, into a
        kept buffer"""
        name = (key, transposed)
        if name not in self._packed:
            W = self.P[key].T if transposed else self.P[key]
            Wp, = self.scratch(f"{key}{'T' if transposed else ''} packed", [packed_shape(*W.shape)])
            pack_cpu(Wp, W, self.n)
            self._packed[name] = Wp
        return self._packed[name]

    def scratch(self, name, shapes):
        """work buffers kept across calls of the same shapes (see _Scratch)"""
        Q = self.P["W_hq"].shape[1] if "W_hq" in self.P else 0
        return _scratch.get((self.kind, self.T, self.B, self.H, Q, self.dtype), name, shapes, self.dtype)

    # ------------------------------------------------------------------- the graph's
    def states(self):
        T, B, H = self.T, self.B, self.H
        if self.kind in ("forward", "backward", "adjoints"):     # returned to the caller
            return products.empty((T + 1, B, H), self.dtype)
        return self.scratch("S", [(T + 1, B, H)])[0]

    def results(self, arrays):
        return arrays

    def last_state(self, S):
        return S[-1].copy()

    def transposed_states(self, S):
        """h_0..h_T transposed, (H, (T+1)·B): the A of ∂W_hh and ∂W_hq, once per call"""
        if "ST" not in self._buffers:
            T1, B, H = S.shape
            self._buffers["ST"], = self.scratch("ST", [(H, T1 * B)])
            transpose_cpu(self._buffers["ST"], S.reshape(T1 * B, H), self.n)
        return self._buffers["ST"]


def begin(P, X, kind):
    return Run(P, X, kind)


def given(run, a):
    """an array the caller passed (states or direct terms), used as it is"""
    if a.shape[0] == run.T + 1:
        run.h0_zero = not a[0].any()
    return a


def ones(run, T, dtype):
    return np.ones(T, dtype)


def direct_terms(run, dZ):
    """A (T+1,B,H): A[0] = 0, A[1:] = dZ (before the sweep overwrites it)"""
    A = np.zeros((dZ.shape[0] + 1,) + dZ.shape[1:], dZ.dtype)
    A[1:] = dZ
    return A


# -------------------------------------------------------------------- rows products
def embed(run, X, S, h0):
    """S[0] = h_0;  S[1:] = pre_t = x_t W_xh + b_h (a row gather for token ids)"""
    T, B, H = run.T, run.B, run.H
    S[0] = h0
    run.h0_zero = not h0.any()
    if X.ndim == 2:
        projections.embed_tokens_cpu(S[1:], X, run.P["W_xh"], run.P["b_h"], run.n)
    else:
        projections.embed_dense_cpu(S[1:].reshape(T * B, H), X.reshape(T * B, -1),
                                    run.packed("W_xh"), run.P["b_h"], run.blk("rows"), run.n)


def head_loss(run, S, Y):
    T, B, H = run.T, run.B, run.H
    N, Q = T * B, run.P["W_hq"].shape[1]
    logits, = run.scratch("logits", [(N, Q)])
    row_loss = np.empty(N)
    head.head_loss_cpu(logits, row_loss, S[1:].reshape(N, H), Y.reshape(N), run.packed("W_hq"),
                       run.P["b_q"], run.blk("rows"), run.n)
    return float(row_loss.sum())


def head_forward_backward(run, S, Y, scale):
    """(loss, dZ = ∂L/∂h_t through the head (T,B,H), {"W_hq", "b_q"} gradients)"""
    T, B, H = run.T, run.B, run.H
    N, Q = T * B, run.P["W_hq"].shape[1]
    dZ, logits, dop = run.scratch("head", [(T, B, H), (N, Q), packed_shape(N, Q)])
    row_loss = np.empty(N)
    dW_hq = products.empty((H, Q), run.dtype)
    db_q = np.empty(Q, run.dtype)
    head.head_forward_backward_cpu(
        dZ.reshape(N, H), dW_hq, db_q, logits, dop, row_loss, S[1:].reshape(N, H),
        run.transposed_states(S), B, Y.reshape(N), run.packed("W_hq"),
        run.packed("W_hq", transposed=True), run.P["b_q"], scale, run.blk("rows"), run.n)
    return float(row_loss.sum()) * scale, dZ, {"W_hq": dW_hq, "b_q": db_q}


def _packed_dZ(run, dZ2, k0):
    """dZ2[k0:] (the B operand of the weight gradients) packed, in a kept buffer"""
    dZp, = run.scratch(f"dZp{k0}", [packed_shape(dZ2.shape[0] - k0, dZ2.shape[1])])
    pack_cpu(dZp, dZ2[k0:], run.n)
    return dZp


def recurrent_grads(run, S, dZ):
    """∂W_hh = Σ_t h_{t-1}ᵀ dz_t, ∂b_h = Σ_t Σ_b dz_t: one product over the T·B rows (the
    h_0 rows skipped when h_0 = 0)"""
    T, B, H = dZ.shape
    dZ2 = dZ.reshape(T * B, H)
    k0 = B if run.h0_zero else 0
    dW_hh = products.empty((H, H), dZ.dtype)
    db_h = np.empty(H, dZ.dtype)
    projections.recurrent_grads_cpu(dW_hh, db_h, dZ2, _packed_dZ(run, dZ2, k0),
                                    run.transposed_states(S), k0, run.blk("grad"), run.n)
    return dW_hh, db_h


def input_grads(run, X, dZ):
    """∂W_xh = Σ_t x_tᵀ dz_t: a scatter-add for token ids, else one product"""
    T, B, H = dZ.shape
    dW_xh = products.empty(run.P["W_xh"].shape, dZ.dtype)
    if X.ndim == 2:
        projections.embed_tokens_backward_cpu(dW_xh, dZ, X)
    else:
        X2 = X.reshape(T * B, -1)
        XT = products.empty((X2.shape[1], T * B), dZ.dtype)
        transpose_cpu(XT, X2, run.n)
        dZ2 = dZ.reshape(T * B, H)
        projections.embed_dense_backward_cpu(dW_xh, XT, _packed_dZ(run, dZ2, 0), run.blk("grad"), run.n)
    return dW_xh


def tune(progress=True, sweeps=()):
    """measure this machine's plan now (``fastbptt tune``) and return it"""
    return plan.tune(team.max_threads(), progress, sweeps)


def current_plan():
    return plan.current(team.max_threads())
