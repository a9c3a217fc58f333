"""fastbptt from PyTorch: :class:`RNN`, :class:`GRU` and :class:`LSTM`, drop-ins for
``torch.nn.RNN``, ``torch.nn.GRU`` and ``torch.nn.LSTM`` whose forward and backward are
fastbptt's kernels.

    import fastbptt.torch
    rnn = fastbptt.torch.GRU(V, 256)                  # torch.nn.GRU's arguments, parameters, state_dict
    output, h_n = rnn(X, h0)                          # torch.nn.GRU's shapes
    output, h_n = rnn(X, h0, truncation=fastbptt.Truncated(5))

Each class *is* its ``torch.nn`` class (a subclass: the same constructor, parameter names,
shapes and initialization, ``load_state_dict`` both ways, ``isinstance(m, torch.nn.LSTM)``)
with ``forward`` replaced by one ``torch.autograd.Function``: one ``fastbptt.rnn_forward``
call forward (keeping the gates) and one backward from what it kept (``api.kept_backward``:
``rnn_backward``'s, no per-step Python), giving the gradients of the input, of ``hx`` and
of every parameter.

Where it runs follows the tensors, as in torch.nn: CPU tensors on fastbptt's CPU engine
(shared with numpy, not copied), CUDA tensors on its CUDA backend (``device="cuda"``:
numba-cuda, ``pip install fastbptt[cuda]``), shared through the CUDA array interface.  Under
``torch.compile`` the modules' forward runs eagerly (a graph break) and the rest of the model
compiles.

``truncation=`` (forward's only extra argument): None (exact BPTT), ``fastbptt.Truncated(k)``
or ``fastbptt.Randomized(p, seed)``.  The loss terms it counts steps from are what flows into
``output[t]``, and into ``h_n`` (and ``c_n``) of every layer at the last step.

Also beyond ``torch.nn``: integer token ids (T,B) (or (B,T) with ``batch_first``; (T,) unbatched)
as the input, with ``input_size`` the vocabulary: the same as ``one_hot(X, V).float()``
without building the one-hot.  A one-hot float input that needs no gradient (the book's
concise models) is found as such on the CPU and runs as its ids: a row gather instead of the
input product, a scatter-add instead of ∂W_xh's product.

``dropout`` between layers in training mode runs in the stack's one call (``input_masks``), its
masks torch's own draws, so that from the same seed the results are torch.nn's.
``bidirectional=True``, ``PackedSequence`` input and the LSTM's ``proj_size`` run the stack a
layer and a direction at a time, joined by torch as torch.nn joins them, with dropout between
the layers (``_Bridge._by_layer``).  With ``proj_size`` (h_t = W_hr (o ⊙ tanh c_t)) each
call is the plain LSTM on o ⊙ tanh(c_t) with weight_hh·weight_hr its recurrent weight, torch
projecting its output (``_projected``; under truncation weight_hr's recurrent gradient comes
from a second call, so that a window never credits it with the state it starts from).  A
PackedSequence gives each sequence the outputs
and last state of its own steps, from one call over all steps each way: h_n is read off the
output at each sequence's last step, and the LSTM's c_n off its cell states there
(``api.kept_cell_states``, whose gradient enters the backward at that step:
``kept_backward(dCs=)``).  With ``truncation=``, each sequence's terms are counted within its
own steps, h_n's and c_n's joining its last step's term.

Not supported (each raises ``NotImplementedError`` naming it, never a wrong answer): tensors
neither on the CPU nor on a CUDA GPU; ``truncation=Truncated(k)`` with 1 < k < T where a
gradient is asked of a stack (num_layers > 1) that runs a layer at a time (bidirectional,
proj_size, PackedSequence): each layer's call would count the terms handed down to it
afresh.
Parameters must be float32 or float64 (the compute dtype); under ``torch.autocast`` a
lower-precision input runs in it too, and the outputs are of it (autocast's later ops cast them
as they need).  The gradients are not differentiable again (a second backward raises
``RuntimeError``); ``torch.func.grad`` works, ``torch.func.vmap`` (and ``jacrev``, ``jacfwd``,
``hessian``) raise ``NotImplementedError``.  Under ``torch.compile`` the module runs as its own
graph break (``fullgraph=True`` cannot hold it).  ``torch.export``
and TorchScript (``torch.jit.script``/``trace``, ONNX) raise ``NotImplementedError``: export
the ``torch.nn`` module with the same state_dict instead.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import numbers

try:
    import torch
except ImportError as e:                                   # pragma: no cover - exercised in a subprocess
    raise ImportError(f"fastbptt.torch needs PyTorch: pip install fastbptt[torch] ({e})") from e

import numpy as np
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import api
from ._model import key as _key
from .truncation import Randomized, Truncated

__all__ = ["RNN", "GRU", "LSTM"]

#: run eagerly under torch.compile: its graph stops before the bridge's forward and goes on after
#: it (TorchDynamo cannot trace into numba's dispatcher)
_eager = getattr(torch.compiler, "disable", None) or torch._dynamo.disable

_MODES = {"RNN_TANH": ("rnn", "tanh"), "RNN_RELU": ("rnn", "relu"), "GRU": ("gru", "tanh"),
          "LSTM": ("lstm", "tanh")}
_FLOATS = (torch.float32, torch.float64)


class _Config:
    """what the Function needs besides tensors"""

    def __init__(self, cell, act, L, H, bias, truncation, place, input_grad, cell_states=False, masks=None):
        self.cell, self.act, self.L, self.H, self.bias, self.truncation = cell, act, L, H, bias, truncation
        self.place, self.input_grad = place, input_grad      # input_grad: ∂L/∂X may be asked for
        self.cell_states = cell_states                       # the LSTM's c_1..c_T an output too
        self.masks = masks                                   # the layers' dropout masks, or None
        self.per_layer = 4 if bias else 2
        self.kept = None                                     # the forward's, for setup_context
        self.grad = True                                     # a backward may follow (see _run)


def _np(t):
    """a CPU tensor as numpy, sharing its memory"""
    return t.detach().numpy()


def _transposed(w):
    """wᵀ (w C-contiguous 2-D) by the engine's vector transpose, into an array lent by the
    engine (``_Records.lend``): the weight gradients handed to torch (``zero_grad()`` drops
    them each step) come back once collected, so a training loop writes the same pages every
    step (docs/performance.md, "fresh pages")"""
    from . import _cpu
    return _cpu.transposed(w, out=_cpu._records.lend(w.shape[::-1], w.dtype))


class _Host:
    """CPU tensors and fastbptt's CPU engine: tensors as numpy arrays sharing their memory"""
    backend = "cpu"

    def running(self):
        from ._cpu import team
        team.check_usable()              # before the bridge's own kernels (one-hot ids, transposes)
        return contextlib.nullcontext()

    def array(self, t):
        return _np(t)

    def tensor(self, a):
        return torch.from_numpy(np.ascontiguousarray(a))

    def weight(self, w):
        """fastbptt's W = wᵀ of torch's weight w: a view, which the engine packs from as it is
        (no copy in torch's layout or in fastbptt's; the API copies a strided one)"""
        return _np(w).T

    def weight_grad(self, g):
        """torch's gradient of a weight from fastbptt's g = ∂L/∂Wᵀ: gᵀ, C-contiguous (torch keeps
        a gradient only in its parameter's layout), in a lent array"""
        return torch.from_numpy(_transposed(g))


