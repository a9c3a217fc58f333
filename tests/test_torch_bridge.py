"""fastbptt.torch: RNN, GRU and LSTM as drop-ins for torch.nn's, checked against torch.nn with the
same state dict (outputs, states, every gradient), torch's gradcheck, step-by-step torch
references of Truncated(k) and Randomized(p), training with torch.optim, and the errors of what
is not supported."""
import itertools
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastbptt  # noqa: E402
import fastbptt.torch as ft  # noqa: E402

T, B, D, H = 5, 3, 4, 6
KINDS = {   # name: (bridge class, torch.nn class, extra constructor kwargs)
    "rnn": (ft.RNN, torch.nn.RNN, {}),
    "rnn-relu": (ft.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
    "gru": (ft.GRU, torch.nn.GRU, {}),
    "lstm": (ft.LSTM, torch.nn.LSTM, {}),
}
TOL = {torch.float64: dict(atol=1e-9, rtol=1e-9), torch.float32: dict(atol=1e-4, rtol=1e-4)}


def pair(kind, L=1, dtype=torch.float64, seed=0, input_size=D, hidden=H, **kw):
    """(bridge module, torch.nn module) with the same (random) parameters"""
    ours, theirs, extra = KINDS[kind]
    torch.manual_seed(seed)
    m = ours(input_size, hidden, L, dtype=dtype, **extra, **kw)
    r = theirs(input_size, hidden, L, dtype=dtype, **extra, **kw)
    r.load_state_dict(m.state_dict())
    return m, r


def is_lstm(m):
    return isinstance(m, torch.nn.LSTM)


def state(m, L, Bn=B, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(L, Bn, H, dtype=dtype, generator=g) * 0.5
    return (h, torch.randn(L, Bn, H, dtype=dtype, generator=g) * 0.5) if is_lstm(m) else h


def leaves(m, X, hx):
    """the tensors whose gradients are compared: the input, the state, every parameter"""
    hs = [] if hx is None else list(hx) if is_lstm(m) else [hx]
    return [X, *hs, *m.parameters()]


def run(m, X, hx, Wo, Wh, truncation=None, c_grad=False):
    """outputs and the gradients of  Σ output ⊙ Wo + Σ h_n ⊙ Wh  (Wo/Wh None: that term left out)
    w.r.t. the input, hx and every parameter"""
    X = X.detach().clone().requires_grad_(X.is_floating_point())
    if hx is not None:
        hx = tuple(s.detach().clone().requires_grad_() for s in hx) if is_lstm(m) else \
            hx.detach().clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    kw = {} if truncation is None else {"truncation": truncation}
    out, hn = m(X, hx, **kw)
    h_n = hn[0] if is_lstm(m) else hn
    loss = 0
    if Wo is not None:
        loss = loss + (out * Wo).sum()
    if Wh is not None:
        loss = loss + (h_n * Wh).sum()
    if c_grad:                                       # Σ c_n ⊙ (1 + Wh): another weight than h_n's
        loss = loss + (hn[1] * (1 + (0 if Wh is None else Wh))).sum()
    loss.backward()
    grads = [None if t.grad is None else t.grad.clone() for t in leaves(m, X, hx) if t.requires_grad]
    return out.detach(), tuple(s.detach() for s in hn) if is_lstm(m) else hn.detach(), grads


def assert_same(a, b, dtype):
    oa, ha, ga = a
    ob, hb, gb = b
    torch.testing.assert_close(oa, ob, **TOL[dtype])
    torch.testing.assert_close(ha, hb, **TOL[dtype])
    assert len(ga) == len(gb)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, **TOL[dtype])


def inputs(L, batch_first, dtype, m, with_hx, seed=2):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn((B, T, D) if batch_first else (T, B, D), dtype=dtype, generator=g)
    Wo = torch.randn(X.shape[:2] + (H,), dtype=dtype, generator=g)
    Wh = torch.randn(L, B, H, dtype=dtype, generator=g)
    return X, (state(m, L, dtype=dtype) if with_hx else None), Wo, Wh


# ------------------------------------------------------------- the same as torch.nn
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_same_as_torch_nn(kind, L, dtype):
    """outputs, states and every gradient (input, hx, parameters) equal torch.nn's, for
    batch_first, bias and hx each on and off; the loss reads output and h_n of every layer"""
    for batch_first, bias, with_hx in itertools.product((False, True), repeat=3):
        m, r = pair(kind, L, dtype, batch_first=batch_first, bias=bias)
        X, hx, Wo, Wh = inputs(L, batch_first, dtype, m, with_hx)
        assert_same(run(m, X, hx, Wo, Wh), run(r, X, hx, Wo, Wh), dtype)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_parameter_gradients_have_the_parameters_layout(kind):
    """the weights' gradients come back in the parameters' layout (fastbptt holds the
    transposes), so torch keeps them without a copy, and a second backward accumulates into them"""
    m, r = pair(kind, 2)
    X, hx, Wo, _ = inputs(2, False, torch.float64, m, True)
    layouts = []
    for name, p in m.named_parameters():
        p.register_hook(lambda g, p=p, name=name: layouts.append((name, g.stride() == p.stride())))
    for mod in (m, r):
        mod.zero_grad(set_to_none=True)
        for _ in range(2):
            out, _ = mod(X, hx)
            (out * Wo).sum().backward()
    assert len(layouts) == 2 * len(list(m.parameters())) and all(same for _, same in layouts), layouts
    for (name, p), q in zip(m.named_parameters(), r.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float64])


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("terms", ["output", "h_n", "output+h_n"])
def test_loss_terms(kind, L, terms):
    """output only (one fastbptt call each way), h_n only, both; and h_n of one lower layer only"""
    m, r = pair(kind, L)
    X, hx, Wo, Wh = inputs(L, False, torch.float64, m, True)
    Wo = Wo if "output" in terms else None
    Wh = Wh if "h_n" in terms else None
    assert_same(run(m, X, hx, Wo, Wh), run(r, X, hx, Wo, Wh), torch.float64)
    if L > 1:
        only = torch.zeros(L, B, H, dtype=torch.float64)
        only[1] = 1.0
        assert_same(run(m, X, hx, None, only), run(r, X, hx, None, only), torch.float64)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_unbatched_input(kind):
    m, r = pair(kind, 2)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(T, D, dtype=torch.float64, generator=g)
    hx = state(m, 2, 1)
    hx = tuple(s[:, 0] for s in hx) if is_lstm(m) else hx[:, 0]
    Wo, Wh = torch.randn(T, H, dtype=torch.float64), torch.randn(2, H, dtype=torch.float64)
    a, b = run(m, X, hx, Wo, Wh), run(r, X, hx, Wo, Wh)
    assert a[0].shape == (T, H)
    assert_same(a, b, torch.float64)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_token_ids_equal_one_hot(kind, batch_first):
    """integer ids (beyond torch.nn): the same as their one-hot as dense input"""
    V = 7
    m, _ = pair(kind, 2, input_size=V, batch_first=batch_first)
    ids = torch.randint(0, V, (B, T) if batch_first else (T, B), generator=torch.Generator().manual_seed(4))
    dense = torch.nn.functional.one_hot(ids, V).double()
    _, hx, Wo, Wh = inputs(2, batch_first, torch.float64, m, True)
    a, b = run(m, ids, hx, Wo, Wh), run(m, dense, hx, Wo, Wh)
    assert_same(a, (b[0], b[1], b[2][1:]), torch.float64)      # no gradient for the ids


