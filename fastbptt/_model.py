"""The graph of every call, written once for every backend, cell and depth (llm.c's
gpt2_forward / gpt2_backward): what runs in which order, on which buffers.

    forward   for each layer l = 0..L-1: its input (X, or layer l-1's h_1..h_T) projected
              over all rows, then the cell's sweep over the T steps from state0[l]
    head      loss, dH = softmax-CE(h_t W_hq + b_q, Y) over all rows of the top layer, ∂W_hq, ∂b_q
    backward  for each layer from the top: the cell's reverse sweep from the direct terms dH,
              its weight gradients over all rows, and dH of the layer below = dP W_xhᵀ
              (Truncated(k): every loss term's chain, through all layers at once: truncated)
    bounded   stored_states: the same over ranges of steps recomputed from kept states, the
              adjoints of a range's last states carried down to the range below (Bounded)

``be`` is a backend (``fastbptt._cpu`` or ``fastbptt._cuda``): it makes a *run* (one call's
threads, packed weights, buffers, and the products over all rows).  ``cell`` is that
backend's module for the cell (``elman``, ``gru``, ``lstm``): its sweeps, forward and
reverse, and its pointwise backward over many rows.  The graph knows neither's internals;
arrays arrive validated (``fastbptt.api``).  ``state0`` is one tuple per layer: (h_0,), or
(h_0, c_0) for the LSTM, each (B,H).
"""
import contextlib


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
    """layer l's input: X, or what it read of layer l-1's h_1..h_T (T,B,H) (its record's x)"""
    return X if l == 0 else lays[l].x


def forward(cell, run, X, state0, act, masks=None):
    """every layer's forward; returns what the backward needs, one record per layer.
    ``masks``: None, or the L-1 input masks (T,B,H) of layers 1..L-1 (inter-layer dropout):
    layer l reads m_l ⊙ h^{(l-1)}_t, and its record keeps that input (x) and its mask."""
    lays = []
    for l in range(run.L):
        x, m = X, None
        if l > 0:
            x = lays[l - 1].S[1:]
            if masks is not None:
                m = run.given(masks[l - 1])
                x_m, = run.record(f"in{l}", [x.shape])
                run.times(x_m, x, m)
                x = x_m
        lay = cell.forward(run, l, x, state0[l], act)
        lay.x, lay.mask = x, m
        lays.append(lay)
    return lays


def _masked_down(run, lay, dX):
    """the layer below's share of ∂L/∂(this layer's input) dX: dX itself, or m ⊙ dX (in place)"""
    if lay.mask is not None:
        run.times(dX, dX, lay.mask[:dX.shape[0]])
    return dX


def backward(cell, run, X, lays, dH, act, k, xi, want_dx=False, end=None, dC=None):
    """(the parameter gradients of every layer, one tuple of state gradients per layer, ∂L/∂X
    or None) given the top layer's direct terms dH (T,B,H), overwritten.  k: Truncated(k)
    with k < T, or None for the sweeps with crossing factors xi (T,).  ``end``: one tuple
    per layer, the adjoints of the state at T from the steps after T (a range of a longer
    sweep), or None.  ``dC``: the direct terms of the top layer's c_t (T,B,H) (the LSTM's),
    or None."""
    if k is not None:
        return truncated(cell, run, X, lays, dH, act, k, want_dx, end, dC)
    grads, d0 = {}, [None] * run.L
    for l in reversed(range(run.L)):
        top = {} if dC is None or l < run.L - 1 else {"dC": dC}
        g, d0[l], dH = cell.backward(run, l, _input(X, lays, l), lays[l], dH, act, xi,
                                     l > 0 or want_dx, None if end is None else end[l], **top)
        if l > 0:
            dH = _masked_down(run, lays[l], dH)
        grads.update(run.layer_keys(g, l))
    return grads, d0, dH


