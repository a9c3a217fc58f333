"""The graph of every call, written once for every backend, cell and depth (llm.c's
gpt2_forward / gpt2_backward): what runs in which order, on which buffers.

    forward   for each layer l = 0..L-1: its input (X, or layer l-1's h_1..h_T) projected
              over all rows, then the cell's sweep over the T steps from state0[l]
    head      loss, dH = softmax-CE(h_t W_hq + b_q, Y) over all rows of the top layer, ∂W_hq, ∂b_q
    backward  for each layer from the top: the cell's reverse sweep from the direct terms dH,
              its weight gradients over all rows, and dH of the layer below = dP W_xhᵀ
              (Truncated(k): every loss term's chain, through all layers at once: truncated)

``be`` is a backend (``fastbptt._cpu`` or ``fastbptt._cuda``): it makes a *run* (one call's
threads, packed weights, buffers, and the products over all rows).  ``cell`` is that
backend's module for the cell (``elman``, ``gru``, ``lstm``): its sweeps, forward and
reverse, and its pointwise backward over many rows.  The graph knows neither's internals;
arrays arrive validated (``fastbptt.api``).  ``state0`` is one tuple per layer: (h_0,), or
(h_0, c_0) for the LSTM, each (B,H).
"""


def key(name, l):
    """the params' key of layer l's parameter ``name``: "W_hh" for layer 0, "W_hh_l1", ... above"""
    return name if l == 0 else f"{name}_l{l}"


class LayerParams:
    """a backend run's access to the layers' params (``self.P``) by name and layer"""

    def key(self, name, l):
        return key(name, l)

    def param(self, name, l):
        return self.P[key(name, l)]

    def layer_keys(self, grads, l):
        return {key(name, l): g for name, g in grads.items()}


def _input(X, lays, l):
    """layer l's input: X, or layer l-1's h_1..h_T (T,B,H)"""
    return X if l == 0 else lays[l - 1].S[1:]


def forward(cell, run, X, state0, act):
    """every layer's forward; returns what the backward needs, one record per layer"""
    lays = []
    for l in range(run.L):
        lays.append(cell.forward(run, l, _input(X, lays, l), state0[l], act))
    return lays


def backward(cell, run, X, lays, dH, act, k, xi, want_dx=False):
    """(the parameter gradients of every layer, one tuple of state gradients per layer, ∂L/∂X
    or None) given the top layer's direct terms dH (T,B,H), overwritten.  k: Truncated(k)
    with k < T, or None for the sweeps with crossing factors xi (T,)."""
    if k is not None:
        return truncated(cell, run, X, lays, dH, act, k, want_dx)
    grads, d0 = {}, [None] * run.L
    for l in reversed(range(run.L)):
        g, d0[l], dH = cell.backward(run, l, _input(X, lays, l), lays[l], dH, act, xi,
                                     l > 0 or want_dx)
        grads.update(run.layer_keys(g, l))
    return grads, d0, dH