def test_a_gradient_held_after_zero_grad_keeps_its_values():
    """the weight gradients' memory is taken again only once torch has let go of them: a
    .grad (or a view of it, or its numpy) held across zero_grad and the next backward keeps
    its values, and a fresh backward gives the same gradients again"""
    m, _ = pair("lstm", 2)
    X, hx, Wo, _ = inputs(2, False, torch.float64, m, True)

    def grads(scale):                                   # each scale its own gradients
        m.zero_grad(set_to_none=True)
        out, _ = m(X, hx)
        (out * Wo * scale).sum().backward()
        return {name: p.grad for name, p in m.named_parameters()}

    want = {scale: {name: g.clone() for name, g in grads(scale).items()} for scale in (1, 2)}
    first = grads(1)
    views = {name: g[1:] for name, g in first.items()}
    arrays = {name: g.numpy() for name, g in first.items()}
    for _ in range(3):
        again = grads(2)
        for name in first:
            assert again[name].data_ptr() != first[name].data_ptr(), name
            assert torch.equal(again[name], want[2][name]), name
    for name in first:
        assert torch.equal(first[name], want[1][name]) and torch.equal(views[name], want[1][name][1:]), name
        assert np.array_equal(arrays[name], want[1][name].numpy()), name
    del first, views, arrays, again
    import gc
    gc.collect()
    for scale in (1, 2, 1):                             # the memory given back serves again
        assert all(torch.equal(g, want[scale][name]) for name, g in grads(scale).items())


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_two_models_forward_then_backward_in_turn(kind):
    """each forward's weights stay its own until its backward (the lent transposes): two
    models of the same shapes, both forwards before either backward, each gives torch.nn's"""
    pairs = [pair(kind, 2, seed=s) for s in (0, 1)]
    X, hx, Wo, _ = inputs(2, False, torch.float64, pairs[0][0], True)
    losses = []
    for mods in zip(*pairs):                        # (ours, ours), then (torch.nn, torch.nn)
        for m in mods:
            m.zero_grad(set_to_none=True)
        losses.append([(m(X, hx)[0] * Wo).sum() for m in mods])
    for loss in losses[0][::-1] + losses[1]:
        loss.backward()
    for m, r in pairs:
        for (name, p), q in zip(m.named_parameters(), r.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float64], msg=name)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("which", ["none", "h", "c"])
def test_state_gradients_only_where_asked(kind, which):
    """a given hx that needs no gradient (d2l's detached state) gets none, and skipping it
    changes no other gradient; one of the LSTM's pair asked for still gets it"""
    ours, theirs = pair(kind, 2)
    X, hx, Wo, _ = inputs(2, False, torch.float64, ours, True)
    got = {}
    for name, m in (("ours", ours), ("theirs", theirs)):
        m.zero_grad(set_to_none=True)
        h = tuple(s.clone() for s in hx) if is_lstm(m) else (hx.clone(),)
        if which != "none" and (which == "h" or is_lstm(m)):
            h[0 if which == "h" else 1].requires_grad_()
        out, _ = m(X, h if is_lstm(m) else h[0])
        (out * Wo).sum().backward()
        got[name] = [s.grad for s in h] + [p.grad for p in m.parameters()]
    for a, b in zip(got["ours"], got["theirs"]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_lent_arrays_come_back_only_when_dropped_and_within_the_cap(monkeypatch):
    import gc
    from fastbptt import config
    monkeypatch.setattr(config, "CPU_SCRATCH_BYTES", 2000)
    from fastbptt._cpu import _Records
    lent = _Records()
    a, b, c = (lent.lend((10, 10), np.float64) for _ in range(3))       # 800 bytes each
    assert len({x.ctypes.data for x in (a, b, c)}) == 3
    held = a.ctypes.data
    del b, c
    gc.collect()
    assert sum(x.nbytes for sets in lent.free.values() for group in sets for x in group) == 1600     # both back
    d = lent.lend((10, 10), np.float64)
    assert d.ctypes.data != held                                        # a is still held
    e, f = lent.lend((10, 10), np.float64), lent.lend((10, 10), np.float64)
    del a, d, e, f
    gc.collect()
    assert sum(x.nbytes for sets in lent.free.values() for group in sets for x in group) <= 2000     # the cap


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_one_hot_input_runs_as_token_ids(kind, monkeypatch):
    """a one-hot float input that needs no gradient runs as its ids (what fastbptt is handed),
    with torch.nn's results; one that needs its gradient, or is not quite one-hot, runs dense"""
    import fastbptt.api
    V = 7
    m, r = pair(kind, 2, input_size=V)
    seen = []
    forward = fastbptt.api.rnn_forward
    monkeypatch.setattr(fastbptt.api, "rnn_forward",
                        lambda P, X, *a, **k: seen.append(X.ndim) or forward(P, X, *a, **k))
    ids = torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(5))
    one_hot = torch.nn.functional.one_hot(ids, V).double()
    _, hx, Wo, Wh = inputs(2, False, torch.float64, m, True)
    not_quite = [one_hot.clone() for _ in range(3)]
    not_quite[0][2, 1, 0] += 0.5                    # a row with two nonzeros
    not_quite[1][2, 1] = 0                          # a row of zeros
    not_quite[2][2, 1] *= 2                         # a row whose one nonzero is 2
    for X, want_ndim in [(one_hot, 2)] + [(x, 3) for x in not_quite]:
        seen.clear()
        with torch.no_grad():
            torch.testing.assert_close(m(X, hx)[0], r(X, hx)[0], **TOL[torch.float64])
        out, _ = m(X, hx)
        (out * Wo).sum().backward()                 # X needs no gradient here
        assert seen == [want_ndim, want_ndim]
        a, b = run(m, X, hx, Wo, Wh), run(r, X, hx, Wo, Wh)      # X needs its gradient: dense
        assert seen[-1] == 3
        assert_same(a, b, torch.float64)
        Xg = X.detach().clone()
        for mod in (m, r):
            mod.zero_grad(set_to_none=True)
            out, _ = mod(Xg, hx)
            (out * Wo).sum().backward()
        for p, q in zip(m.parameters(), r.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float64])


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_under_torch_compile(kind):
    """a model holding the bridge compiles (the bridge's forward runs eagerly, the rest is
    traced) and gives torch.nn's outputs and gradients"""
    m, r = pair(kind, 2)
    head = torch.nn.Linear(H, 3, dtype=torch.float64)
    X, hx, Wo, Wh = inputs(2, False, torch.float64, m, True)

    def loss(rnn, X, hx):
        out, _ = rnn(X, hx)
        return torch.tanh(head(out)).sum()
    compiled = torch.compile(loss, backend="eager")
    for rnn, fn in ((m, compiled), (r, loss)):
        rnn.zero_grad(set_to_none=True)
        fn(rnn, X, hx).backward()
    torch.testing.assert_close(compiled(m, X, hx), loss(r, X, hx), **TOL[torch.float64])
    for a, b in zip(m.parameters(), r.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float64])