def truncated(cell, run, X, lays, dH, act, k, want_dx, end=None, dC=None):
    """Truncated(k), per loss term, through every layer.  The chains of all loss terms advance
    together one depth d = 0..k-1 at a time: at depth d the chain of term t sits at step
    s = t - d of every layer (rows s = 0..T-d-1).  Top layer first, each layer's chains get
    their pointwise backward (summed into the layer's gradients), hand dP W_xhᵀ to the chains
    of the layer below at the same step, and cross one step back: A[s-1] = dR[s] W_hhᵀ (with
    the cell's carry), the crossings from step 1 summing into the state's gradients.  Moving
    down a layer is not a time step.  ``end``: the adjoints of every layer's state at T join
    the chains of step T (the last loss term's); ``dC``, the top layer's direct terms of c,
    start in the carry of the chains of their own steps."""
    T, L = run.T, run.L
    ch = [cell.chains(run, l, lays[l]) for l in range(L)]
    ch[-1].A[:] = dH
    if dC is not None:
        run.add(ch[-1].C, dC)
    for l in range(L if end is not None else 0):
        for chain, g in zip((ch[l].A, ch[l].C), end[l]):      # h, and the LSTM's c
            run.add(chain[T - 1], g)
    first = [run.zeros(f"d0{l}", (2,) + dH.shape[1:]) for l in range(L)]   # Σ crossings from step 1
    # a masked layer's dP W_xhᵀ before its mask, in one buffer of the call's for every depth
    down = [run.scratch(f"down{l}", [dH.shape])[0] if l and lays[l].mask is not None else None for l in range(L)]
    for d in range(min(k, T)):
        n = T - d
        for l in reversed(range(L)):
            c = ch[l]
            cell.chain_point(run, l, lays[l], c, n, act)
            run.add(c.gP[:n], c.dP[:n])
            if c.gR is not c.gP:
                run.add(c.gR[:n], c.dR[:n])
            if l > 0:                       # down to the layer below's chains at the same steps
                if lays[l].mask is None:
                    run.input_adjoint(l, c.dP[:n], cell.G, out=ch[l - 1].A[:n])
                else:
                    run.input_adjoint(l, c.dP[:n], cell.G, out=down[l][:n], add=False)
                    run.add(ch[l - 1].A[:n], _masked_down(run, lays[l], down[l][:n]))
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


class Records(list):
    """the layers' records that rnn_forward(keep=True) hands out; their buffers are the
    backend's again once this is gone (Run.keep_until)"""


def rnn_forward(be, cell, P, X, state0, act, L, keep=False, masks=None):
    """(the top layer's h_0..h_T (T+1,B,H), a new array; the last states; with ``keep``, the
    layers' records for rnn_backward, in buffers of their own (Records), else None)"""
    with be.begin(P, X, "forward", cell, L, keep=keep) as run:
        lays = forward(cell, run, X, state0, act, masks)
        kept = None
        if keep:
            kept = Records(lays)
            run.keep_until(kept)
        return run.output(lays[-1].S), run.last_states(cell, lays), kept


def rnn_backward(be, cell, P, X, S, dH, state0, act, k, xi, L, want_dx, lays=None, end=None, dC=None,
                 want_d0=True, masks=None):
    """the layers' parameter gradients, their state gradients and ∂L/∂X (or None), given the
    top layer's states S (T+1,B,H) and direct terms dH (overwritten), ``end`` (one tuple
    per layer: the adjoints of the last states, or None) and the LSTM's dC (see backward).
    ``lays``: the records of rnn_forward(keep=True), which hold the states (S is then None);
    else one Elman layer uses S as it is, and other cells and stacks recompute their forward
    from X and state0.  ``want_d0=False``: the state gradients are not wanted (they are then
    zeros or partial where that saves work: Run.cross)."""
    with be.begin(P, X, "backward", cell, L) as run:
        run.want_d0 = want_d0
        dH = run.given(dH)
        if isinstance(lays, Records):
            run.follow(lays)
        if lays is None:
            S = run.given(S)
            lays = [cell.given(run, 0, X, S, state0[0], act)] if L == 1 else forward(cell, run, X, state0, act,
                                                                                     masks)
        grads, d0, dX = backward(cell, run, X, lays, dH, act, k, xi, want_dx, _given_end(run, end),
                                 None if dC is None else run.given(dC))
        if dX is not None:
            grads["X"] = dX
        return run.results(grads), run.state_grads(d0)


def _given_end(run, end):
    """the caller's adjoints of the last states (one tuple per layer, or None) where the run
    computes: on the device for CUDA"""
    return None if end is None else [tuple(run.given(x) for x in layer) for layer in end]


def rnn_adjoints(be, cell, P, X, S, dH, state0, act):
    """A (T+1,B,H) = ∂L/∂h_0 … ∂L/∂h_T of the full gradient of one layer, given its direct
    terms dH"""
    with be.begin(P, X, "adjoints", cell, 1) as run:
        S, dH = run.given(S), run.given(dH)
        lay = cell.given(run, 0, X, S, state0[0], act)
        return run.output(cell.adjoints(run, 0, X, lay, dH, act))


