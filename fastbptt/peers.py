"""Peers for the benchmark: the same loss + full BPTT gradient written other ways.

Each ``make_<peer>(params, X, Y, h0, device)`` returns a zero-argument callable that
computes the loss and every gradient once and returns the loss, set up so that a call
does only the work being timed; ``call.grads()`` then gives the gradients of the last
call in fastbptt's schema (numpy arrays; for checks, outside the timed work).  torch and
jax are imported inside their makers (the optional ``peers`` extra); a missing one raises
ImportError, which the harness reports as skipped.

Every peer runs the cell that the params hold (``cell_of``: W_hh (H,H) "rnn" with tanh,
(H,3H) "gru", (H,4H) "lstm"; one layer, the schema of ``fastbptt.init_params``), on token
ids X (T,B) or dense input X (T,B,D), with the loss mean softmax-CE of the linear head
over all T·B rows.  h0: (B,H) (or (1,B,H)) or None for zeros; the LSTM's is (h0, c0) or None.
"""
import numpy as np

#: the cells by their number of gate blocks G (W_hh is (H, G·H)), in PyTorch's gate order
CELLS = {1: "rnn", 3: "gru", 4: "lstm"}
GATE_NAMES = {"rnn": "h", "gru": "rzn", "lstm": "ifgo"}