def truncated(cell, run, X, lays, dH, act, k, want_dx):
    """Truncated(k), per loss term, through every layer.  The chains of all loss terms advance
    together one depth d = 0..k-1 at a time: at depth d the chain of term t sits at step
    s = t - d of every layer (rows s = 0..T-d-1).  Top layer first, each layer's chains get
    their pointwise backward (summed into the layer's gradients), hand dP W_xhᵀ to the chains
    of the layer below at the same step, and cross one step back: A[s-1] = dR[s] W_hhᵀ (with
    the cell's carry), the crossings from step 1 summing into the state's gradients.  Moving
    down a layer is not a time step."""
    T, L = run.T, run.L
    ch = [cell.chains(run, l, lays[l]) for l in range(L)]
    ch[-1].A[:] = dH
    first = [run.zeros(f"d0{l}", (2,) + dH.shape[1:]) for l in range(L)]   # Σ crossings from step 1
    for d in range(min(k, T)):
        n = T - d
        for l in reversed(range(L)):
            c = ch[l]
            cell.chain_point(run, l, lays[l], c, n, act)
            run.add(c.gP[:n], c.dP[:n])
            if c.gR is not c.gP:
                run.add(c.gR[:n], c.dR[:n])
            if l > 0:
                run.input_adjoint(l, c.dP[:n], cell.G, out=ch[l - 1].A[:n])
            run.recurrent_adjoint(l, c.dR[:1], cell.G, out=first[l][0])
            if c.C is not None:
                run.add(first[l][1:], c.C[:1])
            if n > 1:
                c.A[:n - 1] = 0
                run.recurrent_adjoint(l, c.dR[1:n], cell.G, out=c.A[:n - 1])
                if c.C is not None:
                    run.shift(c.C, n)
    grads, d0 = {}, [None] * L
    for l in range(L):
        c = ch[l]
        grads.update(run.layer_keys(cell.weight_grads(run, l, _input(X, lays, l), lays[l],
                                                      c.gP, c.gR), l))
        d0[l] = cell.initial_grads(first[l][0], first[l][1])
    dX = run.input_adjoint(0, ch[0].gP, cell.G) if want_dx else None
    return grads, d0, dX


def loss_and_grad(be, cell, P, X, Y, state0, act, k, xi, scale, L):
    """(loss, grads, the last states, one tuple per layer) of the whole model"""
    with be.begin(P, X, "loss_and_grad", cell, L) as run:
        lays = forward(cell, run, X, state0, act)
        loss, dH, grads = run.head_forward_backward(lays[-1].S, Y, scale)
        g, d0, _ = backward(cell, run, X, lays, dH, act, k, xi)
        grads.update(g)
        return loss, run.results(grads), run.state_grads(d0), run.last_states(cell, lays)


def loss(be, cell, P, X, Y, state0, act, L):
    """(Σ of the T·B cross-entropy terms, the last states), forward only"""
    with be.begin(P, X, "loss", cell, L) as run:
        lays = forward(cell, run, X, state0, act)
        return run.head_loss(lays[-1].S, Y), run.last_states(cell, lays)


def rnn_forward(be, cell, P, X, state0, act, L, keep=False):
    """(the top layer's h_0..h_T (T+1,B,H), a new array; the last states; with ``keep``, the
    layers' records for rnn_backward, in buffers of their own, else None)"""
    with be.begin(P, X, "forward", cell, L, keep=keep) as run:
        lays = forward(cell, run, X, state0, act)
        return run.output(lays[-1].S), run.last_states(cell, lays), lays if keep else None


def rnn_backward(be, cell, P, X, S, dH, state0, act, k, xi, L, want_dx, lays=None):
    """the layers' parameter gradients, their state gradients and ∂L/∂X (or None), given the
    top layer's states S (T+1,B,H) and direct terms dH (overwritten).  ``lays``: the records of
    rnn_forward(keep=True); else one Elman layer uses S as it is, and other cells and stacks
    recompute their forward from X and state0."""
    with be.begin(P, X, "backward", cell, L) as run:
        S, dH = run.given(S), run.given(dH)
        if lays is None:
            lays = [cell.given(run, 0, X, S, state0[0], act)] if L == 1 else forward(cell, run, X, state0, act)
        grads, d0, dX = backward(cell, run, X, lays, dH, act, k, xi, want_dx)
        if dX is not None:
            grads["X"] = dX
        return run.results(grads), run.state_grads(d0)


def rnn_adjoints(be, cell, P, X, S, dH, state0, act):
    """A (T+1,B,H) = ∂L/∂h_0 … ∂L/∂h_T of the full gradient of one layer, given its direct
    terms dH"""
    with be.begin(P, X, "adjoints", cell, 1) as run:
        S, dH = run.given(S), run.given(dH)
        lay = cell.given(run, 0, X, S, state0[0], act)
        return run.output(cell.adjoints(run, 0, X, lay, dH, act))