# --------------------------------------------------------------------- bounded memory
class Bounded:
    """One call that keeps only some states (``stored_states``): the runs over ranges of steps
    that a schedule (:mod:`fastbptt.schedule`) asks for, the states kept between them, the
    adjoint carried from one range down to the next, and the sums of the ranges' gradients.

    ``direct(run, a, b, S, j)`` gives the direct terms of steps a+1..b from the top layer's
    S (b-a+1,B,H): (their loss, dH (b-a,B,H) with its first j rows zero, the head's
    gradients).  ``steps`` counts the forward steps computed, recomputations included."""

    def __init__(self, be, cell, P, X, state0, act, L, direct, want_dx=False, end=None):
        self.be, self.cell, self.P, self.X, self.act, self.L = be, cell, P, X, act, L
        self.state0, self.direct, self.want_dx, self.end = state0, direct, want_dx, end
        self.T = X.shape[0]
        self.loss, self.grads, self.last, self.d0, self.dX = 0.0, {}, None, None, None
        self.steps = 0
        self.run = None                    # the last run: the results leave through it

    @contextlib.contextmanager
    def _forward(self, a, b, state, kind):
        """``with``: a run over steps a+1..b, and the layers' records from ``state`` at a"""
        X = self.X[a:b]                   # one object: the run's own X (the CUDA run copies it once)
        with self.be.begin(self.P, X, kind, self.cell, self.L) as run:
            self.run = run
            self.steps += b - a
            yield run, forward(self.cell, run, X, state, self.act)

    def _state(self, run, lays, t):
        """copies of every layer's state at row t of the records, as state0 holds them"""
        return [tuple(run.stored(getattr(lay, name)[t]) for name in self.cell.STATES) for lay in lays]

    def _sum(self, run, loss, grads, dX, a):
        self.loss += loss
        for key, g in grads.items():
            if key in self.grads:
                run.add(self.grads[key], g)
            else:
                self.grads[key] = g
        if dX is not None:
            if self.dX is None:
                self.dX = run.fresh((self.T,) + dX.shape[1:])
            run.add(self.dX[a:a + dX.shape[0]], dX)

    def _reverse(self, a, b, state, end, xi):
        """steps a+1..b recomputed from ``state`` at a and reversed, given the adjoints of the
        state at b (``end``); returns those of the state at a"""
        with self._forward(a, b, state, "reverse") as (run, lays):
            loss, dH, grads = self.direct(run, a, b, lays[-1].S, 0)
            g, d0, dX = backward(self.cell, run, run.X, lays, dH, self.act, None, xi[a:b],
                                 self.want_dx, _given_end(run, end))
            grads.update(g)
            self._sum(run, loss, grads, dX, a)
            if b == self.T:
                self.last = run.last_states(self.cell, lays)
            return [tuple(run.stored(x) for x in d) for d in d0]

    def _advance(self, a, b, state, stores, chunk):
        """the state at b from ``state`` at a, in runs of at most ``chunk`` steps, with copies of
        the states at ``stores`` kept in ``self.slots``"""
        while a < b:
            e = min(b, a + chunk)
            with self._forward(a, e, state, "advance") as (run, lays):
                for t in stores:
                    if a < t < e:
                        self.slots[t] = self._state(run, lays, t - a)
                state = self._state(run, lays, e - a)
            if e in stores:
                self.slots[e] = state
            a = e
        return state

    def sweep(self, actions, xi, chunk):
        """the full (or randomized) gradient by a schedule's actions.  Consecutive advances (a
        restore of the state they reach between them changes nothing) are computed as one,
        their kept states copied out of its runs, and consecutive one-step reversals from kept
        states as one range: the same steps, in fewer runs."""
        self.slots = {0: self.state0}
        cur, cur_state = 0, self.state0
        adv = None                          # [a, b, stores]: advances not yet computed
        rev = None                          # [a, b, state at a, one step each]: reversals not yet run
        end = self.end

        def advance():
            nonlocal adv, cur, cur_state
            if adv is not None:
                cur, cur_state = adv[1], self._advance(adv[0], adv[1], cur_state, adv[2], chunk)
                adv = None

        def reverse():
            nonlocal rev, end
            if rev is not None:
                end = self._reverse(rev[0], rev[1], rev[2], end, xi)
                rev = None

        for action in actions:
            kind = action[0]
            if kind == "advance":
                reverse()
                _, a, b, store = action
                if adv is None:
                    adv = [cur, cur, set()]
                assert adv[1] == a, "a schedule's advances start where the state is"
                adv[1] = b
                if store:
                    adv[2].add(b)
            elif kind == "restore":                   # of the state the advances reach: nothing to do
                if action[1] != (cur if adv is None else adv[1]):
                    advance()
                    cur, cur_state = action[1], self.slots[action[1]]
            elif kind == "free":
                if adv is not None and action[1] in adv[2]:
                    advance()
                del self.slots[action[1]]
            else:
                advance()
                _, a, b = action
                if rev is not None and b - a == 1 and rev[3] and rev[0] == b:
                    rev[0], rev[2] = a, cur_state
                else:
                    reverse()
                    rev = [a, b, cur_state, b - a == 1]
        advance()
        reverse()
        self.d0 = end
        return self

    def windows(self, k, m):
        """Truncated(k): the loss terms of steps j0+1..j0+m at a time (m >= k: a window's
        recomputation at most doubles it), each window recomputed
        from the kept state at w0, the last multiple of m at or before j0+1-k (every state
        those terms' chains reach).  The states at multiples of m are kept while a later
        window may start there."""
        kept = {0: self.state0}
        for j0 in range(0, self.T, m):
            j1 = min(self.T, j0 + m)
            w0 = m * (max(0, j0 + 1 - k) // m)
            with self._forward(w0, j1, kept[w0], "window") as (run, lays):
                nxt = m * (max(0, j1 + 1 - k) // m)
                for t in range(w0 + m, j1 + 1, m):
                    if t >= nxt and t not in kept:
                        kept[t] = self._state(run, lays, t - w0)
                for t in [t for t in kept if t < nxt]:
                    del kept[t]
                loss, dH, grads = self.direct(run, w0, j1, lays[-1].S, j0 - w0)
                g, d0, dX = truncated(self.cell, run, run.X, lays, dH, self.act, k, self.want_dx,
                                      _given_end(run, self.end) if j1 == self.T else None)
                grads.update(g)
                self._sum(run, loss, grads, dX, w0)
                if w0 == 0:                 # the crossings into h_0 (later windows start past it)
                    d0 = [tuple(run.stored(x) for x in d) for d in d0]
                    if self.d0 is None:
                        self.d0 = d0
                    else:
                        for mine, theirs in zip(self.d0, d0):
                            for x, y in zip(mine, theirs):
                                run.add(x, y)
                if j1 == self.T:
                    self.last = run.last_states(self.cell, lays)
        return self


def _bounded(be, cell, P, X, state0, act, L, direct, k, xi, stored, want_dx=False, end=None):
    """a Bounded call carried out: by windows for Truncated(k), else by the schedule"""
    from . import schedule
    b = Bounded(be, cell, P, X, state0, act, L, direct, want_dx, end)
    T = X.shape[0]
    if k is not None:
        return b.windows(k, max(schedule.window(T, stored), min(k, T)))
    return b.sweep(schedule.schedule(T, stored), xi, schedule.window(T, "sqrt"))


def bounded_loss_and_grad(be, cell, P, X, Y, state0, act, k, xi, scale, L, stored):
    """loss_and_grad keeping only the states ``stored`` asks for (see fastbptt.schedule)"""
    def direct(run, a, b, S, j):
        loss, dH, grads = run.head_forward_backward(S[j:], Y[a + j:b], scale)
        if j == 0:
            return loss, dH, grads
        out = run.zeros("dHw", (b - a,) + dH.shape[1:])
        run.add(out[j:], dH)
        return loss, out, grads

    r = _bounded(be, cell, P, X, state0, act, L, direct, k, xi, stored)
    return r.loss, r.run.results(r.grads), r.run.state_grads(r.d0), r.last


def bounded_rnn_backward(be, cell, P, X, dH, state0, act, k, xi, L, want_dx, stored, end=None):
    """rnn_backward keeping only the states ``stored`` asks for, the top layer's direct terms
    given (dH, the caller's copy), and ``end`` as rnn_backward's"""
    on = {}                               # dH where the runs take it (the device: copied once)

    def direct(run, a, b, S, j):
        if "dH" not in on:
            on["dH"] = run.given(dH)
        D = on["dH"]
        if j == 0:
            return 0.0, D[a:b], {}
        out = run.zeros("dHw", (b - a,) + D.shape[1:])
        run.add(out[j:], D[a + j:b])
        return 0.0, out, {}

    r = _bounded(be, cell, P, X, state0, act, L, direct, k, xi, stored, want_dx, end)
    grads = dict(r.grads)
    if r.dX is not None:
        grads["X"] = r.dX
    return r.run.results(grads), r.run.state_grads(r.d0)