def cell_of(params):
    """"rnn", "gru" or "lstm", from W_hh's shape (H, G·H)"""
    H, GH = np.shape(params["W_hh"])
    if GH % H or GH // H not in CELLS:
        raise ValueError(f"params['W_hh']: shape {(H, GH)} is none of (H,H) rnn, (H,3H) gru, (H,4H) lstm")
    return CELLS[GH // H]


def initial_state(h0, B, H, dtype, cell):
    """The start state as the peers take it: a (B,H) array, for the LSTM a pair (h0, c0);
    None is zeros, a (1,B,H) array (one layer) is accepted."""
    def one(a, name):
        if a is None:
            return np.zeros((B, H), dtype)
        a = np.asarray(a, dtype)
        if a.ndim == 3 and a.shape[0] == 1:
            a = a[0]
        if a.shape != (B, H):
            raise ValueError(f"{name}: expected shape {(B, H)} or {(1, B, H)}, got {a.shape}")
        return np.ascontiguousarray(a)
    if cell != "lstm":
        return one(h0, "h0")
    if h0 is None:
        return one(None, "h0"), one(None, "c0")
    if not isinstance(h0, (tuple, list)) or len(h0) != 2:
        raise ValueError("h0: the LSTM's start state is a pair (h0, c0) or None")
    return one(h0[0], "h0"), one(h0[1], "c0")


def _is_tokens(X):
    return np.asarray(X).dtype.kind in "iu"


def _sizes(params, X):
    """(cell, T, B, D, H, Q)"""
    X = np.asarray(X)
    D, _ = params["W_xh"].shape
    return cell_of(params), X.shape[0], X.shape[1], D, params["W_hh"].shape[0], params["W_hq"].shape[1]


# ------------------------------------------------------------------------------- numpy
def _np_project(X, W_xh, b_h):
    """x_t W_xh + b_h for all t at once, (T,B,G·H): a gather for token ids, one product for
    dense input"""
    if _is_tokens(X):
        return W_xh[X] + b_h
    T, B, D = X.shape
    A = (X.reshape(T * B, D).astype(W_xh.dtype, copy=False) @ W_xh).reshape(T, B, -1)
    A += b_h
    return A


def _np_input_grad(X, dA2, D):
    """∂W_xh = Σ_t x_tᵀ dA_t as one product (one-hot rows for token ids)"""
    N = dA2.shape[0]
    if _is_tokens(X):
        onehot = np.zeros((N, D), dA2.dtype)
        onehot[np.arange(N), X.reshape(N)] = 1.0
        return onehot.T @ dA2
    return X.reshape(N, D).astype(dA2.dtype, copy=False).T @ dA2


def _np_head(H2, W_hq, b_q, Y):
    """Mean softmax-CE of the linear head over all N rows of H2 (N,H): the loss, ∂W_hq, ∂b_q
    and ∂L/∂H2."""
    N = H2.shape[0]
    prob = H2 @ W_hq + b_q
    prob -= prob.max(axis=1, keepdims=True)
    np.exp(prob, out=prob)
    prob /= prob.sum(axis=1, keepdims=True)
    rows = np.arange(N)
    y = Y.reshape(N)
    loss = -np.log(prob[rows, y]).mean()
    prob[rows, y] -= 1.0
    prob /= N
    return float(loss), H2.T @ prob, prob.sum(axis=0), prob @ W_hq.T


def _np_dW_hh(h0, H2, dA2, B):
    """∂W_hh = Σ_t h_{t-1}ᵀ dA_t as one product (h_0 the start state)"""
    return h0.T @ dA2[:B] + H2[:-B].T @ dA2[B:]


def _sigmoid_(a):
    """σ(a) in place, as (1 + tanh(a/2)) / 2 (no overflow)"""
    a *= 0.5
    np.tanh(a, out=a)
    a *= 0.5
    a += 0.5
    return a


def _np_rnn(p, X, Y, h0):
    W_xh, W_hh, b_h = p["W_xh"], p["W_hh"], p["b_h"]
    T, B = Y.shape
    D, H = W_xh.shape
    N = T * B
    Hs = _np_project(X, W_xh, b_h)                       # pre_t for all t, then h_t in place
    h = h0
    for t in range(T):
        h = np.tanh(Hs[t] + h @ W_hh, out=Hs[t])
    H2 = Hs.reshape(N, H)
    loss, dW_hq, db_q, dZ2 = _np_head(H2, p["W_hq"], p["b_q"], Y)
    dZ = dZ2.reshape(T, B, H)
    W_hhT = np.ascontiguousarray(W_hh.T)
    carry = None
    for t in range(T - 1, -1, -1):
        if carry is not None:
            dZ[t] += carry
        dZ[t] *= 1.0 - Hs[t] * Hs[t]
        carry = dZ[t] @ W_hhT
    grads = {"W_xh": _np_input_grad(X, dZ2, D), "W_hh": _np_dW_hh(h0, H2, dZ2, B), "b_h": dZ2.sum(axis=0),
             "W_hq": dW_hq, "b_q": db_q, "h0": carry}
    return loss, grads


def _np_gru(p, X, Y, h0):
    W_xh, W_hh, b_hn = p["W_xh"], p["W_hh"], p["b_hn"]
    T, B = Y.shape
    D, H = W_xh.shape[0], W_hh.shape[0]
    N, dt = T * B, W_hh.dtype
    r_, z_, n_ = slice(0, H), slice(H, 2 * H), slice(2 * H, 3 * H)
    A = _np_project(X, W_xh, p["b_h"])                   # x-parts of r|z|n, then r, z, n in place
    Hs = np.empty((T, B, H), dt)                         # h_t
    HN = np.empty((T, B, H), dt)                         # h_{t-1} W_hn + b_hn
    h = h0
    for t in range(T):
        a, hw = A[t], h @ W_hh
        rz = a[:, :2 * H]
        rz += hw[:, :2 * H]
        _sigmoid_(rz)
        hn = np.add(hw[:, n_], b_hn, out=HN[t])
        n = a[:, n_]
        n += a[:, r_] * hn
        np.tanh(n, out=n)
        h_new = np.subtract(h, n, out=Hs[t])             # h_t = n + z (h_{t-1} - n)
        h_new *= a[:, z_]
        h_new += n
        h = h_new
    H2 = Hs.reshape(N, H)
    loss, dW_hq, db_q, dH2 = _np_head(H2, p["W_hq"], p["b_q"], Y)
    dHs = dH2.reshape(T, B, H)
    dA = np.empty((T, B, 3 * H), dt)                     # ∂ pre-activations (the x-parts and b_h)
    dR = np.empty((T, B, 3 * H), dt)                     # ∂ h_{t-1} W_hh (+ b_hn)
    W_hhT = np.ascontiguousarray(W_hh.T)
    carry = None
    for t in range(T - 1, -1, -1):
        dh = dHs[t]
        if carry is not None:
            dh += carry
        a, da, dr = A[t], dA[t], dR[t]
        r, z, n = a[:, r_], a[:, z_], a[:, n_]
        hp = Hs[t - 1] if t else h0
        dn = np.multiply(n, n, out=da[:, n_])            # ∂ n's pre-activation: dh (1-z)(1-n²)
        np.subtract(1.0, dn, out=dn)
        dn *= dh
        dn -= dn * z
        dz = np.subtract(hp, n, out=da[:, z_])           # ∂ z's: dh (h_{t-1} - n) z (1-z)
        dz *= dh
        dz *= z
        dz -= dz * z
        drr = np.multiply(dn, HN[t], out=da[:, r_])      # ∂ r's: dn (h W_hn + b_hn) r (1-r)
        drr *= r
        drr -= drr * r
        dr[:, :2 * H] = da[:, :2 * H]
        np.multiply(dn, r, out=dr[:, n_])
        carry = dr @ W_hhT
        carry += dh * z
    dA2, dR2 = dA.reshape(N, 3 * H), dR.reshape(N, 3 * H)
    grads = {"W_xh": _np_input_grad(X, dA2, D), "W_hh": _np_dW_hh(h0, H2, dR2, B), "b_h": dA2.sum(axis=0),
             "b_hn": dR2[:, n_].sum(axis=0), "W_hq": dW_hq, "b_q": db_q, "h0": carry}
    return loss, grads


def _np_lstm(p, X, Y, state):
    W_xh, W_hh = p["W_xh"], p["W_hh"]
    h0, c0 = state
    T, B = Y.shape
    D, H = W_xh.shape[0], W_hh.shape[0]
    N, dt = T * B, W_hh.dtype
    i_, f_, g_, o_ = (slice(k * H, (k + 1) * H) for k in range(4))
    A = _np_project(X, W_xh, p["b_h"])                   # x-parts of i|f|g|o, then i, f, g, o in place
    Hs, Cs, TC = (np.empty((T, B, H), dt) for _ in range(3))      # h_t, c_t, tanh(c_t)
    h, c = h0, c0
    for t in range(T):
        a = A[t]
        a += h @ W_hh
        _sigmoid_(a[:, :2 * H])
        np.tanh(a[:, g_], out=a[:, g_])
        _sigmoid_(a[:, o_])
        c = np.multiply(a[:, f_], c, out=Cs[t])
        c += a[:, i_] * a[:, g_]
        h = np.multiply(a[:, o_], np.tanh(c, out=TC[t]), out=Hs[t])
    H2 = Hs.reshape(N, H)
    loss, dW_hq, db_q, dH2 = _np_head(H2, p["W_hq"], p["b_q"], Y)
    dHs = dH2.reshape(T, B, H)
    dA = np.empty((T, B, 4 * H), dt)
    W_hhT = np.ascontiguousarray(W_hh.T)
    carry_h = carry_c = None
    for t in range(T - 1, -1, -1):
        dh = dHs[t]
        if carry_h is not None:
            dh += carry_h
        a, da, tc = A[t], dA[t], TC[t]
        i, f, g, o = a[:, i_], a[:, f_], a[:, g_], a[:, o_]
        dc = 1.0 - tc * tc
        dc *= o
        dc *= dh
        if carry_c is not None:
            dc += carry_c
        do = np.multiply(dh, tc, out=da[:, o_])
        do *= o
        do -= do * o
        di = np.multiply(dc, g, out=da[:, i_])
        di *= i
        di -= di * i
        df = np.multiply(dc, Cs[t - 1] if t else c0, out=da[:, f_])
        df *= f
        df -= df * f
        dg = np.multiply(g, g, out=da[:, g_])
        np.subtract(1.0, dg, out=dg)
        dg *= i
        dg *= dc
        carry_c = dc * f
        carry_h = da @ W_hhT
    dA2 = dA.reshape(N, 4 * H)
    grads = {"W_xh": _np_input_grad(X, dA2, D), "W_hh": _np_dW_hh(h0, H2, dA2, B), "b_h": dA2.sum(axis=0),
             "W_hq": dW_hq, "b_q": db_q, "h0": carry_h, "c0": carry_c}
    return loss, grads


def numpy_loss_and_grad(params, X, Y, h0=None):
    """A careful numpy BPTT of the params' cell: the input projection of all steps at once
    (a gather for token ids), per step one matmul + the gates, the head and softmax-CE over
    all rows, the reverse sweep, each weight gradient as one product after it.
    Returns (loss, grads) with grads in fastbptt's schema (+ "h0", and "c0" for the LSTM)."""
    cell, T, B, D, H, Q = _sizes(params, X)
    X, Y = np.asarray(X), np.asarray(Y)
    state = initial_state(h0, B, H, params["W_hh"].dtype, cell)
    return {"rnn": _np_rnn, "gru": _np_gru, "lstm": _np_lstm}[cell](params, X, Y, state)


def make_numpy(params, X, Y, h0, device="cpu"):
    if device != "cpu":
        raise ImportError("numpy runs on the CPU only")
    last = {}

    def call():
        loss, last["grads"] = numpy_loss_and_grad(params, X, Y, h0)
        return loss
    call.grads = lambda: last["grads"]
    return call


# ------------------------------------------------------------------------------- torch
def _torch(device):
    try:
        import torch
    except ImportError:
        raise ImportError("torch is not installed (pip install fastbptt[peers])") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise ImportError("torch has no CUDA device here")
    return torch


def _torch_setup(torch, params, X, Y, h0, device):
    """(cell, sizes, device, dtype, inputs() -> (T,B,D) float input (one-hot made in the call,
    as the book does), flat targets, start-state leaves (a tuple) that take a gradient)"""
    F = torch.nn.functional
    cell, T, B, D, H, Q = _sizes(params, X)
    dev = torch.device(device)
    dt = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[params["W_hh"].dtype]
    if _is_tokens(X):
        Xt = torch.from_numpy(np.asarray(X)).long().to(dev)

        def inputs():
            return F.one_hot(Xt, D).to(dt)
    else:
        Xd = torch.from_numpy(np.asarray(X)).to(dev, dt)

        def inputs():
            return Xd
    Yt = torch.from_numpy(np.asarray(Y)).reshape(-1).long().to(dev)
    state = initial_state(h0, B, H, params["W_hh"].dtype, cell)
    state = tuple(torch.tensor(s, dtype=dt, device=dev, requires_grad=True)
                  for s in (state if cell == "lstm" else (state,)))
    return cell, H, dev, dt, inputs, Yt, state


def _state_grads(cell, state, index=()):
    names = ("h0", "c0") if cell == "lstm" else ("h0",)
    return {k: s.grad[index].detach().cpu().numpy() for k, s in zip(names, state)}


def make_torch(params, X, Y, h0, device="cpu"):
    """The book's concise model (§8.6 / §9.1 / §9.2): nn.RNN, nn.GRU or nn.LSTM on one-hot (or
    dense) input, nn.Linear, cross-entropy, loss.backward(); fastbptt's params copied in
    (weight_ih = W_xhᵀ, weight_hh = W_hhᵀ, bias_ih = b_h, bias_hh = 0 but the GRU's n block
    b_hn).  On CUDA this is cuDNN's RNN."""
    torch = _torch(device)
    F = torch.nn.functional
    cell, H, dev, dt, inputs, Yt, state = _torch_setup(torch, params, X, Y, h0, device)
    D, Q = params["W_xh"].shape[0], params["W_hq"].shape[1]
    Module = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell]
    rnn = Module(D, H).to(dev, dt)                   # time-major (T,B,·); the RNN's tanh
    out = torch.nn.Linear(H, Q).to(dev, dt)

    def put(w, a):
        w.copy_(torch.from_numpy(np.ascontiguousarray(a)))
    with torch.no_grad():                            # the same weights as fastbptt's params
        put(rnn.weight_ih_l0, params["W_xh"].T)
        put(rnn.weight_hh_l0, params["W_hh"].T)
        put(rnn.bias_ih_l0, params["b_h"])
        rnn.bias_hh_l0.zero_()
        if cell == "gru":
            put(rnn.bias_hh_l0[2 * H:], params["b_hn"])
        put(out.weight, params["W_hq"].T)
        put(out.bias, params["b_q"])
    weights = list(rnn.parameters()) + list(out.parameters()) + list(state)
    h = tuple(s[None] for s in state)                # (num_layers=1, B, H)
    h = h if cell == "lstm" else h[0]

    def call():
        for w in weights:
            w.grad = None
        Hs, _ = rnn(inputs(), h)
        loss = F.cross_entropy(out(Hs.reshape(-1, H)), Yt)
        loss.backward()
        return loss.item()                           # synchronizes on CUDA

    def grads():
        g = {"W_xh": rnn.weight_ih_l0.grad.T, "W_hh": rnn.weight_hh_l0.grad.T, "b_h": rnn.bias_ih_l0.grad,
             "W_hq": out.weight.grad.T, "b_q": out.bias.grad}
        if cell == "gru":
            g["b_hn"] = rnn.bias_hh_l0.grad[2 * H:]
        g = {k: v.detach().cpu().numpy() for k, v in g.items()}
        return g | _state_grads(cell, state)
    call.grads = grads
    return call