class _Cuda:
    """CUDA tensors and fastbptt's CUDA backend (``device="cuda"``), zero-copy both ways
    through the CUDA array interface: the params are made on the device by torch ops, so the
    results stay there as numba device arrays that torch wraps.  Every kernel runs on the
    legacy default stream, as torch's and CuPy's do unless told otherwise: work queued on
    another torch stream is waited for first, and the call's work before torch goes on."""
    backend = "cuda"

    def __init__(self, device, name):
        try:
            from numba import cuda
        except ImportError:
            raise RuntimeError(f"fastbptt.torch.{name}: CUDA tensors need numba-cuda: "
                               f"pip install fastbptt[cuda]") from None
        self.cuda, self.device = cuda, device

    @contextlib.contextmanager
    def running(self):
        stream = torch.cuda.current_stream(self.device)
        other = stream.cuda_stream != 0
        if other:
            stream.synchronize()
        with self.cuda.gpus[self.device.index or 0]:
            yield
            if other:
                self.cuda.synchronize()

    def array(self, t):
        return self.cuda.as_cuda_array(t.detach().contiguous())

    def tensor(self, a):
        return torch.as_tensor(a, device=self.device)

    def weight(self, w):
        return self.array(w.detach().t().contiguous())

    def weight_grad(self, g):
        return self.tensor(g).t().contiguous()


_HOST = _Host()


def _place(tensors, name):
    """where a call runs: _HOST for CPU tensors, a _Cuda for tensors on one CUDA device"""
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise RuntimeError(f"fastbptt.torch.{name}: input, hx and parameters must be on one device, got "
                           f"{', '.join(sorted(map(str, devices)))}")
    device, = devices
    if device.type == "cpu":
        return _HOST
    if device.type == "cuda":
        return _Cuda(device, name)
    raise NotImplementedError(f"fastbptt.torch.{name}: only CPU and CUDA tensors are supported, got one on "
                              f"{device}; use torch.nn.{name} there")