@pytest.mark.parametrize("kind", list(KINDS))
def test_under_torch_func_grad(kind):
    """torch.func.grad of a loss through functional_call: every parameter's and the input's
    gradient equal torch.nn's; a second backward (create_graph) says it is not supported"""
    from torch.func import functional_call, grad
    m, r = pair(kind, 2)
    X = inputs(2, False, torch.float64, m, False)[0]
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(mod):
        return lambda p, x: torch.tanh(functional_call(mod, p, (x,))[0]).sum()
    for argnums in (0, 1):
        got, want = grad(loss(m), argnums)(params, X), grad(loss(r), argnums)(params, X)
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    X = X.clone().requires_grad_()
    gx, = torch.autograd.grad(torch.tanh(m(X)[0]).sum(), X, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_vmap_and_the_transforms_on_it_say_they_are_not_supported():
    from torch.func import jacrev, vmap
    m, _ = pair(list(KINDS)[0], 1)
    X = inputs(1, False, torch.float64, m, False)[0]
    for transform, arg in ((vmap, torch.stack([X, X])), (jacrev, X)):
        with pytest.raises(NotImplementedError, match="^fastbptt.torch: torch.func.vmap, and jacrev"):
            transform(lambda x: m(x)[0])(arg)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", ["weight_hh_l1", "bias_ih_l0", "bias_hh_l1"])
def test_a_second_backward_through_any_weight_raises(kind, name):
    """a gradient penalty on any one weight (the input and the other weights frozen) raises, as
    through the input: never a gradient whose own gradient is silently zero"""
    m, _ = pair(kind, 2)
    X = inputs(2, False, torch.float64, m, False)[0]
    for p in m.parameters():
        p.requires_grad_(False)
    w = getattr(m, name).requires_grad_()
    g, = torch.autograd.grad(m(X)[0].sum(), w, create_graph=True)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match="double backward"):
        g.pow(2).sum().backward()


def both_ways(kind, L, dtype=torch.float64, batch_first=False, bias=True, with_hx=True, seed=2):
    """(bridge, torch.nn) bidirectional, X, hx (2L layers of state) and the loss's weights"""
    m, r = pair(kind, L, dtype, batch_first=batch_first, bias=bias, bidirectional=True)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn((B, T, D) if batch_first else (T, B, D), dtype=dtype, generator=g)
    hx = None
    if with_hx:
        hs = [torch.randn(2 * L, B, H, dtype=dtype, generator=g) * 0.5 for _ in range(1 + is_lstm(m))]
        hx = tuple(hs) if is_lstm(m) else hs[0]
    Wo = torch.randn(X.shape[:2] + (2 * H,), dtype=dtype, generator=g)
    Wh = torch.randn(2 * L, B, H, dtype=dtype, generator=g)
    return m, r, X, hx, Wo, Wh


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_bidirectional_same_as_torch_nn(kind, L, dtype):
    """bidirectional=True: outputs (T,B,2H), states (2L,B,H) and every gradient equal torch.nn's,
    for batch_first, bias and hx each on and off; the loss reads output and h_n"""
    for batch_first, bias, with_hx in itertools.product((False, True), repeat=3):
        m, r, X, hx, Wo, Wh = both_ways(kind, L, dtype, batch_first, bias, with_hx)
        assert_same(run(m, X, hx, Wo, Wh), run(r, X, hx, Wo, Wh), dtype)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_bidirectional_ids_unbatched_and_truncation(kind):
    """bidirectional with token ids (equal to their one-hot), unbatched input and state, and
    Truncated(T) equal to full BPTT while Truncated(1) is not"""
    m, r, X, hx, Wo, Wh = both_ways(kind, 2)
    ids = torch.randint(0, D, (T, B), generator=torch.Generator().manual_seed(4))
    one_hot = torch.nn.functional.one_hot(ids, D).to(torch.float64)
    out, hn, grads = run(r, one_hot, hx, Wo, Wh)
    assert_same(run(m, ids, hx, Wo, Wh), (out, hn, grads[1:]), torch.float64)     # (no ids gradient)
    single = (lambda s: s[:, 0]) if kind != "lstm" else (lambda s: tuple(x[:, 0] for x in s))
    got, want = m(X[:, 0], single(hx)), r(X[:, 0], single(hx))
    torch.testing.assert_close(got[0], want[0], **TOL[torch.float64])
    full = run(m, X, hx, Wo, Wh)
    assert_same(run(m, X, hx, Wo, Wh, truncation=fastbptt.Truncated(T)), full, torch.float64)
    one = run(m, X, hx, Wo, Wh, truncation=fastbptt.Truncated(1))
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(one[2], full[2]))


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_dropout_between_layers_in_training(kind, bidirectional):
    """dropout between layers in training mode draws torch.nn's masks from the same seed, so the
    outputs and every gradient equal torch.nn's; no dropout after the last layer"""
    m, r = pair(kind, 3, dropout=0.4, bidirectional=bidirectional)
    X = torch.randn(T, B, D, dtype=torch.float64)
    results = []
    for mod in (m, r):
        torch.manual_seed(11)
        out, _ = mod(X)
        grads = torch.autograd.grad(torch.tanh(out).sum(), list(mod.parameters()))
        results.append((out, grads))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1, o2, **TOL[torch.float64])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    torch.manual_seed(12)
    assert not torch.allclose(m(X)[0], o1)                          # another seed, other masks


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_layer_by_layer_randomized_is_the_stacks(kind):
    """Randomized on the layer-by-layer path (a PackedSequence of equal lengths here) scales
    every layer's crossing at step t by the same ξ_t, as the stack in one call does"""
    m, _ = pair(kind, 3)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(T, B, D, dtype=torch.float64, generator=g)
    Wo = torch.randn(T, B, H, dtype=torch.float64, generator=g)

    def grads(packed, truncation):
        m.zero_grad(set_to_none=True)
        x = torch.nn.utils.rnn.pack_padded_sequence(X, [T] * B) if packed else X
        out, _ = m(x, truncation=truncation)
        out = torch.nn.utils.rnn.pad_packed_sequence(out)[0] if packed else out
        (out * Wo).sum().backward()
        return [p.grad.clone() for p in m.parameters()]

    tr = fastbptt.Randomized(0.5, seed=3)
    # a Generator (or None) is drawn from once per call, not once per layer
    drawn = int(np.random.default_rng(np.random.default_rng(8)).integers(1 << 62))
    pairs = [(grads(True, tr), grads(False, tr)),
             (grads(True, fastbptt.Randomized(0.5, seed=np.random.default_rng(8))),
              grads(False, fastbptt.Randomized(0.5, seed=drawn)))]
    for by_layer, one_call in pairs:
        for a, b in zip(by_layer, one_call):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
    assert any(not torch.allclose(a, b) for a, b in zip(pairs[0][1], grads(False, None)))