#: the Elman peer's old name
make_torch_rnn = make_torch


def make_torch_scratch(params, X, Y, h0, device="cpu"):
    """The book's from-scratch models (§8.5, §9.1, §9.2): one weight per gate, the per-step
    loop of the cell and the output layer in torch, autograd for the gradient.  The GRU's
    candidate is PyTorch's (and fastbptt's) n = tanh(x W_xn + b_n + r ⊙ (h W_hn + b_hn))."""
    torch = _torch(device)
    F = torch.nn.functional
    cell, H, dev, dt, inputs, Yt, state = _torch_setup(torch, params, X, Y, h0, device)
    names = GATE_NAMES[cell]

    def leaf(a):
        return torch.tensor(np.ascontiguousarray(a), dtype=dt, device=dev, requires_grad=True)
    W = {}
    for k, g in enumerate(names):                    # W_xh, W_hh, b_h for the RNN
        cols = slice(k * H, (k + 1) * H)
        W[f"W_x{g}"], W[f"W_h{g}"], W[f"b_{g}"] = (leaf(params[n][..., cols]) for n in ("W_xh", "W_hh", "b_h"))
    W |= {k: leaf(params[k]) for k in ("b_hn", "W_hq", "b_q") if k in params}

    def gate(x, h, g, act):
        return act(x @ W[f"W_x{g}"] + h @ W[f"W_h{g}"] + W[f"b_{g}"])

    def rnn_step(x, H_):
        return gate(x, H_, "h", torch.tanh)

    def gru_step(x, H_):
        R = gate(x, H_, "r", torch.sigmoid)
        Z = gate(x, H_, "z", torch.sigmoid)
        H_tilda = torch.tanh(x @ W["W_xn"] + W["b_n"] + R * (H_ @ W["W_hn"] + W["b_hn"]))
        return Z * H_ + (1 - Z) * H_tilda

    def lstm_step(x, HC):
        H_, C = HC
        I = gate(x, H_, "i", torch.sigmoid)
        F_ = gate(x, H_, "f", torch.sigmoid)
        O = gate(x, H_, "o", torch.sigmoid)
        C_tilda = gate(x, H_, "g", torch.tanh)
        C = F_ * C + I * C_tilda
        return O * torch.tanh(C), C
    step = {"rnn": rnn_step, "gru": gru_step, "lstm": lstm_step}[cell]
    leaves = list(W.values()) + list(state)
    start = state if cell == "lstm" else state[0]

    def call():
        for w in leaves:
            w.grad = None
        s, outs = start, []
        for x in inputs():
            s = step(x, s)
            h = s[0] if cell == "lstm" else s
            outs.append(h @ W["W_hq"] + W["b_q"])
        loss = F.cross_entropy(torch.cat(outs), Yt)
        loss.backward()
        return loss.item()

    def grads():
        def cat(n):
            return torch.cat([W[f"{n}{g}"].grad for g in names], dim=-1).detach().cpu().numpy()
        g = {"W_xh": cat("W_x"), "W_hh": cat("W_h"), "b_h": cat("b_")}
        g |= {k: W[k].grad.detach().cpu().numpy() for k in ("b_hn", "W_hq", "b_q") if k in W}
        return g | _state_grads(cell, state)
    call.grads = grads
    return call