def _params(cfg, weights):
    """fastbptt's params from torch's weights, made once per forward and kept for its
    backward: W_xh = weight_ihᵀ, W_hh = weight_hhᵀ, b_h = bias_ih + bias_hh (the GRU: +
    [bias_hh_r, bias_hh_z, 0] and b_hn = bias_hh_n), as the place's arrays"""
    H, G, place = cfg.H, api.CELLS[cfg.cell], cfg.place
    P = {}
    for l in range(cfg.L):
        w = weights[l * cfg.per_layer:(l + 1) * cfg.per_layer]
        P[_key("W_xh", l)], P[_key("W_hh", l)] = place.weight(w[0]), place.weight(w[1])
        if cfg.bias:
            b_ih, b_hh = w[2].detach(), w[3].detach()
            if cfg.cell == "gru":
                b = b_ih.clone()
                b[:2 * H] += b_hh[:2 * H]
                P[_key("b_h", l)] = place.array(b)
                P[_key("b_hn", l)] = place.array(b_hh[2 * H:])
            else:
                P[_key("b_h", l)] = place.array(b_ih + b_hh)
        else:
            P[_key("b_h", l)] = place.array(w[1].new_zeros(G * H))
            if cfg.cell == "gru":
                P[_key("b_hn", l)] = place.array(w[1].new_zeros(H))
    return P


def _state(cfg, h0, c0):
    """the state as fastbptt takes it: None (zeros) or (L,B,H) arrays"""
    if h0 is None:
        return None
    a = cfg.place.array
    return (a(h0), a(c0)) if cfg.cell == "lstm" else a(h0)


def _one_hot_ids(X):
    """the token ids (T,B) of a one-hot X (T,B,D) (each row a single 1, the rest 0), else None:
    x_t W_xh is then the row W_xh[id], and ∂W_xh a scatter-add of the rows of dZ (the
    book's concise models feed one_hot(X).float())"""
    if X.ndim != 3 or X.shape[2] < 2 or X.size == 0 or not X.flags.c_contiguous:
        return None
    from ._cpu import arrays
    ids = np.empty(X.shape[:2], np.int64)
    return ids if arrays.one_hot_ids_cpu(ids.reshape(-1), X.reshape(-1, X.shape[2])) else None


def _nonzero(g):
    return g is not None and bool(g.any())


def _no_vmap(info, in_dims, *args):
    """torch.func.vmap of a fastbptt call (and jacrev, jacfwd, hessian, made of it): a clear error,
    not torch's advice to write a vmap rule for an internal class"""
    raise NotImplementedError("fastbptt.torch: torch.func.vmap, and jacrev, jacfwd and hessian, which run on it, "
                              "are not supported (one fastbptt call takes the whole batch already: give the "
                              "batch as B); use the torch.nn module with the same state_dict for them")


class _Function(torch.autograd.Function):
    """(output (T,B,H), h_n (L,B,H)[, c_n][, the top layer's c_1..c_T (T,B,H) with
    ``cfg.cell_states``]) = the stack on X (T,B,D) dense or (T,B) ids from (h0, c0) (None:
    zeros), one fastbptt call each way.  The forward and its context apart
    (``setup_context``), as torch.func's transforms (``torch.func.grad``) need."""
    vmap = staticmethod(_no_vmap)

    @staticmethod
    def forward(cfg, X, h0, c0, *weights):
        X = X.contiguous()
        place = cfg.place
        with place.running():
            P = _params(cfg, weights)
            Xn = place.array(X)
            if place is _HOST and X.is_floating_point() and not cfg.input_grad:   # no ∂L/∂X asked for
                ids = _one_hot_ids(Xn)
                Xn = Xn if ids is None else ids
            keep = cfg.grad or cfg.cell_states
            masks = None if cfg.masks is None else [place.array(m) for m in cfg.masks]
            Hs, last, *kept = api.rnn_forward(P, Xn, _state(cfg, h0, c0), activation=cfg.act, cell=cfg.cell,
                                              device=place.backend, keep=keep, return_state=True,
                                              check_finite=False,      # NaN and inf flow, as in torch.nn
                                              input_masks=masks)
            kept = kept[0] if keep else None
            B = X.shape[1]
            last = last if cfg.cell == "lstm" else (last,)
            # the arrays' reshapes: torch sees fresh tensors, not views (d2l's state.detach_() needs that)
            outs = (place.tensor(Hs),) + tuple(place.tensor(s.reshape(cfg.L, B, cfg.H)) for s in last)
            if cfg.cell_states:
                outs += (place.tensor(api.kept_cell_states(kept)),)
        cfg.kept = kept                              # P and X as the forward validated them
        return outs

    @staticmethod
    def setup_context(ctx, inputs, output):
        cfg, X, h0, c0, *weights = inputs
        ctx.set_materialize_grads(False)
        ctx.cfg, ctx.kept = cfg, cfg.kept             # (torch.func may set up more than one context)
        ctx.save_for_backward(X, h0, c0, *weights)   # torch refuses the backward if one changed since

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn=None, d_cs=None):
        X, h0, c0, *weights = ctx.saved_tensors
        # every weight goes in, so that autograd sees the gradients depend on each of them: a
        # second backward through any of them reaches _Gradients.backward and raises
        return (None,) + _Gradients.apply(ctx.cfg, ctx.kept, ctx.needs_input_grad, X, h0, c0,
                                          d_out, d_hn, d_cn, d_cs, *weights)


