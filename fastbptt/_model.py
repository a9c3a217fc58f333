"""The graph of every call, written once for every backend and cell (llm.c's
gpt2_forward / gpt2_backward): what runs in which order, on which buffers.

    forward   S[0] = h_0;  S[1:] = pre = embed(X);  cell sweep: S[t] = cell(S[t-1], pre_t)
    head      loss, dS = softmax-CE(S[1:] W_hq + b_q, Y),  ∂W_hq, ∂b_q
    backward  cell reverse sweep: dZ (the pre-activations' adjoints), ∂h_0
              ∂W_hh, ∂b_h = recurrent grads(S, dZ);  ∂W_xh = input grads(X, dZ)

``be`` is a backend (``fastbptt._cpu`` or ``fastbptt._cuda``): it makes a *run* (one
call's threads, packed weights and buffers) and runs the products over all rows
(embed, head, weight gradients).  ``cell`` is that backend's module for the cell (e.g.
``fastbptt._cpu.elman``): its sweeps, forward and reverse.  The graph knows neither's
internals; arrays arrive validated (``fastbptt.api``).
"""


def forward(be, cell, run, X, h0, act):
    """S (T+1,B,H) = h_0..h_T"""
    S = run.states()
    be.embed(run, X, S, h0)
    cell.forward(run, S, act)
    return S


def backward(be, cell, run, X, S, dZ, act, k, xi):
    """The cell's parameter gradients and ∂h_0, given S = h_0..h_T and dZ = the direct
    terms ∂l_t/∂h_t (overwritten by the pre-activations' adjoints)."""
    grads = {"h0": cell.backward(run, S, dZ, act, k, xi)}
    grads["W_hh"], grads["b_h"] = be.recurrent_grads(run, S, dZ)
    grads["W_xh"] = be.input_grads(run, X, dZ)
    return grads


def loss_and_grad(be, cell, P, X, Y, h0, act, k, xi, scale):
    """(loss, grads, h_T) of the whole model"""
    run = be.begin(P, X, "loss_and_grad")
    with run:
        S = forward(be, cell, run, X, h0, act)
        loss, dZ, grads = be.head_forward_backward(run, S, Y, scale)
        grads.update(backward(be, cell, run, X, S, dZ, act, k, xi))
        return loss, run.results(grads), run.last_state(S)


def loss(be, cell, P, X, Y, h0, act):
    """(Σ of the T·B cross-entropy terms, h_T), forward only"""
    run = be.begin(P, X, "loss")
    with run:
        S = forward(be, cell, run, X, h0, act)
        return be.head_loss(run, S, Y), run.last_state(S)


def rnn_forward(be, cell, P, X, h0, act):
    """S (T+1,B,H) = h_0..h_T, a new array"""
    run = be.begin(P, X, "forward")
    with run:
        return run.results({"S": forward(be, cell, run, X, h0, act)})["S"]


def rnn_backward(be, cell, P, X, S, dZ, act, k, xi):
    """the gradients of W_xh, W_hh, b_h and h0 (dZ: the direct terms, overwritten)"""
    run = be.begin(P, X, "backward")
    with run:
        return run.results(backward(be, cell, run, X, be.given(run, S), be.given(run, dZ),
                                    act, k, xi))


def rnn_adjoints(be, cell, P, X, S, dZ, act):
    """A (T+1,B,H) = ∂L/∂h_0 … ∂L/∂h_T of the full gradient: a_t = dHs_t + dz_{t+1} W_hhᵀ"""
    run = be.begin(P, X, "adjoints")
    with run:
        S, dZ = be.given(run, S), be.given(run, dZ)
        A = be.direct_terms(run, dZ)                 # A[1:] = dHs, A[0] = 0
        cell.backward(run, S, dZ, act, None, be.ones(run, dZ.shape[0], dZ.dtype))
        cell.add_recurrent(run, A, dZ)               # A[:T] += dZ W_hhᵀ
        return run.results({"A": A})["A"]