# --------------------------------------------------------------------------------- jax
def make_jax(params, X, Y, h0, device="cpu"):
    """lax.scan over the recurrence (one h W_hh product per step, then the gates) inside
    jax.jit(jax.value_and_grad(...)); the input projection (a gather for token ids) is over
    all T and the head one product, outside the scan."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        raise ImportError("jax is not installed (pip install fastbptt[peers])") from None
    try:
        dev = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    except RuntimeError:
        raise ImportError(f"jax has no {device} device here") from None
    cell, T, B, D, H, Q = _sizes(params, X)
    tokens = _is_tokens(X)
    sig = jax.nn.sigmoid

    def rnn_step(p, h, a):
        h = jnp.tanh(a + h @ p["W_hh"])
        return h, h

    def gru_step(p, h, a):
        hw = h @ p["W_hh"]
        r = sig(a[:, :H] + hw[:, :H])
        z = sig(a[:, H:2 * H] + hw[:, H:2 * H])
        n = jnp.tanh(a[:, 2 * H:] + r * (hw[:, 2 * H:] + p["b_hn"]))
        h = n + z * (h - n)
        return h, h

    def lstm_step(p, hc, a):
        h, c = hc
        a = a + h @ p["W_hh"]
        c = sig(a[:, H:2 * H]) * c + sig(a[:, :H]) * jnp.tanh(a[:, 2 * H:3 * H])
        h = sig(a[:, 3 * H:]) * jnp.tanh(c)
        return (h, c), h
    step = {"rnn": rnn_step, "gru": gru_step, "lstm": lstm_step}[cell]

    def loss_fn(p, s0, X, Y):
        pre = (p["W_xh"][X] if tokens else X @ p["W_xh"]) + p["b_h"]
        _, Hs = jax.lax.scan(lambda s, a: step(p, s, a), s0, pre)
        logp = jax.nn.log_softmax(Hs @ p["W_hq"] + p["b_q"], axis=-1)
        return -jnp.take_along_axis(logp, Y[..., None], axis=-1).mean()

    f = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
    state = initial_state(h0, B, H, params["W_hh"].dtype, cell)
    state = tuple(map(jnp.asarray, state)) if cell == "lstm" else jnp.asarray(state)
    Xj = jnp.asarray(X, jnp.int32) if tokens else jnp.asarray(X, params["W_hh"].dtype)
    args = jax.device_put(({k: jnp.asarray(v) for k, v in params.items()}, state, Xj,
                           jnp.asarray(Y, jnp.int32)), dev)
    last = {}

    def call():
        loss, last["grads"] = f(*args)
        jax.block_until_ready(last["grads"])
        return float(loss)

    def grads():
        gp, gs = last["grads"]
        g = {k: np.asarray(v) for k, v in gp.items()}
        if cell == "lstm":
            return g | {"h0": np.asarray(gs[0]), "c0": np.asarray(gs[1])}
        return g | {"h0": np.asarray(gs)}
    call.grads = grads
    return call