def _run(cfg, X, h0, c0, *weights):
    """_Function.apply, or where no gradient can be asked for (torch.no_grad(), or no tensor
    requiring one: inference, a generation loop) its forward alone, which keeps nothing for a
    backward and records no graph"""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (X, h0, c0, *weights)):
        return _Function.apply(cfg, X, h0, c0, *weights)
    cfg.grad = False
    return _Function.forward(cfg, X, h0, c0, *weights)


class _Gradients(torch.autograd.Function):
    """_Function's backward: (dX, dh0, dc0, *weight gradients) from the gradients of its outputs,
    one fastbptt backward from what the forward kept.  A Function of its own, so that torch.func's
    transforms (``torch.func.grad``) hand its numpy and numba calls plain tensors; it has no
    backward of its own (no double backward)."""
    vmap = staticmethod(_no_vmap)

    @staticmethod
    def forward(cfg, kept, needs, X, h0, c0, d_out, d_hn, d_cn, d_cs, *weights):
        like = weights[0]
        T, B = X.shape[:2]
        L, H = cfg.L, cfg.H
        want_dx = bool(needs[1]) and X.is_floating_point()
        place = cfg.place
        with place.running():
            zeros = lambda shape: place.array(like.new_zeros(shape))          # noqa: E731
            # the direct terms: d output[t]; d h_n (and d c_n) of every layer join them at t = T
            dHs = zeros((T, B, H)) if d_out is None else place.array(d_out)      # fastbptt copies it
            ends = (d_hn, d_cn) if cfg.cell == "lstm" else (d_hn,)
            dh_T = None
            if any(_nonzero(d) for d in ends):
                dh_T = tuple(zeros((L, B, H)) if d is None else place.array(d) for d in ends)
                dh_T = dh_T if cfg.cell == "lstm" else dh_T[0]
            dCs = None if d_cs is None else place.array(d_cs)
            want_d0 = (h0 is not None and bool(needs[2])) or (c0 is not None and bool(needs[3]))
            g = api.kept_backward(kept, dHs, activation=cfg.act, truncation=cfg.truncation,
                                  input_grad=want_dx, dh_T=dh_T, dCs=dCs, state_grads=want_d0,
                                  check_finite=False)

            t = place.tensor
            dX = t(g["X"]) if want_dx else None
            dh0 = t(g["h0"]) if h0 is not None and needs[2] else None
            dc0 = t(g["c0"]) if c0 is not None and needs[3] else None
            grads = []
            for l in range(L):
                db = t(g[_key("b_h", l)])
                layer = [place.weight_grad(g[_key("W_xh", l)]), place.weight_grad(g[_key("W_hh", l)])]
                if cfg.bias:
                    if cfg.cell == "gru":
                        dbhh = torch.cat([db[:2 * H], t(g[_key("b_hn", l)])])
                    else:
                        dbhh = db.clone()                       # its own tensor: .grad never aliases
                    layer += [db, dbhh]
                grads += layer
        grads = [gr if need else None for gr, need in zip(grads, needs[4:])]
        return (dX, dh0, dc0, *grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("fastbptt.torch: its gradients are not differentiable again (no double backward, "
                           "no create_graph=True through it)")


# Function.apply binds its arguments to forward's signature on every call (it has a setup_context):
# each forward carries its signature, made once, instead of inspect building it again per call
for _f in (_Function, _Gradients):
    _f.forward.__signature__ = inspect.signature(_f.forward)


def _check_truncation(truncation):
    if truncation is None or (isinstance(truncation, str) and truncation == "full"):
        return None
    if isinstance(truncation, (Truncated, Randomized)):
        return truncation
    raise TypeError(f"truncation: expected None, 'full', fastbptt.Truncated(k) or fastbptt.Randomized(p, seed), "
                    f"got {truncation!r}")


def _no_torchscript(name):
    return (f"fastbptt.torch.{name}: torch.export and TorchScript (torch.jit.script, torch.jit.trace, the ONNX "
            f"export) cannot hold fastbptt's kernels; load this module's state_dict into torch.nn.{name} to export it")


def _exporting():
    """whether torch.export is tracing the model (torch >= 2.3 says so)"""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def _gather_steps(x, index):
    """(N,B,...): step index[n, b] of x (T,B,...)'s sequence b at row n"""
    index = index.reshape(index.shape + (1,) * (x.dim() - 2)).expand(index.shape + x.shape[2:])
    return x.gather(0, index)


def _projected(cfg, x, s0, w, w_hr):
    """(output, h_n, c_n[, c_1..c_T]) of one LSTM layer with proj_size P, h_t = W_hr m_t,
    m_t = o ⊙ tanh(c_t): the plain LSTM on m, its recurrent weight W_hh W_hr (4H,H), so that its
    gates get m_{t-1} W_hrᵀ W_hhᵀ = h_{t-1} W_hhᵀ, torch projecting its output.  A given h_0
    (which no m_0 need give) joins step 1's input side as P more input columns, weight_hh
    their weight (the kernel's own m_0 is zero); under Randomized its gradient is scaled by
    ξ_1 there, as the state's crossing into step 1 is.

    Under truncation W_hr is used at step t to make h_t, which step t+1 reads: a loss term's
    window credits W_hr with the steps before the window's first, never with the state that
    window starts from.  Inside the fused weight it would be (that state's projection is the
    first step's input), so W_hr's recurrent gradient comes from a second call on the same
    values, whose other inputs are constants: Truncated(k) → Truncated(k-1) on the weight
    W_hh W_hr (the terms one step short of the window's start); Randomized → each step's
    crossing ξ_t applied to m_{t-1}, given as extra input columns whose weight is W_hh W_hr
    (valued zero, so the gates are the same).  Its outputs join the first call's at zero value
    (b − b.detach()), so that the output's gradient reaches both."""
    tr = cfg.truncation
    T = x.shape[0]
    xi = torch.as_tensor(tr.draw(T, np.float64)) if isinstance(tr, Randomized) else None    # ξ_1..ξ_T
    h0, c0 = s0
    if h0 is not None or xi is not None:             # the input takes more columns: dense
        x = x if x.is_floating_point() else torch.nn.functional.one_hot(x, w[0].shape[1]).to(w[0].dtype)
    if h0 is not None:
        if h0.requires_grad and torch.is_grad_enabled() and not cfg.input_grad:
            cfg = copy.copy(cfg)                     # ∂L/∂h_0 comes from the input's columns: the
            cfg.input_grad = True                    # call runs dense (h_0 = 0 leaves a one-hot x one-hot)
        if xi is not None:
            h0 = h0.detach() + float(xi[0]) * (h0 - h0.detach())
        x = torch.cat([x, torch.cat([h0, h0.new_zeros((T - 1,) + h0.shape[1:])], 0)], 2)
        w = [torch.cat([w[0], w[1]], 1)] + w[1:]
    s0 = [None, None] if c0 is None else [c0.new_zeros(c0.shape), c0]
    k = tr.k if isinstance(tr, Truncated) and tr.k < T else None
    if (k is None and xi is None) or not (torch.is_grad_enabled() and w_hr.requires_grad):
        return _projection(_run(cfg, x, *s0, w[0], w[1] @ w_hr, *w[2:]), w_hr)      # W_hr's gradient whole
    out = _run(cfg, x, *s0, w[0], w[1] @ w_hr.detach(), *w[2:])
    if k == 1:                                       # no window reaches a step before its own
        return _projection(out, w_hr)
    b_cfg = copy.copy(cfg)
    b_cfg.input_grad = False
    b_cfg.grad = True                                # a backward follows (the first call may have kept none)
    xb, h0b, c0b, w_ih, w_hh, *bias = (None if t is None else t.detach() for t in (x, *s0, *w))
    if k is not None:
        b_cfg.truncation = Truncated(k - 1)
        out_b = _run(b_cfg, xb, h0b, c0b, w_ih, w_hh @ w_hr, *bias)
    else:
        m = out[0].detach()
        m_prev = torch.cat([m.new_zeros((1,) + m.shape[1:]), m[:-1]], 0) * xi.to(m)[:, None, None]
        rec = w_hh @ w_hr
        out_b = _run(b_cfg, torch.cat([xb, m_prev], 2), h0b, c0b, torch.cat([w_ih, rec - rec.detach()], 1),
                     rec.detach(), *bias)
    return _projection(tuple(a + (b - b.detach()) for a, b in zip(out, out_b)), w_hr)


def _projection(out, w_hr):
    """the layer's (output, h_n, ...) of m (T,B,H), m_T: projected by W_hr, h = m W_hrᵀ"""
    return (out[0] @ w_hr.t(), out[1] @ w_hr.t()) + out[2:]


class _Bridge:
    """forward of torch.nn.RNN/GRU/LSTM by fastbptt; mixed in before the torch.nn class"""

    def __prepare_scriptable__(self):
        raise NotImplementedError(_no_torchscript(type(self).__name__))

    def _weight(self, name):
        """the weight ``name`` as this forward reads it: from torch.nn's own list of them, which
        forward refreshes as torch.nn's does (so a parametrized weight, spectral_norm's say, is
        computed as often as in torch.nn, and torch.func.functional_call's are seen)"""
        return self._flat_weights[self._flat_weights_names.index(name)]

    def _layer_weights(self, l, d=0):
        """layer l's parameters of direction d (1: the reverse one), in _Function's order"""
        sfx = "_reverse" if d else ""
        names = [f"weight_ih_l{l}{sfx}", f"weight_hh_l{l}{sfx}"]
        if self.bias:
            names += [f"bias_ih_l{l}{sfx}", f"bias_hh_l{l}{sfx}"]
        return [self._weight(n) for n in names]

    def _fastbptt_weights(self):
        return [w for l in range(self.num_layers) for d in range(1 + self.bidirectional)
                for w in self._layer_weights(l, d)]

    def _layer(self, x, s0, l, d, config, lengths):
        """(output, h_n[, c_n]) of layer l's direction d on its input x (T,B,·) from s0 = [h0, c0]
        (each (1,B,·) or None); with ``lengths``, the states at each sequence's own last step."""
        w = self._layer_weights(l, d)
        lstm = self.mode == "LSTM"
        cfg = config(x, cell_states=lstm and lengths is not None)
        if lstm and self.proj_size > 0:
            out = _projected(cfg, x, s0, w, self._weight(f"weight_hr_l{l}{'_reverse' if d else ''}"))
        else:
            out = _run(cfg, x, *s0, *w)
        if lengths is not None:                        # the states at each sequence's own last step
            last = (lengths - 1).to(x.device)[None]
            out = (out[0], _gather_steps(out[0], last)) + ((_gather_steps(out[3], last),) if lstm else ())
        return out

    def _by_layer(self, X, h0, c0, config, lengths=None):
        """(output, h_n[, c_n]) of the stack a layer and a direction at a time, torch joining
        them as torch.nn does: the reverse direction runs on its input reversed in time, a layer
        reads the directions of the one below concatenated, with dropout between layers in
        training mode.  config(x, cell_states=False): the _Config of one layer and direction on
        input x.  With ``lengths`` (sorted descending: a PackedSequence's), each sequence's output
        and last state are those of its own steps, reversed within them for the reverse direction:
        one call over all T steps each (a step past a sequence's end changes none of its earlier
        outputs, and none of those past it is read, nor gets a gradient), h_n read off the output
        at each sequence's last step, and the LSTM's c_n off its cell states there."""
        D = 1 + self.bidirectional
        states = []                              # per layer and direction: (h_n,) or (h_n, c_n), (1,B,H)
        if lengths is not None and D > 1:
            T, B = X.shape[:2]
            t = torch.arange(T).unsqueeze(1)
            rev = torch.where(t < lengths, lengths - 1 - t, t).to(X.device)   # (T,B): its own steps reversed
        x = X
        for l in range(self.num_layers):
            outs = []
            for d in range(D):
                i = l * D + d
                if d:
                    xd = x.flip(0) if lengths is None else _gather_steps(x, rev)
                else:
                    xd = x
                s0 = [None if s is None else s[i:i + 1] for s in (h0, c0)]
                out = self._layer(xd, s0, l, d, config, lengths)
                if d:
                    out = (out[0].flip(0) if lengths is None else _gather_steps(out[0], rev),) + tuple(out[1:])
                outs.append(out[0])
                states.append(out[1:])
            x = torch.cat(outs, 2) if D > 1 else outs[0]
            if self.training and self.dropout > 0 and l < self.num_layers - 1:
                if lengths is None:
                    x = torch.nn.functional.dropout(x, self.dropout, training=True)
                else:                            # on the packed steps alone, as torch.nn draws them
                    p = pack_padded_sequence(x, lengths)
                    data = torch.nn.functional.dropout(p.data, self.dropout, training=True)
                    x = pad_packed_sequence(PackedSequence(data, p.batch_sizes), total_length=x.shape[0])[0]
        return (x,) + tuple(torch.cat(s, 0) for s in zip(*states))

    def _empty_batch(self, X, h0, c0, dtype):
        """(output, h_n[, c_n]) of a batch of no sequences, as torch.nn gives them: empty, their
        gradients zeros for every parameter (and empty for the input and hx)"""
        given = [t for t in (X, h0, c0, *self.parameters()) if t is not None and t.is_floating_point()]
        zero = sum(t.sum() for t in given) * 0
        L, H = self.num_layers * (1 + self.bidirectional), self.hidden_size
        Hout = getattr(self, "proj_size", 0) or H
        shapes = [(X.shape[0], 0, (1 + self.bidirectional) * Hout), (L, 0, Hout)] + [(L, 0, H)] * (self.mode == "LSTM")
        return tuple(X.new_zeros(shape, dtype=dtype) + zero for shape in shapes)

    @_eager
    def forward(self, input, hx=None, *, truncation=None):
        name = type(self).__name__
        cell, act = _MODES[self.mode]
        lstm = cell == "lstm"
        if torch.jit.is_tracing() or _exporting():
            raise NotImplementedError(_no_torchscript(name))
        truncation = _check_truncation(truncation)
        proj_size = getattr(self, "proj_size", 0)   # the LSTM's h size when > 0 (RNN and GRU have none)
        proj = proj_size > 0
        packed, lengths = None, None
        if isinstance(input, PackedSequence):
            packed = input
            input, lengths = pad_packed_sequence(packed)               # (T,B,...) sorted as the caller's
            if packed.sorted_indices is not None:                      # ... and by length, as torch.nn runs them
                input = input.index_select(1, packed.sorted_indices)
                lengths = lengths[packed.sorted_indices.cpu()]
        batch_first = self.batch_first and packed is None
        self._update_flat_weights()                  # as torch.nn's forward does first (see _weight)
        weights = self._fastbptt_weights()
        place = _place([input, *self.parameters()] + ([] if hx is None else list(hx) if lstm else [hx]), name)
        wdt = weights[0].dtype
        if wdt not in _FLOATS:
            raise TypeError(f"fastbptt.torch.{name}: parameters must be float32 or float64, got {wdt}")
        other = next((w for w in weights if w.dtype != wdt), None)
        if other is not None:                        # torch.nn's matmul refuses them too
            raise TypeError(f"fastbptt.torch.{name}: parameters must all have one dtype, got {wdt} and "
                            f"{other.dtype}")
        ids = not input.is_floating_point()
        if ids and (input.is_complex() or input.dtype == torch.bool):
            raise TypeError(f"fastbptt.torch.{name}: input must be floating (dense) or integer token ids, "
                            f"got {input.dtype}")
        batched = input.dim() == (2 if ids else 3)
        if input.dim() not in ((1, 2) if ids else (2, 3)):
            what = "token ids to be 1-D or 2-D" if ids else "input to be 2-D or 3-D"
            raise ValueError(f"{name}: Expected {what}, got {input.dim()}-D instead")
        batch_dim = 0 if batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
        B = input.shape[batch_dim]
        expected = (self.num_layers * (1 + self.bidirectional), B, self.hidden_size)
        h0 = c0 = None
        if hx is not None:
            if lstm:
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise TypeError(f"{name}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
                h0, c0 = hx
            else:
                h0 = hx
            for s in (h0, c0) if lstm else (h0,):
                if s.dim() != (3 if batched else 2):
                    d = "batched 3-D" if batched else "unbatched 2-D"
                    raise RuntimeError(f"For {d} input, hx should also be {3 if batched else 2}-D but got "
                                       f"{s.dim()}-D tensor")
            if not batched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if lstm else None
            if packed is not None and packed.sorted_indices is not None:
                h0, c0 = (None if s is None else s.index_select(1, packed.sorted_indices) for s in (h0, c0))
        if packed is not None or ids:            # torch.nn's checks of a (T,B,D) input do not apply
            if packed is not None and not ids:
                self.check_input(packed.data, packed.batch_sizes)
            for s, size in ((h0, proj_size or self.hidden_size), (c0, self.hidden_size)):
                if s is not None:
                    self.check_hidden_size(s, expected[:2] + (size,))
        else:
            self.check_forward_args(input, (h0, c0) if lstm else h0, None) if hx is not None else \
                self.check_input(input, None)
        if torch._C._is_any_autocast_enabled():
            # torch.autocast (whose checks above let a lower-precision input through): computed in the
            # parameters' dtype, the outputs in it too, as an op on autocast's float32 list
            input = input.to(wdt) if input.is_floating_point() else input
            h0, c0 = (None if s is None else s.to(wdt) for s in (h0, c0))
        for s in (h0, c0):
            if s is not None and s.dtype != wdt:
                raise ValueError(f"{name}: hx dtype ({s.dtype}) does not match weight dtype ({wdt})")
        X = input.transpose(0, 1) if batch_first else input

        # a layer and a direction at a time, or the whole stack in one call each way (with dropout
        # between layers in training mode, its masks drawn by torch as torch.nn draws them)
        by_layer = packed is not None or self.bidirectional or proj
        masks = None
        if self.training and self.dropout > 0 and self.num_layers > 1 and not by_layer:
            ones = torch.ones((X.shape[0], B, self.hidden_size), dtype=wdt, device=X.device)
            masks = [torch.nn.functional.dropout(ones, self.dropout, training=True)
                     for _ in range(self.num_layers - 1)]
        if (by_layer and self.num_layers > 1 and isinstance(truncation, Truncated) and 1 < truncation.k < X.shape[0]
                and torch.is_grad_enabled()
                and any(t is not None and t.requires_grad for t in (input, h0, c0, *self.parameters()))):
            # a layer's call sees the gradient handed down from the one above as terms of its own,
            # whose windows would start again: the stack's own call counts each term's steps once
            why = [what for what, on in (("bidirectional=True", self.bidirectional), ("proj_size", proj),
                                         ("PackedSequence input", packed is not None)) if on]
            raise NotImplementedError(
                f"fastbptt.torch.{name}: truncation=Truncated({truncation.k}) with 1 < k < T on num_layers="
                f"{self.num_layers} with {' and '.join(why)}: the stack then runs a layer at a time, and a loss "
                f"term's window cannot be carried from one layer's call to the next (without those, the stack "
                f"is one call and takes any k; Randomized(p) takes any of them)")
        if by_layer and isinstance(truncation, Randomized) and not isinstance(truncation.seed, numbers.Integral):
            # one draw for the call: every layer's ξ_t the same, as the stack in one call has it
            truncation = Randomized(truncation.p, int(np.random.default_rng(truncation.seed).integers(1 << 62)))

        def config(x, L=1, cell_states=False):
            return _Config(cell, act, L, self.hidden_size, self.bias, truncation, place,
                           x.requires_grad and torch.is_grad_enabled(), cell_states, masks)
        if B == 0 and X.shape[0] > 0:           # torch.nn refuses T = 0 (and so does fastbptt.api)
            out = self._empty_batch(X, h0, c0, wdt)
        elif by_layer:
            out = self._by_layer(X, h0, c0, config, lengths)
        else:
            out = _run(config(X, self.num_layers), X, h0, c0, *weights)
        output, h_n = out[0], out[1:]
        if packed is not None:                   # the caller's packing, h_n in the caller's batch order
            output = PackedSequence(pack_padded_sequence(output, lengths).data, packed.batch_sizes,
                                    packed.sorted_indices, packed.unsorted_indices)
            if packed.unsorted_indices is not None:
                h_n = tuple(s.index_select(1, packed.unsorted_indices) for s in h_n)
        elif batch_first:
            output = output.transpose(0, 1).contiguous()
        if not batched:
            output = output.squeeze(batch_dim)
            h_n = tuple(s.squeeze(1) for s in h_n)
        return (output, h_n) if lstm else (output, h_n[0])


class RNN(_Bridge, torch.nn.RNN):
    """``torch.nn.RNN`` (nonlinearity 'tanh' or 'relu'), forward and backward by fastbptt;
    ``forward(input, hx=None, *, truncation=None)``.  See :mod:`fastbptt.torch`."""


class GRU(_Bridge, torch.nn.GRU):
    """``torch.nn.GRU``, forward and backward by fastbptt; ``forward(input, hx=None, *,
    truncation=None)``.  See :mod:`fastbptt.torch`."""


class LSTM(_Bridge, torch.nn.LSTM):
    """``torch.nn.LSTM``, forward and backward by fastbptt; ``forward(input, hx=None, *,
    truncation=None)`` returns ``(output, (h_n, c_n))``.  See :mod:`fastbptt.torch`."""