def masked_truncated_reference(m, X, Wo, k, masks):
    """Truncated(k) by definition for the stack m whose layer l > 0 reads masks[l-1] ⊙ h^{(l-1)}:
    torch.nn one-layer modules on m's own parameters (torch.func.functional_call), loss term t
    (output[t] ⊙ Wo[t]) from every layer's state at step t-k held constant; its gradients
    accumulate in m's parameters"""
    lstm, L = is_lstm(m), m.num_layers
    nn_class = next(c for c in type(m).__mro__ if c.__module__.startswith("torch.nn"))
    single = [nn_class(D if l == 0 else H, H, dtype=torch.float64) for l in range(L)]

    def stack(x, start, t0):
        """the top layer's outputs and every layer's last state over x from ``start`` at step t0"""
        last = []
        for l in range(L):
            p = {f"{n}_l0": getattr(m, f"{n}_l{l}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            x, s = torch.func.functional_call(single[l], p, (x, start[l]))
            last.append(s)
            if l < L - 1:
                x = x * masks[l][t0:t0 + x.shape[0]]
        return x, last

    zero = torch.zeros(1, B, H, dtype=torch.float64)
    states = [[(zero, zero) if lstm else zero] * L]              # every layer's state at steps 0..T
    with torch.no_grad():
        for t in range(T):
            states.append(stack(X[t:t + 1], states[t], t)[1])
    m.zero_grad(set_to_none=True)
    for t in range(1, T + 1):
        s0 = max(0, t - k)
        out, _ = stack(X[s0:t], states[s0], s0)
        (out[-1] * Wo[t - 1]).sum().backward()
    return [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_dropout_in_training_with_truncation(kind):
    """dropout between layers in training mode runs in the stack's one call with torch's masks:
    Truncated(k) counts each loss term's steps through every layer and the masks, equal to the
    definition on torch.nn layers with the same masks (drawn from the same seed)"""
    m, _ = pair(kind, 3, dropout=0.4)
    g = torch.Generator().manual_seed(4)
    X = torch.randn(T, B, D, dtype=torch.float64, generator=g)
    Wo = torch.randn(T, B, H, dtype=torch.float64, generator=g)
    for k in (2, 3):
        torch.manual_seed(9)
        got = run(m, X, None, Wo, None, truncation=fastbptt.Truncated(k))[2][1:]     # the parameters'
        torch.manual_seed(9)                                      # the masks, as torch.nn draws them
        masks = [torch.nn.functional.dropout(torch.ones(T, B, H, dtype=torch.float64), 0.4, training=True)
                 for _ in range(2)]
        want = masked_truncated_reference(m, X, Wo, k, masks)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **TOL[torch.float64])


def packed_run(m, X, lengths, hx, batch_first, enforce_sorted):
    """(padded output, h_n, c_n or None, every gradient, the output PackedSequence) of a loss on
    the packed output (position-weighted) and on h_n and c_n"""
    X = X.detach().clone().requires_grad_(X.is_floating_point())
    if hx is not None:
        hx = tuple(s.detach().clone().requires_grad_() for s in hx) if is_lstm(m) else \
            hx.detach().clone().requires_grad_()
    p = torch.nn.utils.rnn.pack_padded_sequence(X, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
    out, hn = m(p, hx)
    o, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=batch_first)
    h_n, c_n = hn if is_lstm(m) else (hn, None)
    w = torch.arange(o.numel(), dtype=o.dtype).reshape(o.shape) / o.numel()
    loss = (torch.tanh(o) * w).sum() + (h_n * 1.7).sum() + (0 if c_n is None else (c_n * 0.3).sum())
    leaves = [t for t in leaves_of(m, X, hx) if t.requires_grad]
    return o, h_n, c_n, torch.autograd.grad(loss, leaves), out


def leaves_of(m, X, hx):
    return [X] + ([] if hx is None else list(hx) if is_lstm(m) else [hx]) + list(m.parameters())


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequence_same_as_torch_nn(kind, L, bidirectional):
    """PackedSequence input, sorted or not, batch_first or not, with and without hx: the packed
    output (its batch_sizes and indices), h_n (c_n) at each sequence's own last step, and
    every gradient equal torch.nn's"""
    m, r = pair(kind, L, bidirectional=bidirectional)
    n = L * (1 + bidirectional)
    for batch_first, with_hx, enforce_sorted in itertools.product((False, True), repeat=3):
        lengths = [5, 5, 3, 2] if enforce_sorted else [3, 5, 2, 5]
        g = torch.Generator().manual_seed(7)
        X = torch.randn((4, 5, D) if batch_first else (5, 4, D), dtype=torch.float64, generator=g)
        hx = None
        if with_hx:
            hs = [torch.randn(n, 4, H, dtype=torch.float64, generator=g) for _ in range(1 + is_lstm(m))]
            hx = tuple(hs) if is_lstm(m) else hs[0]
        got, want = (packed_run(mod, X, lengths, hx, batch_first, enforce_sorted) for mod in (m, r))
        for a, b in zip(got[:3], want[:3]):
            if b is not None:
                torch.testing.assert_close(a, b, **TOL[torch.float64])
        assert len(got[3]) == len(want[3])
        for a, b in zip(got[3], want[3]):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
        po, pw = got[4], want[4]
        assert torch.equal(po.batch_sizes, pw.batch_sizes)
        for a, b in ((po.sorted_indices, pw.sorted_indices), (po.unsorted_indices, pw.unsorted_indices)):
            assert (a is None and b is None) or torch.equal(a, b)


def per_sequence_sum(m, X, lengths, truncation):
    """(outputs, h_n, c_n or None, every gradient) of Σ_b loss_b over the packed batch, and the
    same from each sequence run alone (T = its length, B = 1): a loss on the output
    (position-weighted), h_n and c_n"""
    w = torch.arange(X.shape[0] * X.shape[1], dtype=X.dtype).reshape(X.shape[:2]).unsqueeze(-1) / 10

    def loss(o, hn, wo):
        h_n, c_n = hn if is_lstm(m) else (hn, None)
        return (torch.tanh(o) * wo).sum() + (h_n * 1.7).sum() + (0 if c_n is None else (c_n * 0.3).sum())

    def grads(total, Xs):
        return torch.autograd.grad(total, [*Xs, *m.parameters()])

    Xp = X.detach().clone().requires_grad_()
    out, hn = m(torch.nn.utils.rnn.pack_padded_sequence(Xp, lengths, enforce_sorted=False), truncation=truncation)
    o, _ = torch.nn.utils.rnn.pad_packed_sequence(out)
    packed = (o.detach(), *(s.detach() for s in (hn if is_lstm(m) else (hn,))))
    packed_grads = grads(loss(o, hn, w[:o.shape[0]]), [Xp])
    Xs = [X[:n, b:b + 1].detach().clone().requires_grad_() for b, n in enumerate(lengths)]
    alone = [m(x, truncation=truncation) for x in Xs]
    total = sum(loss(a[0], a[1], w[:n, b:b + 1]) for b, (a, n) in enumerate(zip(alone, lengths)))
    g = grads(total, Xs)
    dX = torch.zeros_like(X)
    for b, n in enumerate(lengths):
        dX[:n, b:b + 1] = g[b]
    one = torch.zeros_like(o)
    for b, (a, n) in enumerate(zip(alone, lengths)):
        one[:n, b:b + 1] = a[0].detach()
    states = [torch.cat([(a[1] if not is_lstm(m) else a[1][i]).detach() for a in alone], 1)
              for i in range(1 + is_lstm(m))]
    return packed + tuple(packed_grads), (one, *states, dX, *g[len(lengths):])


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("truncation", [fastbptt.Truncated(1), fastbptt.Truncated(2), fastbptt.Randomized(0.5, 5)],
                         ids=str)
def test_packed_sequence_truncation_counts_each_sequence_alone(kind, bidirectional, truncation):
    """truncation= on a PackedSequence: each sequence's outputs, last states and gradients are
    those of the sequence run alone with the same truncation, its terms counted within its own
    steps (h_n's and c_n's joining its last step's term)"""
    m, _ = pair(kind, 1, bidirectional=bidirectional)
    X = torch.randn(5, 4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got, want = per_sequence_sum(m, X, [3, 5, 2, 5], truncation)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    full, _ = per_sequence_sum(m, X, [3, 5, 2, 5], None)
    assert not torch.allclose(got[-1], full[-1]) or isinstance(truncation, fastbptt.Randomized)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_packed_sequence_ids_and_dropout(kind):
    """packed token ids equal their packed one-hot; dropout between layers in training mode on
    packed input draws torch.nn's masks from the same seed"""
    m, r = pair(kind, 1, input_size=5)
    ids = torch.randint(0, 5, (5, 3), generator=torch.Generator().manual_seed(1))
    lengths = [5, 2, 4]
    pack = torch.nn.utils.rnn.pack_padded_sequence
    got = m(pack(ids, lengths, enforce_sorted=False))
    want = r(pack(torch.nn.functional.one_hot(ids, 5).to(torch.float64), lengths, enforce_sorted=False))
    torch.testing.assert_close(got[0].data, want[0].data, **TOL[torch.float64])
    m, r = pair(kind, 3, dropout=0.4, bidirectional=True)
    X = torch.randn(5, 3, D, dtype=torch.float64)
    outs = []
    for mod in (m, r):
        torch.manual_seed(3)
        outs.append(mod(pack(X, lengths, enforce_sorted=False))[0].data)
    torch.testing.assert_close(outs[0], outs[1], **TOL[torch.float64])


@pytest.mark.parametrize("layout", ["bidirectional", "packed", "proj_size"])
def test_truncation_in_a_stack_run_a_layer_at_a_time_is_refused(layout):
    """Truncated(k), 1 < k < T, where a gradient is asked of a stack that runs a layer at a time:
    NotImplementedError naming the cause (each layer's call would count the terms handed down to
    it afresh, a wrong gradient); the forward alone, k = 1, k >= T, Randomized and one layer
    all run"""
    kw = {"bidirectional": {"bidirectional": True}, "proj_size": {"proj_size": P}}.get(layout, {})
    m, _ = pair("lstm", 2, **kw)
    X = torch.randn(T, B, D, dtype=torch.float64)
    Xp = torch.nn.utils.rnn.pack_padded_sequence(X, [T, 2, 3], enforce_sorted=False) if layout == "packed" else X
    cause = {"bidirectional": "bidirectional", "packed": "PackedSequence", "proj_size": "proj_size"}[layout]
    with pytest.raises(NotImplementedError, match=f"Truncated\\(2\\).*{cause}"):
        m(Xp, truncation=fastbptt.Truncated(2))
    with torch.no_grad():
        m(Xp, truncation=fastbptt.Truncated(2))
    for tr in (fastbptt.Truncated(1), fastbptt.Truncated(T), fastbptt.Randomized(0.5, 1)):
        m(Xp, truncation=tr)
    one, _ = pair("lstm", 1, **kw)
    one(Xp, truncation=fastbptt.Truncated(2))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("L,kw", [(1, {}), (2, {"bidirectional": True}), (1, {"batch_first": True})], ids=str)
def test_an_empty_batch_is_torch_nns(kind, L, kw):
    """B = 0: outputs and states shaped as torch.nn's, empty; zero gradients for every parameter"""
    m, r = pair(kind, L, **kw)
    X = torch.randn((0, T, D) if kw.get("batch_first") else (T, 0, D), dtype=torch.float64, requires_grad=True)
    got, want = m(X), r(X)
    flat = [torch.utils._pytree.tree_flatten(x)[0] for x in (got, want)]
    assert [t.shape for t in flat[0]] == [t.shape for t in flat[1]]
    sum(t.sum() for t in flat[0]).backward()
    assert X.grad.shape == X.shape
    for p in m.parameters():
        assert p.grad is not None and not p.grad.any()


def test_no_grad_and_eval_dropout():
    m, r = pair("lstm", 2, dropout=0.5)
    m.eval(), r.eval()
    X = torch.randn(T, B, D, dtype=torch.float64)
    with torch.no_grad():
        (o, (h, c)), (o2, (h2, c2)) = m(X), r(X)
    assert not o.requires_grad
    for x, y in ((o, o2), (h, h2), (c, c2)):
        torch.testing.assert_close(x, y, **TOL[torch.float64])


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("how", ["no_grad", "inference_mode", "frozen"])
@pytest.mark.parametrize("layout", ["stack", "bidirectional", "packed"])
def test_inference_keeps_nothing_for_a_backward(kind, how, layout, monkeypatch):
    # where no gradient can be asked for, the forward keeps no gates (keep=False) and records no
    # graph; its outputs are torch.nn's, hx given or not
    kept = []
    forward = fastbptt.api.rnn_forward
    monkeypatch.setattr(fastbptt.api, "rnn_forward", lambda *a, **k: kept.append(k["keep"]) or forward(*a, **k))
    m, r = pair(kind, 2, bidirectional=layout == "bidirectional")
    lengths = torch.tensor([T, 2, 3])
    X = torch.randn(T, B, D, dtype=torch.float64)
    Xp = torch.nn.utils.rnn.pack_padded_sequence(X, lengths, enforce_sorted=False) if layout == "packed" else X
    for hx in (None, state(r, 2 * (1 + (layout == "bidirectional")))):
        kept.clear()
        if how == "frozen":
            m.requires_grad_(False)
            got = m(Xp, hx)
        else:
            with getattr(torch, how)():
                got = m(Xp, hx)
        want = r(Xp, hx)
        flat = lambda o: [o[0].data if layout == "packed" else o[0]] + list(    # noqa: E731
            o[1] if is_lstm(m) else (o[1],))
        for x, y in zip(flat(got), flat(want)):
            assert x.grad_fn is None and not x.requires_grad
            torch.testing.assert_close(x, y.detach(), **TOL[torch.float64])
        # only the packed LSTM keeps its forward: its cell states, for each sequence's c_n
        assert kept and all(k == (layout == "packed" and is_lstm(m)) for k in kept)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("where", ["input-nan", "input-inf", "grad-nan", "grad-inf", "weight-nan"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "zeros"])
def test_nan_and_inf_flow_as_in_torch_nn(kind, where, dtype, with_hx):
    # torch.nn passes them on (AMP's GradScaler finds an overflowed step by the infs in its
    # gradients): with hx, every output and gradient is non-finite exactly where torch.nn's is,
    # the rest equal.  From zeros, the engine skips the products with h_0 = 0 that give torch.nn
    # 0 · NaN = NaN: a non-finite value only where torch.nn has one, and somewhere whenever it has.
    m, r = pair(kind, 2, dtype)
    X = torch.randn(T, B, D, dtype=dtype)
    hx = state(r, 2, dtype=dtype) if with_hx else None
    if where.startswith("input"):
        X[2, 1, 3] = float(where[6:])
    got = []
    for mod in (m, r):
        if where == "weight-nan":
            with torch.no_grad():
                mod.weight_hh_l0[3, 2] = float("nan")
        x = X.clone().requires_grad_()
        out, _ = mod(x, hx)
        g = torch.ones_like(out)
        if where.startswith("grad"):
            g[3, 2, 1] = float(where[5:])
        out.backward(g)
        got.append([out, x.grad] + [p.grad for p in mod.parameters()])
    assert all(torch.isfinite(a).all() for a in got[0]) == all(torch.isfinite(b).all() for b in got[1])
    for a, b in zip(*got):
        ok, mine = torch.isfinite(b), torch.isfinite(a)
        if with_hx:
            assert torch.equal(mine, ok)
            torch.testing.assert_close(a[ok], b[ok], **TOL[dtype])
        else:
            assert (mine | ~ok).all()


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("how", ["spectral_norm", "weight_norm"])
def test_parametrized_weights_as_in_torch_nn(kind, how):
    # a parametrization (spectral_norm advances its power iteration each time the weight is read,
    # in training mode) is read as often as torch.nn reads it: outputs and gradients equal, step
    # after step
    from torch.nn.utils import parametrizations
    m, r = pair(kind, 2)
    for mod in (m, r):
        getattr(parametrizations, how)(mod, "weight_hh_l0")
    m.load_state_dict(r.state_dict())
    X, hx, Wo, Wh = inputs(2, False, torch.float64, r, True)
    for _ in range(3):
        got, want = run(m, X, hx, Wo, Wh), run(r, X, hx, Wo, Wh)
        assert_same(got, want, torch.float64)


@pytest.mark.parametrize("L", [1, 3])
def test_c_n_gradients(L):
    """a loss reading c_n of every layer (with and without output and h_n): every gradient
    equals torch.nn.LSTM's; c_n unused or detached: fine"""
    m, r = pair("lstm", L)
    X, hx, Wo, Wh = inputs(L, False, torch.float64, m, True)
    for Wo_, Wh_ in ((Wo, Wh), (None, None), (None, Wh)):
        assert_same(run(m, X, hx, Wo_, Wh_, c_grad=True), run(r, X, hx, Wo_, Wh_, c_grad=True), torch.float64)
    assert_same(run(m, X, hx, Wo, Wh), run(r, X, hx, Wo, Wh), torch.float64)
    out, (h, c) = m(X)
    (out.sum() + 0 * c.sum()).backward()


# --------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("kind", list(KINDS))
def test_gradcheck(kind):
    m, _ = pair(kind, 2, input_size=2, hidden=2)
    names = [n for n, _ in m.named_parameters()]
    X = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    lstm = kind == "lstm"

    def f(X, h0, c0, *ws):
        out, hn = torch.func.functional_call(m, dict(zip(names, ws)), (X, (h0, c0) if lstm else h0))
        return (out, *hn) if lstm else (out, hn)         # gradcheck takes tensors, not pairs

    assert torch.autograd.gradcheck(f, (X, h0, c0, *[p.detach().clone().requires_grad_() for p in m.parameters()]))


# -------------------------------------------------------------------- truncation
def per_step_states(r, X, hx):
    """every layer's state after each step, S[0] = hx: torch.nn one step at a time"""
    S, s = [hx], hx
    for t in range(X.shape[0]):
        _, s = r(X[t:t + 1], s)
        S.append(s)
    return S


def c_term(hn, Wh, c_grad):
    """run()'s c_n term of the loss"""
    return (hn[1] * (1 + Wh)).sum() if c_grad else 0


def truncated_reference(r, X, hx, Wo, Wh, k, c_grad=False):
    """Truncated(k) by definition: loss term t (output[t], and h_n, c_n at t = T) reaches the states,
    parameters and inputs of steps t-k+1..t only, in every layer: each term's gradient is that of
    a forward over its window from the states at step t-k held constant (from hx itself at 0)"""
    X = X.detach().clone().requires_grad_()
    lstm = is_lstm(r)
    hx = tuple(s.detach().clone().requires_grad_() for s in hx) if lstm else hx.detach().clone().requires_grad_()
    r.zero_grad(set_to_none=True)
    with torch.no_grad():
        S = per_step_states(r, X, hx)
    n = X.shape[0]
    for t in range(1, n + 1):
        s0 = max(0, t - k)
        start = hx if s0 == 0 else S[s0]
        out, hn = r(X[s0:t], start)
        term = (out[-1] * Wo[t - 1]).sum()
        if t == n:
            term = term + ((hn[0] if lstm else hn) * Wh).sum() + c_term(hn, Wh, c_grad)
        term.backward()
    return [t.grad.clone() for t in leaves(r, X, hx)]


def randomized_reference(r, X, hx, Wo, Wh, xi, c_grad=False):
    """Randomized by definition: the adjoint crossing from step t to t-1 (h, and c) is scaled by
    ξ_t: torch.nn one step at a time, each step's incoming state's gradient scaled"""
    X = X.detach().clone().requires_grad_()
    lstm = is_lstm(r)
    hx = tuple(s.detach().clone().requires_grad_() for s in hx) if lstm else hx.detach().clone().requires_grad_()
    r.zero_grad(set_to_none=True)

    def scaled(s, x):
        return s.detach() + x * (s - s.detach())

    s, loss = hx, 0
    for t in range(X.shape[0]):
        s = tuple(scaled(a, xi[t]) for a in s) if lstm else scaled(s, xi[t])
        out, s = r(X[t:t + 1], s)
        loss = loss + (out[0] * Wo[t]).sum()
    loss = loss + ((s[0] if lstm else s) * Wh).sum() + c_term(s, Wh, c_grad)
    loss.backward()
    return [t.grad.clone() for t in leaves(r, X, hx)]


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("L", [1, 2])
def test_truncation(kind, L):
    """Truncated(k >= T) and Randomized(1) are the full gradient, Truncated(1) is not; Truncated(2)
    and Randomized(0.5) equal their step-by-step torch references, h_n of every layer included"""
    m, r = pair(kind, L)
    X, hx, Wo, Wh = inputs(L, False, torch.float64, m, True)
    full = run(m, X, hx, Wo, Wh)
    for same in (fastbptt.Truncated(T), fastbptt.Truncated(T + 3), fastbptt.Randomized(1.0, seed=5), "full"):
        assert_same(run(m, X, hx, Wo, Wh, truncation=same), full, torch.float64)
    one = run(m, X, hx, Wo, Wh, truncation=fastbptt.Truncated(1))
    torch.testing.assert_close(one[0], full[0])                  # the forward is the same
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(one[2], full[2]))
    tr = fastbptt.Randomized(0.5, seed=3)
    xi = torch.from_numpy(tr.draw(T, np.float64))
    assert 0 < (xi == 0).sum() < T                                # a draw with both kinds of step
    for c_grad in (False, True) if kind == "lstm" else (False,):  # c_n of every layer in the loss
        for k in (1, 2):
            got = run(m, X, hx, Wo, Wh, truncation=fastbptt.Truncated(k), c_grad=c_grad)[2]
            for a, b in zip(got, truncated_reference(r, X, hx, Wo, Wh, k, c_grad)):
                torch.testing.assert_close(a, b, **TOL[torch.float64])
        got = run(m, X, hx, Wo, Wh, truncation=tr, c_grad=c_grad)[2]
        for a, b in zip(got, randomized_reference(r, X, hx, Wo, Wh, xi, c_grad)):
            torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_under_autocast(kind):
    """under torch.autocast (CPU, bfloat16) a bfloat16 input runs in the parameters' dtype: float32
    outputs equal to torch.nn's on the same values, and the input's gradient (bfloat16) equal
    to torch.nn's; packed input too.  Outside autocast the dtypes must match, as in torch.nn"""
    m, r = pair(kind, 2, torch.float32)
    X = torch.randn(T, B, D, generator=torch.Generator().manual_seed(4)).bfloat16()
    grads = []
    for mod, auto in ((m, True), (r, False)):
        Xi = X.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=auto):
            out, _ = mod(Xi if auto else Xi.float())
        assert out.dtype == torch.float32
        (torch.tanh(out) * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
        grads.append((out.detach(), Xi.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], **TOL[torch.float32])
    assert grads[0][1].dtype == torch.bfloat16
    torch.testing.assert_close(grads[0][1], grads[1][1])
    packed = torch.nn.utils.rnn.pack_padded_sequence(X, [T, T - 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(packed)[0].data
    want = r(torch.nn.utils.rnn.pack_padded_sequence(X.float(), [T, T - 1, 2]))[0].data
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    for mod in (m, r):
        with pytest.raises(ValueError, match="dtype"):
            mod(X)


# ------------------------------------------------------------------- proj_size
P = 4                                                             # the LSTM's proj_size (< H)


def projected(L, dtype=torch.float64, bidirectional=False, batch_first=False, bias=True, with_hx=True, seed=2):
    """(bridge, torch.nn) LSTMs with proj_size P and the same weights, X, hx ((h0 (n,B,P), c0
    (n,B,H)) or None) and the loss weights Wo, Wh of run()"""
    m, r = pair("lstm", L, dtype, proj_size=P, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    n = L * (1 + bidirectional)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn((B, T, D) if batch_first else (T, B, D), dtype=dtype, generator=g)
    hx = (torch.randn(n, B, P, dtype=dtype, generator=g), torch.randn(n, B, H, dtype=dtype, generator=g)) \
        if with_hx else None
    Wo = torch.randn(X.shape[:2] + (P * (1 + bidirectional),), dtype=dtype, generator=g)
    return m, r, X, hx, Wo, torch.randn(n, B, P, dtype=dtype, generator=g)


def proj_run(m, X, hx, Wo, Wh, truncation=None):
    """run(), the loss reading c_n of every layer too (a weight of its own: c_n is (n,B,H))"""
    out = run(m, X, hx, Wo, Wh, truncation)
    X = X.detach().clone()
    hx = None if hx is None else tuple(s.detach().clone().requires_grad_() for s in hx)
    m.zero_grad(set_to_none=True)
    kw = {} if truncation is None else {"truncation": truncation}
    _, (_, c_n) = m(X, hx, **kw)
    (c_n * torch.linspace(-1, 1, c_n.numel(), dtype=c_n.dtype).reshape(c_n.shape)).sum().backward()
    return out + (c_n.detach(), [p.grad.clone() for p in m.parameters()])


@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_proj_size_same_as_torch_nn(L, bidirectional, dtype):
    """LSTM(proj_size=P): outputs (T,B,P), h_n (n,B,P), c_n (n,B,H) and every gradient
    (input, hx, every parameter, weight_hr included) equal torch.nn's, for batch_first, bias
    and hx each on and off"""
    for batch_first, bias, with_hx in itertools.product((False, True), repeat=3):
        m, r, X, hx, Wo, Wh = projected(L, dtype, bidirectional, batch_first, bias, with_hx)
        got, want = proj_run(m, X, hx, Wo, Wh), proj_run(r, X, hx, Wo, Wh)
        assert got[0].shape[-1] == P * (1 + bidirectional)
        assert_same(got[:3], want[:3], dtype)
        for a, b in zip(got[3:], want[3:]):
            for x, y in zip(*((a, b) if isinstance(a, list) else ([a], [b]))):
                torch.testing.assert_close(x, y, **TOL[dtype])


@pytest.mark.parametrize("truncation", [None, fastbptt.Truncated(2), fastbptt.Randomized(0.5, seed=1)],
                         ids=["full", "k2", "rand"])
def test_proj_size_one_hot_input_and_a_zero_h0_that_needs_its_gradient(truncation):
    """a one-hot X that needs no gradient, with h_0 = 0 that does: proj_size puts h_0 in the
    input's columns, still one-hot, and ∂L/∂h_0 comes from the input's gradient (the call
    runs dense, not as ids)"""
    m, r = pair("lstm", 1, proj_size=P, input_size=5)
    X = torch.nn.functional.one_hot(torch.randint(0, 5, (T, B), generator=torch.Generator().manual_seed(4)),
                                    5).double()
    got = []
    for mod in (m, r):
        hx = (torch.zeros(1, B, P, dtype=torch.float64, requires_grad=True),
              torch.zeros(1, B, H, dtype=torch.float64, requires_grad=True))
        kw = {} if mod is r or truncation is None else {"truncation": truncation}
        out, _ = mod(X, hx, **kw)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        got.append((hx[0].grad, hx[1].grad))
    if truncation is None:
        for a, b in zip(*got):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
        # and under torch.func.grad, where the Function's forward cannot see what needs a gradient
        from torch.func import functional_call, grad
        c0 = torch.zeros(1, B, H, dtype=torch.float64)
        by_func = [grad(lambda h, mod=mod: functional_call(mod, dict(mod.named_parameters()), (X, (h, c0)))[0]
                        .tanh().sum())(torch.zeros(1, B, P, dtype=torch.float64)) for mod in (m, r)]
        torch.testing.assert_close(by_func[0], by_func[1], **TOL[torch.float64])
    assert all(g is not None and torch.isfinite(g).all() for g in got[0])


def test_proj_size_packed_and_token_ids():
    """proj_size with PackedSequence input (both directions, two layers, with hx) and with
    token ids equal torch.nn's"""
    m, r = pair("lstm", 2, proj_size=P, bidirectional=True)
    X = torch.randn(5, 4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hx = (torch.randn(4, 4, P, dtype=torch.float64), torch.randn(4, 4, H, dtype=torch.float64))
    got, want = (packed_run(mod, X, [3, 5, 2, 5], hx, False, False) for mod in (m, r))
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    for a, b in zip(got[3], want[3]):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    m, r = pair("lstm", 1, proj_size=P, input_size=5)
    ids = torch.randint(0, 5, (T, B), generator=torch.Generator().manual_seed(1))
    hx = (torch.randn(1, B, P, dtype=torch.float64), torch.randn(1, B, H, dtype=torch.float64))
    for state in (None, hx):
        got, want = m(ids, state), r(torch.nn.functional.one_hot(ids, 5).double(), state)
        torch.testing.assert_close(got[0], want[0], **TOL[torch.float64])
        torch.testing.assert_close(got[1][0], want[1][0], **TOL[torch.float64])


@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "zeros"])
@pytest.mark.parametrize("c_grad", [False, True], ids=["h", "h+c"])
def test_proj_size_with_truncation(with_hx, c_grad):
    """LSTM(proj_size=P) with Truncated(k) and Randomized(p): every gradient, weight_hr's
    included, equal to the step-by-step torch.nn references (a window's first step reads
    the projection of a state held constant); Truncated(T) is the full gradient"""
    m, r, X, hx, Wo, Wh = projected(1, with_hx=True)
    Wh = Wh[..., :1] if c_grad else Wh            # (1,B,1): weighs h_n (1,B,P) and c_n (1,B,H) alike
    given = hx if with_hx else None
    zeros = tuple(torch.zeros_like(s) for s in hx)            # the references' state for None
    n_state = 2 if with_hx else 0

    def same(got, want):
        assert len(got) == len(want) - (0 if with_hx else 2)
        for a, b in zip(got, want[:1] + want[1 + 2 - n_state:]):
            torch.testing.assert_close(a, b, **TOL[torch.float64])

    for k in (1, 2, 3):
        got = run(m, X, given, Wo, Wh, truncation=fastbptt.Truncated(k), c_grad=c_grad)[2]
        same(got, truncated_reference(r, X, given or zeros, Wo, Wh, k, c_grad))
    tr = fastbptt.Randomized(0.5, seed=3)
    xi = torch.from_numpy(tr.draw(T, np.float64))
    assert 0 < (xi == 0).sum() < T and xi[0] != 0
    got = run(m, X, given, Wo, Wh, truncation=tr, c_grad=c_grad)[2]
    same(got, randomized_reference(r, X, given or zeros, Wo, Wh, xi, c_grad))
    full = run(m, X, given, Wo, Wh, c_grad=c_grad)
    assert_same(run(m, X, given, Wo, Wh, truncation=fastbptt.Truncated(T), c_grad=c_grad), full, torch.float64)


def test_proj_size_truncation_in_a_stack_and_under_no_grad():
    """two layers, both directions, token ids: Truncated(T) and Randomized(1) are the full
    gradient; under no_grad the output is the full forward's"""
    m, r = pair("lstm", 2, proj_size=P, bidirectional=True, input_size=5)
    X = torch.randint(0, 5, (T, B))
    Wo = torch.randn(T, B, 2 * P, dtype=torch.float64)
    grads = []
    for tr in (None, fastbptt.Truncated(T), fastbptt.Randomized(1.0, seed=4)):
        m.zero_grad(set_to_none=True)
        (m(X, truncation=tr)[0] * Wo).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for g in grads[1:]:
        for a, b in zip(g, grads[0]):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
    with torch.no_grad():
        torch.testing.assert_close(m(X, truncation=fastbptt.Truncated(2))[0], m(X)[0])


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_training_matches_torch_nn(kind):
    """the book's concise model (one-hot -> RNN -> Linear -> CE), SGD with clipping, the state
    carried and detached in place (state.detach_(), as d2l does): every parameter after every
    step equals torch.nn's"""
    V, steps = 7, 4

    class Model(torch.nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn, self.linear = rnn, torch.nn.Linear(H, V, dtype=torch.float64)

        def forward(self, ids, state):
            Y, state = self.rnn(torch.nn.functional.one_hot(ids.T, V).double(), state)
            return self.linear(Y.reshape(-1, H)), state

    m, r = pair(kind, 2, input_size=V)
    a, b = Model(m), Model(r)
    b.load_state_dict(a.state_dict())
    opts = [torch.optim.SGD(x.parameters(), lr=0.5) for x in (a, b)]
    states = [None, None]
    g = torch.Generator().manual_seed(6)
    for _ in range(steps):
        ids = torch.randint(0, V, (B, T + 1), generator=g)
        for i, (model, opt) in enumerate(zip((a, b), opts)):
            opt.zero_grad()
            logits, s = model(ids[:, :-1], states[i])
            for x in s if kind == "lstm" else (s,):
                x.detach_()                                       # d2l's way: in place
            states[i] = s
            torch.nn.functional.cross_entropy(logits, ids[:, 1:].T.reshape(-1)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, **TOL[torch.float64], msg=n)


# ------------------------------------------------------------ state dicts, drop-in
@pytest.mark.parametrize("kind", list(KINDS))
def test_state_dict_both_ways(kind):
    ours, theirs, extra = KINDS[kind]
    torch.manual_seed(7)
    m = ours(D, H, 2, **extra)
    torch.manual_seed(7)
    r = theirs(D, H, 2, **extra)
    assert list(m.state_dict()) == list(r.state_dict())            # names, order
    for (n, p), q in zip(m.named_parameters(), r.parameters()):   # torch.nn's initialization
        assert p.shape == q.shape and torch.equal(p, q), n
    r2 = theirs(D, H, 2, **extra)
    r2.load_state_dict(m.state_dict())
    m2 = ours(D, H, 2, **extra)
    m2.load_state_dict(r2.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(m2.parameters(), r.parameters()))
    assert isinstance(m, theirs)


def test_bias_false_has_no_biases():
    m = ft.GRU(D, H, 2, bias=False)
    assert [n for n, _ in m.named_parameters()] == ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"]


# ------------------------------------------------------------------ not supported
def test_not_implemented():
    m = ft.GRU(D, H, 2, dropout=0.3).eval()
    X = torch.randn(T, B, D)
    with pytest.raises(NotImplementedError, match="CPU"):
        ft.RNN(D, H, device="meta")(torch.randn(T, B, D, device="meta"))
    with pytest.raises(TypeError, match="truncation"):
        m(X, truncation=5)
    mixed = ft.GRU(D, H, 2, dtype=torch.float64)
    mixed.weight_hh_l1 = torch.nn.Parameter(mixed.weight_hh_l1.detach().float())
    with pytest.raises(TypeError, match="one dtype, got torch.float64 and torch.float32"):
        mixed(X.double())
    with pytest.raises(NotImplementedError, match="TorchScript"):
        torch.jit.script(m)
    with pytest.raises(NotImplementedError, match="TorchScript"):
        torch.jit.trace(m, (X,))
    if hasattr(torch.compiler, "is_exporting"):
        with pytest.raises(NotImplementedError, match="torch.export"):
            torch.export.export(m, (X,))


def test_torch_nn_errors_kept():
    m = ft.GRU(D, H, 2)
    with pytest.raises(RuntimeError, match="input_size"):
        m(torch.randn(T, B, D + 1))
    with pytest.raises(RuntimeError, match="hidden size"):
        m(torch.randn(T, B, D), torch.zeros(1, B, H))
    with pytest.raises(ValueError, match="dtype"):
        m(torch.randn(T, B, D, dtype=torch.float64))


# ---------------------------------------------------------------- torch optional
def test_import_fastbptt_does_not_import_torch():
    code = "import sys, fastbptt; assert 'torch' not in sys.modules and 'fastbptt.torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_torch_says_how_to_install():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import fastbptt.torch\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "pip install fastbptt[torch]" in out
