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
- ``arrays``      the validation's scans of host arrays (non-finite values, id ranges)

The cells: ``elman`` ("rnn"), ``gru``, ``lstm``.  The order of a call's operations is ``fastbptt._model``;
this module gives it a *run* (one call's threads, plan, packed weights and buffers) and
the products over all rows.  Inputs arrive validated, C-contiguous, writeable, in one
float dtype (token ids int64).
"""
from . import cache

cache.install()              # before any kernel is defined: every kernel keyed by cache.stamp()

import threading  # noqa: E402
import weakref  # noqa: E402

import numpy as np  # noqa: E402

from .. import config  # noqa: E402
from .._model import LayerParams  # noqa: E402
from .. import _host  # noqa: E402
from .._host import as_array, equal, stack_states  # noqa: E402,F401
from .arrays import first_nonfinite, id_range  # noqa: E402,F401
from . import elman, gru, head, lstm, plan, products, projections, team  # noqa: E402
from .plan import numba_threads  # noqa: E402
from .products import gemm_cpu, packed_shape, pack_cpu, transpose_cpu  # noqa: E402

CELLS = {"rnn": elman, "gru": gru, "lstm": lstm}


class _Scratch(threading.local):
    """Work buffers that never leave a call, kept for the next call of the same shapes (a
    fresh multi-MB buffer costs a page fault per 4 KiB on first touch).  One set per
    Python thread and kind of call, for the last two call shapes, holding at most
    config.CPU_SCRATCH_BYTES: a buffer beyond that is freed when its call returns."""

    def __init__(self):
        self.sets = {}

    def get(self, call, name, shapes, dtype):
        sets = self.sets
        if next(reversed(sets), None) != call:          # most recent last
            sets[call] = sets.pop(call, {})
            while len(sets) > 2:
                del sets[next(iter(sets))]
        bufs = sets[call]
        shapes = list(shapes)
        kept = bufs.get(name)                  # (the list of shapes asked for, the buffers)
        if kept is not None and kept[0] == shapes:
            return kept[1]
        got = tuple(products.empty(shape, dtype) for shape in shapes)
        held = sum(b.nbytes for _, group in bufs.values() for b in group)
        if held + sum(b.nbytes for b in got) <= config.CPU_SCRATCH_BYTES:
            bufs[name] = (shapes, got)
        return got

    def nbytes(self):
        return sum(b.nbytes for bufs in self.sets.values() for _, group in bufs.values() for b in group)


_scratch = _Scratch()
_work = _Scratch()              # the callers' arrays that a call overwrites (work_copy)
_transposes = _Scratch()        # transposed inputs made contiguous for one call (normalized)


def work_copy(name, a):
    """a copy of the caller's ``a`` that the call overwrites and never hands out (rnn_backward's
    direct terms), in a buffer kept for this thread's next call, as the calls' scratch: a
    fresh copy faults its pages in (docs/performance.md, "fixed cost per call")"""
    out, = _work.get(("work", a.dtype.str), name, [a.shape], a.dtype)
    np.copyto(out, a)
    return out


def copied(a, P):
    """a copy of ``a`` as a call's results leave (for the CUDA backend's params P, which may
    be on the device)"""
    return a.copy()


def transposed(a, out):
    """out = aᵀ (a C-contiguous 2-D float array; out C-contiguous, of aᵀ's shape and a's
    dtype), by the engine's vector transpose, on as many threads as this thread's last call
    (team.recent)"""
    with numba_threads(team.team.recent()) as n:
        transpose_cpu(out, a, n)
    return out


def owned(a):
    """``a``, or a copy of it when it lies in one of this thread's buffers of normalized
    transposes, which the next call of the same shapes overwrites (for what a call keeps
    beyond itself: rnn_forward(keep=True)'s inputs)"""
    for bufs in _transposes.sets.values():
        for _, group in bufs.values():
            if any(np.may_share_memory(a, b) for b in group):
                return a.copy()
    return a


def normalized(name, a, dtype, copy=False, weight=False):
    """as fastbptt._host.normalized, but a transposed 2-D float array of ``dtype`` (a weight
    given as Wᵀ, as torch holds it) is made C-contiguous by the engine's vector transpose,
    several times faster than a blocked copy, into a buffer kept for this thread's next call
    (per ``name``): the API reads its inputs only while the call runs, and a fresh buffer
    would fault its pages in (docs/performance.md, "strided arrays").  A ``weight`` (a
    parameter matrix, which the engine reads only to pack it, Run.packed) stays as it is
    when it is such a transpose: it is packed from it, with no copy of its own."""
    flags = a.flags
    if not copy and a.dtype == dtype and flags.c_contiguous and flags.writeable:
        return a                                        # as it is (most calls' every array)
    transpose = (not copy and a.ndim == 2 and a.dtype == dtype and a.dtype in (np.float32, np.float64)
                 and a.T.flags.c_contiguous)                    # a float matrix given as its transpose
    if transpose and weight and flags.writeable:
        return a
    if transpose and not flags.c_contiguous:
        out, = _transposes.get(("transposes", a.dtype.str), name, [a.shape], a.dtype)
        return transposed(a.T, out)
    return _host.normalized(name, a, dtype, copy)


class _Records:
    """Buffers that outlive a call, taken again once what held them is gone: the records that
    rnn_forward(keep=True) hands out, and the arrays lent to a framework (``lend``: the PyTorch
    bridge's transposed weights and gradients).  A training loop then reuses the same pages
    every step instead of faulting fresh ones in.  At most eight free sets per shape (a
    stack's layers share one), and config.CPU_SCRATCH_BYTES in all."""

    def __init__(self):
        self.free = {}
        self.lock = threading.Lock()

    def take(self, shapes, dtype):
        key = (tuple(tuple(s) for s in shapes), np.dtype(dtype).str)
        with self.lock:
            sets = self.free.get(key)
            if sets:
                return key, sets.pop()
        return key, tuple(products.empty(shape, dtype) for shape in shapes)

    def give(self, taken):
        with self.lock:
            for key, bufs in taken:
                kept = sum(b.nbytes for sets in self.free.values() for group in sets for b in group)
                sets = self.free.setdefault(key, [])
                if len(sets) < 8 and kept + sum(b.nbytes for b in bufs) <= config.CPU_SCRATCH_BYTES:
                    sets.append(bufs)

    def lend(self, shape, dtype):
        """a new view of a buffer, given back once that view is collected: for a holder that
        keeps the very array it is handed (``torch.from_numpy`` does, and so does every tensor
        torch makes of it), never a view of it"""
        taken = self.take([shape], dtype)
        a = taken[1][0].view()
        weakref.finalize(a, self.give, [taken])
        return a


_records = _Records()


class Run(LayerParams):
    """One call: its thread count (from the team), plan, packed weights and buffers, and the
    products over all rows that the graph and the cells ask for."""

    def __init__(self, P, X, kind, cell, L, keep=False):
        self.P, self.X, self.kind, self.cell, self.L = P, X, kind, cell, L
        self.keep = keep                  # the records outlive the call (Run.record)
        self.want_d0 = True               # the state gradients are asked for (Run.cross)
        self._taken = []
        self.T, self.B = X.shape[:2]
        self.H = P["W_hh"].shape[0]
        self.dtype = P["W_hh"].dtype
        self._packed = {}
        self._sweeps = {}                 # (B, H): the sweeps' choices, one for the whole call
        self._buffers = {}
        self._scratch_key = None

    def __enter__(self):
        self._call = team.team.call((self.kind, self.cell.__name__, self.L, self.X.ndim, self.T, self.B,
                                     self.H, self.dtype.char))
        self.n = self._call.__enter__()
        self.plan = plan.current(self._call.most)
        return self

    def __exit__(self, *exc):
        self._call.__exit__(*exc)

    # ------------------------------------------------------------------- the engine
    def blk(self, kind, M=0, K=0, N=0, split="cols"):
        """the blocking of a product (M,K) x (K,N) of ``kind`` split by ``split`` (the plan's
        for its shape)"""
        return self.plan.blk(kind, self.dtype, M, K, N, split)

    def sweep(self, B, H):
        """(lanes, blk) of a sweep of the call's cell on B x H steps: the plan's when the call
        first asks, the same for the rest of it"""
        got = self._sweeps.get((B, H))
        if got is None:
            got = self._sweeps[B, H] = self.plan.sweep(self.cell, self.dtype, B, H)
        return got

    def follow(self, records):
        """run the sweeps as the kept forward that made ``records`` did (its gates are in the
        column order of its lanes), whatever this call's plan says: another thread count has
        another plan, and a plan's choice may have been measured again since"""
        self._sweeps.update(records.sweeps)

    def packed(self, key, transposed=False, cols=None):
        """the weight P[key] (its columns in the order cols, or all), or its transpose, packed
        for the tile, once per call, into a kept buffer"""
        name = (key, transposed)
        if name not in self._packed:
            W = self.P[key]
            K, N = W.shape[::-1] if transposed else W.shape
            Wp, = self.scratch(f"{key}{'T' if transposed else ''} packed", [packed_shape(K, N)])
            if cols is None and not transposed and W.flags.c_contiguous:
                pack_cpu(Wp, W, self.n)
            else:
                order = np.arange(W.shape[1]) if cols is None else cols
                if W.flags.c_contiguous:              # a transpose packs in blocks turned in registers
                    products.pack_columns_cpu(Wp, W, order, transposed, self.n)
                else:                                 # given as its transpose (normalized's weights)
                    products.pack_rows_cpu(Wp, W.T, order, transposed, self.n)
            self._packed[name] = Wp
        return self._packed[name]

    def scratch(self, name, shapes):
        """work buffers kept across calls of the same shapes (see _Scratch)"""
        if self._scratch_key is None:
            Q = self.P["W_hq"].shape[1] if "W_hq" in self.P else 0
            self._scratch_key = (self.kind, self.cell.__name__, self.L, self.T, self.B, self.H, Q, self.dtype)
        return _scratch.get(self._scratch_key, name, shapes, self.dtype)

    def record(self, name, shapes):
        """the buffers of a layer's record (what its backward reads): scratch, or, in a call
        whose records outlive it (keep), buffers of their own (_Records) until keep_until's
        holder is gone"""
        if not self.keep:
            return self.scratch(name, shapes)
        key, bufs = _records.take(shapes, self.dtype)
        self._taken.append((key, bufs))
        return bufs

    def keep_until(self, holder):
        """the records this call took go back to _Records when ``holder`` is collected; the
        holder notes this call's sweeps (``follow``)"""
        holder.sweeps = self._sweeps
        weakref.finalize(holder, _records.give, self._taken)

    def zeros(self, name, shape):
        a, = self.scratch(name, [shape])
        a[:] = 0
        return a

    # ---------------------------------------------------------------- layers, columns
    @property
    def lanes(self):
        """the column lanes of the call's sweeps (the plan's for B x H; 1 when they split the
        rows instead): a gated cell's columns are grouped by them"""
        return max(1, self.sweep(self.B, self.H)[0])

    def columns(self, G):
        """a gated cell's column order inside the engine (products.interleaved); None for the
        natural order (one lane, or the rows split), whose packs, gathers and gradients are
        then plain copies, or nothing"""
        if self.lanes == 1:
            return None
        if ("columns", G) not in self._buffers:
            self._buffers[("columns", G)] = products.interleaved(self.H, G, self.lanes)
        return self._buffers[("columns", G)]

    def runs(self, cols, N):
        """``products.runs_of`` the column order cols (None: the N columns in order), once per call"""
        if ("runs", N) not in self._buffers:
            self._buffers[("runs", N)] = products.runs_of(np.arange(N) if cols is None else cols)
        return self._buffers[("runs", N)]

    def natural(self, a, cols):
        """a (..., G·H) from the engine's column order back to the natural one"""
        if cols is None:
            return a
        out = products.empty(a.shape, a.dtype)
        products.unpermute_cpu(out.reshape(-1, a.shape[-1]), a.reshape(-1, a.shape[-1]), self.H,
                               self.lanes, self.n)
        return out

    # ------------------------------------------------------------------- the graph's
    def given(self, a):
        """an array the caller passed (states or direct terms), used as it is"""
        return a

    def output(self, a):
        return a.copy()

    def fresh(self, shape):
        """a new zero array of the call's dtype that outlives the call"""
        return np.zeros(shape, self.dtype)

    def stored(self, a):
        """a copy of a state kept between the runs of a memory-bounded call"""
        return a.copy()

    def results(self, arrays):
        return arrays

    def last_states(self, cell, lays):
        """one array (L,B,H) per state of the cell (h, and c for the LSTM)"""
        return tuple(_stacked([getattr(lay, name)[self.T] for lay in lays]) for name in cell.STATES)

    def state_grads(self, d0):
        """one array (L,B,H) per state of the cell, from one tuple per layer"""
        return tuple(_stacked(g) for g in zip(*d0))

    def add(self, dst, src):
        projections.add_cpu(dst.reshape(-1), src.reshape(-1), self.n)

    def times(self, out, a, m):
        """out = a ⊙ m (same shapes; out may be a): a layer's input mask, once per call and layer"""
        np.multiply(a, m, out=out)

    def shift(self, C, n):
        """C[:n-1] = C[1:n] (a chain's carry, one step back)"""
        C[:n - 1] = C[1:n].copy()

    def transposed_states(self, S):
        """h_0..h_T transposed, (H, (T+1)·B): the A of ∂W_hh and ∂W_hq, once per call and layer"""
        got = self._buffers.get("ST")
        if got is None or got[0] is not S:
            T1, B, H = S.shape
            ST, = self.scratch(f"ST{T1}", [(H, T1 * B)])
            transpose_cpu(ST, S.reshape(T1 * B, H), self.n)
            self._buffers["ST"] = got = (S, ST)
        return got[1]

    # ------------------------------------------------------------------ rows products
    def project(self, X, out, key, bias, cols=None):
        """out (T·B,G·H) = X W + b over all rows: a row gather for token ids X (T,B), one
        product for dense X (T,B,D); W = P[key] and b with their columns in the order cols"""
        if X.ndim == 2:
            W = self.P[key]
            if not W.flags.c_contiguous:            # a weight given as its transpose: rows for the gather
                W = transposed(W.T, self.scratch(f"{key} rows", [W.shape])[0])
            projections.embed_tokens_cpu(out.reshape(self.T, self.B, -1), X, W, bias, self.runs(cols, W.shape[1]),
                                         self.n)
        else:
            bias = bias if cols is None else bias[cols]
            X2 = X.reshape(self.T * self.B, -1)
            projections.embed_dense_cpu(out, X2, self.packed(key, cols=cols), bias,
                                        self.blk("rows", *X2.shape, out.shape[1], split="rows"), self.n)

    def head_loss(self, S, Y):
        T, B, H = S.shape[0] - 1, self.B, self.H
        N, Q = T * B, self.P["W_hq"].shape[1]
        logits, = self.scratch("logits", [(N, Q)])
        row_loss = np.empty(N)
        head.head_loss_cpu(logits, row_loss, S[1:].reshape(N, H), Y.reshape(N), self.packed("W_hq"),
                           self.P["b_q"], self.blk("rows"), self.n)
        return float(row_loss.sum())

    def head_forward_backward(self, S, Y, scale):
        """(loss, dH = ∂L/∂h_t through the head (T,B,H), {"W_hq", "b_q"} gradients) of the steps
        of S (T+1,B,H) h_0..h_T: the call's, or a range of them"""
        T, B, H = S.shape[0] - 1, self.B, self.H
        N, Q = T * B, self.P["W_hq"].shape[1]
        dH, logits, dop = self.scratch("head", [(T, B, H), (N, Q), packed_shape(N, Q)])
        row_loss = np.empty(N)
        dW_hq = products.empty((H, Q), self.dtype)
        db_q = np.empty(Q, self.dtype)
        head.head_forward_backward_cpu(
            dH.reshape(N, H), dW_hq, db_q, logits, dop, row_loss, S[1:].reshape(N, H),
            self.transposed_states(S), B, Y.reshape(N), self.packed("W_hq"),
            self.packed("W_hq", transposed=True), self.P["b_q"], scale, self.blk("rows"), self.n)
        return float(row_loss.sum()) * scale, dH, {"W_hq": dW_hq, "b_q": db_q}

    def _packed_rows(self, d, cols, name, E=None, ids=None):
        """(d packed, Σ over its rows) of d (T,B,G·H) over its T·B rows, the B operand of a
        weight gradient and its bias gradient, from one read of d, in the natural column
        order when its columns are a gated cell's (cols), in the kept buffer ``name``; with
        E, the scatter-add E[ids[k]] += d's row k (∂W_xh of token ids) in the same read"""
        d2 = d.reshape(-1, d.shape[-1])
        N = d2.shape[1]
        dZp, = self.scratch(name, [packed_shape(*d2.shape)])
        sums = np.empty(N, d.dtype)
        runs = products.natural_runs(self.H, N // self.H, 1 if cols is None else self.lanes)
        if E is None:
            E, ids = np.empty((0, N), d.dtype), np.empty(0, np.int64)
        products.pack_sums_cpu(dZp, sums, d2, runs, E, ids, self.n)
        return dZp, sums

    def weight_grads(self, X, S, dP, dR, cols=None):
        """(∂W_xh = Σ_t x_tᵀ dP_t, ∂W_hh = Σ_t h_{t-1}ᵀ dR_t (H,G·H), Σ_t Σ_b dP_t, Σ_t Σ_b dR_t),
        in the natural column order: one product over the T·B rows each (the h_0 rows skipped
        when h_0 = 0; a scatter-add for token ids).  dR is packed once, its sums taken as it is
        packed, and that packing serves ∂W_xh too when dP is dR (a cell whose input and
        recurrent sides share one dZ; the two sums are then one array): for token ids its
        scatter-add runs in the same read.  A dense dP of its own is packed and summed the
        same way, and a dP of its own for token ids is summed in the scatter-add's read."""
        T, B, GH = dR.shape
        k0 = 0 if S[0].any() else B
        dW_hh = products.empty((self.H, GH), dR.dtype)
        dW_xh = products.empty((X.shape[2] if X.ndim == 3 else self.P["W_xh"].shape[0], GH), dP.dtype)
        scatter = X.ndim == 2 and dP is dR
        dRp, dbR = self._packed_rows(dR, cols, "dRp", *((dW_xh, X.reshape(-1)) if scatter else ()))
        projections.recurrent_grads_cpu(dW_hh, dRp, self.transposed_states(S), k0,
                                        self.blk("grad", self.H, T * B, GH), self.n)
        if scatter:
            dbP = dbR
        elif X.ndim == 2:
            dbP = np.empty(GH, dP.dtype)
            projections.embed_tokens_backward_cpu(dW_xh, dbP, dP, X, self.n)
            dW_xh, dbP = self.natural(dW_xh, cols), self.natural(dbP, cols)
        else:
            X2 = X.reshape(T * B, -1)
            XT, = self.scratch("XT", [(X2.shape[1], T * B)])
            transpose_cpu(XT, X2, self.n)
            dPp, dbP = dRp, dbR
            if dP is not dR:
                dPp, dbP = self._packed_rows(dP, cols, "dPp")
            projections.embed_dense_backward_cpu(dW_xh, XT, dPp, self.blk("grad", *XT.shape, GH), self.n)
        return dW_xh, dW_hh, dbP, dbR

    def input_adjoint(self, l, dP, G, out=None, add=True):
        """∂L/∂(layer l's input) (rows, D) = dP W_xhᵀ: a new array, or into out (added to it,
        or overwriting it when not ``add``)"""
        W = self.key("W_xh", l)
        overwrite = out is None or not add
        if out is None:
            out = products.empty(dP.shape[:-1] + (self.P[W].shape[0],), dP.dtype)
        WTp = self.packed(W, transposed=True, cols=self.columns(G) if G > 1 else None)
        out2, dP2 = out.reshape(-1, out.shape[-1]), dP.reshape(-1, dP.shape[-1])
        gemm_cpu(out2, dP2, WTp, dP.dtype.type(1), self.blk("rows", *dP2.shape, out2.shape[1]), self.n,
                 products.OVERWRITE if overwrite else products.ADD)
        return out

    def recurrent_adjoint(self, l, dR, G, out):
        """out (rows,H) += dR W_hhᵀ"""
        WTp = self.packed(self.key("W_hh", l), transposed=True, cols=self.columns(G) if G > 1 else None)
        dR2 = dR.reshape(-1, dR.shape[-1])
        gemm_cpu(out.reshape(-1, self.H), dR2, WTp, dR.dtype.type(1), self.blk("rows", *dR2.shape, self.H),
                 self.n, products.ADD)

    def cross(self, dR0, WTp, x):
        """ξ_1 · dR_1 W_hhᵀ (B,H): the product's share of ∂L/∂h_0 (zeros when the caller asked
        for no state gradients, want_d0)"""
        dh0 = products.empty((self.B, self.H), dR0.dtype)
        if x != 0 and self.want_d0:
            gemm_cpu(dh0, dR0, WTp, x, self.blk("rows"), self.n, products.OVERWRITE)
        else:
            dh0[:] = 0
        return dh0


def _stacked(arrays):
    """np.stack(arrays): a new (L,B,H) array (one layer's without np.stack's own overhead)"""
    return arrays[0][None].copy() if len(arrays) == 1 else np.stack(arrays)


def begin(P, X, kind, cell, L, keep=False):
    return Run(P, X, kind, cell, L, keep)


def tune(progress=True, sweeps=()):
    """measure this machine's plan now (``fastbptt tune``) and return it; sweeps: (cell
    name, dtype, B, H)"""
    return plan.tune(team.max_threads(), progress, [(CELLS[c], *rest) for c, *rest in sweeps])


def current_plan():
    return plan.current(team.max_threads())
