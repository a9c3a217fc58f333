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

``truncation=`` (forward's only extra argument): None (exact BPTT), ``fastbptt.Truncated(k)``
or ``fastbptt.Randomized(p, seed)``.  The loss terms it counts steps from are what flows into
``output[t]``, and into ``h_n`` (and ``c_n``) of every layer at the last step.

Also beyond ``torch.nn``: integer token ids (T,B) (or (B,T) with ``batch_first``; (T,) unbatched)
as the input, with ``input_size`` the vocabulary: the same as ``one_hot(X, V).float()``
without building the one-hot.  A one-hot float input that needs no gradient (the book's
concise models) is found as such and runs as its ids: a row gather instead of the input
product, a scatter-add instead of ∂W_xh's product.

Not supported (each raises ``NotImplementedError`` naming it, never a wrong answer):
``bidirectional=True``, the LSTM's ``proj_size > 0``, inter-layer ``dropout > 0`` in training
mode (eval mode is fine: torch applies no dropout there either), ``PackedSequence`` input,
tensors not on the CPU, and double backward.  Parameters must be float32 or float64 (the compute dtype).
"""
from __future__ import annotations

try:
    import torch
except ImportError as e:                                   # pragma: no cover - exercised in a subprocess
    raise ImportError(f"fastbptt.torch needs PyTorch: pip install fastbptt[torch] ({e})") from e

import numpy as np
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import PackedSequence

from . import api
from ._model import key as _key
from .truncation import Randomized, Truncated

__all__ = ["RNN", "GRU", "LSTM"]

_MODES = {"RNN_TANH": ("rnn", "tanh"), "RNN_RELU": ("rnn", "relu"), "GRU": ("gru", "tanh"),
          "LSTM": ("lstm", "tanh")}
_FLOATS = (torch.float32, torch.float64)


class _Config:
    """what the Function needs besides tensors"""

    def __init__(self, cell, act, L, H, bias, truncation):
        self.cell, self.act, self.L, self.H, self.bias, self.truncation = cell, act, L, H, bias, truncation
        self.per_layer = 4 if bias else 2


def _np(t):
    """a CPU tensor as numpy, sharing its memory"""
    return t.detach().numpy()


def _transposed(w):
    """wᵀ (w C-contiguous 2-D) by the engine's vector transpose, into an array lent by the
    engine (``_Records.lend``): the weights a forward keeps for its backward (held by the
    step's graph) and the weight gradients handed to torch (``zero_grad()`` drops them each
    step) come back once collected, so a training loop writes the same pages every step
    (docs/performance.md, "fresh pages")"""
    from . import _cpu
    return _cpu.transposed(w, out=_cpu._records.lend(w.shape[::-1], w.dtype))


def _grad_tensor(g):
    """torch's gradient of a weight from fastbptt's g = ∂L/∂Wᵀ: gᵀ, C-contiguous (torch keeps
    a gradient only in its parameter's layout), in a lent array"""
    return torch.from_numpy(_transposed(g))


def _params(cfg, weights):
    """fastbptt's params (numpy) from torch's weights, made once per forward and kept for
    its backward: W_xh = weight_ihᵀ, W_hh = weight_hhᵀ (in lent arrays, back to the bridge once
    the step's graph is gone), b_h = bias_ih + bias_hh (the GRU: + [bias_hh_r, bias_hh_z, 0]
    and b_hn = bias_hh_n)"""
    H, G = cfg.H, api.CELLS[cfg.cell]
    P = {}
    for l in range(cfg.L):
        w = weights[l * cfg.per_layer:(l + 1) * cfg.per_layer]
        for name, wl in (("W_xh", w[0]), ("W_hh", w[1])):
            a = _np(wl)
            P[_key(name, l)] = _transposed(a) if a.flags.c_contiguous else a.T    # (the API copies a strided one)
        if cfg.bias:
            b_ih, b_hh = w[2].detach(), w[3].detach()
            if cfg.cell == "gru":
                b = b_ih.clone()
                b[:2 * H] += b_hh[:2 * H]
                P[_key("b_h", l)] = b.numpy()
                P[_key("b_hn", l)] = _np(b_hh[2 * H:])
            else:
                P[_key("b_h", l)] = (b_ih + b_hh).numpy()
        else:
            P[_key("b_h", l)] = np.zeros(G * H, _np(w[1]).dtype)
            if cfg.cell == "gru":
                P[_key("b_hn", l)] = np.zeros(H, _np(w[1]).dtype)
    return P


def _state(cfg, h0, c0):
    """the state as fastbptt takes it: None (zeros) or (L,B,H) arrays"""
    if h0 is None:
        return None
    return (_np(h0), _np(c0)) if cfg.cell == "lstm" else _np(h0)


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


class _Function(torch.autograd.Function):
    """(output (T,B,H), h_n (L,B,H)[, c_n]) = the stack on X (T,B,D) dense or (T,B) ids from
    (h0, c0) (None: zeros), one fastbptt call each way"""

    @staticmethod
    def forward(ctx, cfg, X, h0, c0, *weights):
        ctx.set_materialize_grads(False)
        X = X.contiguous()
        P = _params(cfg, weights)
        Xn = _np(X)
        if X.is_floating_point() and not ctx.needs_input_grad[1]:      # no ∂L/∂X asked for
            ids = _one_hot_ids(Xn)
            Xn = Xn if ids is None else ids
        Hs, last, kept = api.rnn_forward(P, Xn, _state(cfg, h0, c0), activation=cfg.act, cell=cfg.cell,
                                         keep=True)
        T, B = X.shape[:2]
        last = last if cfg.cell == "lstm" else (last,)
        # numpy reshapes: torch sees fresh tensors, not views (d2l's state.detach_() needs that)
        outs = (torch.from_numpy(Hs),) + tuple(torch.from_numpy(np.ascontiguousarray(s.reshape(cfg.L, B, cfg.H)))
                                               for s in last)
        ctx.cfg, ctx.kept = cfg, kept                # P and X as the forward validated them
        ctx.save_for_backward(X, h0, c0, *weights)   # torch refuses the backward if one changed since
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hn, d_cn=None):
        cfg = ctx.cfg
        X, h0, c0, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad                         # (cfg, X, h0, c0, *weights)
        T, B = X.shape[:2]
        L, H = cfg.L, cfg.H
        want_dx = bool(needs[1]) and X.is_floating_point()
        dtype = ctx.kept.m.dtype
        # the direct terms: d output[t]; d h_n (and d c_n) of every layer join them at t = T
        dHs = np.zeros((T, B, H), dtype) if d_out is None else _np(d_out)      # fastbptt copies it
        ends = (d_hn, d_cn) if cfg.cell == "lstm" else (d_hn,)
        dh_T = None
        if any(_nonzero(d) for d in ends):
            dh_T = tuple(np.zeros((L, B, H), dtype) if d is None else _np(d) for d in ends)
            dh_T = dh_T if cfg.cell == "lstm" else dh_T[0]
        g = api.kept_backward(ctx.kept, dHs, activation=cfg.act, truncation=cfg.truncation, input_grad=want_dx,
                              dh_T=dh_T)

        t = torch.from_numpy
        dX = t(g["X"]) if want_dx else None
        dh0 = t(g["h0"]) if h0 is not None and needs[2] else None
        dc0 = t(g["c0"]) if c0 is not None and needs[3] else None
        grads = []
        for l in range(L):
            db = t(g[_key("b_h", l)])
            layer = [_grad_tensor(g[_key("W_xh", l)]), _grad_tensor(g[_key("W_hh", l)])]
            if cfg.bias:
                if cfg.cell == "gru":
                    dbhh = torch.cat([db[:2 * H], t(g[_key("b_hn", l)])])
                else:
                    dbhh = db.clone()                       # its own tensor: .grad never aliases
                layer += [db, dbhh]
            grads += layer
        grads = [gr if need else None for gr, need in zip(grads, needs[4:])]
        return (None, dX, dh0, dc0, *grads)


def _check_truncation(truncation):
    if truncation is None or (isinstance(truncation, str) and truncation == "full"):
        return None
    if isinstance(truncation, (Truncated, Randomized)):
        return truncation
    raise TypeError(f"truncation: expected None, 'full', fastbptt.Truncated(k) or fastbptt.Randomized(p, seed), "
                    f"got {truncation!r}")


class _Bridge:
    """forward of torch.nn.RNN/GRU/LSTM by fastbptt; mixed in before the torch.nn class"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        if self.bidirectional:
            raise NotImplementedError(f"fastbptt.torch.{name}: bidirectional=True is not supported yet; "
                                      f"use torch.nn.{name}")
        if getattr(self, "proj_size", 0):
            raise NotImplementedError(f"fastbptt.torch.{name}: proj_size={self.proj_size} is not supported yet; "
                                      f"use torch.nn.{name}")

    def _fastbptt_weights(self):
        names = []
        for l in range(self.num_layers):
            names += [f"weight_ih_l{l}", f"weight_hh_l{l}"]
            if self.bias:
                names += [f"bias_ih_l{l}", f"bias_hh_l{l}"]
        return [getattr(self, n) for n in names]

    def forward(self, input, hx=None, *, truncation=None):
        name = type(self).__name__
        cell, act = _MODES[self.mode]
        lstm = cell == "lstm"
        if isinstance(input, PackedSequence):
            raise NotImplementedError(f"fastbptt.torch.{name}: PackedSequence input is not supported yet; pad it "
                                      f"(torch.nn.utils.rnn.pad_packed_sequence) or use torch.nn.{name}")
        truncation = _check_truncation(truncation)
        if self.dropout > 0 and self.num_layers > 1 and self.training:
            raise NotImplementedError(f"fastbptt.torch.{name}: dropout={self.dropout} between layers in training "
                                      f"mode is not supported yet; use dropout=0 (or eval mode)")
        weights = self._fastbptt_weights()
        tensors = [input, *weights] + ([] if hx is None else list(hx) if lstm else [hx])
        for a in tensors:
            if isinstance(a, torch.Tensor) and a.device.type != "cpu":
                raise NotImplementedError(f"fastbptt.torch.{name}: only CPU tensors are supported yet, got one on "
                                          f"{a.device}; use torch.nn.{name} there (or fastbptt's own API with "
                                          f"device='cuda')")
        wdt = weights[0].dtype
        if wdt not in _FLOATS:
            raise TypeError(f"fastbptt.torch.{name}: parameters must be float32 or float64, got {wdt}")
        ids = not input.is_floating_point()
        if ids and (input.is_complex() or input.dtype == torch.bool):
            raise TypeError(f"fastbptt.torch.{name}: input must be floating (dense) or integer token ids, "
                            f"got {input.dtype}")
        batched = input.dim() == (2 if ids else 3)
        if input.dim() not in ((1, 2) if ids else (2, 3)):
            what = "token ids to be 1-D or 2-D" if ids else "input to be 2-D or 3-D"
            raise ValueError(f"{name}: Expected {what}, got {input.dim()}-D instead")
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
        B = input.shape[batch_dim]
        expected = (self.num_layers, B, self.hidden_size)
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
        if ids:
            for s in (h0, c0) if lstm else (h0,):
                if s is not None:
                    self.check_hidden_size(s, expected)
        else:
            self.check_forward_args(input, (h0, c0) if lstm else h0, None) if hx is not None else \
                self.check_input(input, None)
        for s in (h0, c0):
            if s is not None and s.dtype != wdt:
                raise ValueError(f"{name}: hx dtype ({s.dtype}) does not match weight dtype ({wdt})")
        X = input.transpose(0, 1) if self.batch_first else input
        cfg = _Config(cell, act, self.num_layers, self.hidden_size, self.bias, truncation)
        out = _Function.apply(cfg, X, h0, c0, *weights)
        output, h_n = out[0], out[1:]
        if self.batch_first:
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
