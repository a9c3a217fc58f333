"""CPU kernels (numba): forward/backward pairs for a one-layer RNN and its softmax head.

The math (design notes §1), batch-major inside each time step::

    z_t = x_t W_xh + h_{t-1} W_hh + b_h          x_t (B,D)   h_t (B,H)
    h_t = φ(z_t)                                  φ: 0=tanh 1=relu 2=identity
    o_t = h_t W_hq + b_q                          o_t (B,Q)
    L   = scale · Σ_t Σ_b CE(softmax(o_t[b]), y_t[b])

    a_t  = ∂l/∂h_t (direct) + ξ_{t+1} · dz_{t+1} W_hhᵀ
    dz_t = a_t ⊙ φ'(z_t)          (tanh: 1 - h_t²,  relu: [h_t > 0],  identity: 1)

Conventions (as in llm.c): outputs first, then inputs, then weights.  Buffers are
allocated by the caller or once per call, never inside the per-time-step loop; no
kernel validates (``fastbptt.api`` does, once).  Only the recurrence is sequential:
the input projection, the head and every weight gradient are one product over all
T·B rows.  ``fastbptt._cuda`` mirrors this module function for function.
"""
import numpy as np
from numba import njit, types
from numba.extending import overload

from .config import ACTIVATIONS, FASTMATH

TANH, RELU, IDENTITY = (ACTIVATIONS[name] for name in ("tanh", "relu", "identity"))

# --------------------------------------------------------------------------- tanh
# float32: Eigen's rational approximation (odd degree-13 polynomial over an even
# degree-6 one in x, input clamped to ±7.9053111), max abs error ≈ 2.5e-7, branch
# free so the step loop vectorizes; numba's np.tanh is a scalar libm call.
# float64: np.tanh (exact to 1 ulp; the float64 path is the accurate one).
_CLAMP = np.float32(7.90531110763549805)
_A1, _A3, _A5, _A7 = (np.float32(4.89352455891786e-03), np.float32(6.37261928875436e-04),
                      np.float32(1.48572235717979e-05), np.float32(5.12229709037114e-08))
_A9, _A11, _A13 = (np.float32(-8.60467152213735e-11), np.float32(2.00018790482477e-13),
                   np.float32(-2.76076847742355e-16))
_B0, _B2, _B4, _B6 = (np.float32(4.89352518554385e-03), np.float32(2.26843463243900e-03),
                      np.float32(1.18534705686654e-04), np.float32(1.19825839466702e-06))


def tanh(x):
    """tanh(x), fast for float32 (see module notes); usable inside @njit code."""
    return np.tanh(x)


@overload(tanh, jit_options={"fastmath": FASTMATH, "error_model": "numpy"})
def _tanh_ov(x):
    if x == types.float32:
        def tanh_f32(x):
            x = _CLAMP if x > _CLAMP else x
            x = -_CLAMP if x < -_CLAMP else x
            x2 = x * x
            p = x2 * _A13 + _A11
            p = p * x2 + _A9
            p = p * x2 + _A7
            p = p * x2 + _A5
            p = p * x2 + _A3
            p = p * x2 + _A1
            q = x2 * _B6 + _B4
            q = q * x2 + _B2
            q = q * x2 + _B0
            return x * p / q
        return tanh_f32
    return lambda x: np.tanh(x)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def tanh_cpu(out, x):
    """out = tanh(x), elementwise (the kernels' tanh, exposed for tests) · out, x (N,)"""
    for i in range(x.shape[0]):
        out[i] = tanh(x[i])


# ------------------------------------------------------------------ input projection
@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def embed_tokens_cpu(pre, X, W_xh, b_h):
    """pre_t = x_t W_xh + b_h for one-hot x_t: a row gather, pre[t,b] = W_xh[X[t,b]] + b_h

    pre (T,B,H) out · X (T,B) int64 token ids · W_xh (D,H) · b_h (H,)
    """
    T, B, H = pre.shape
    for t in range(T):
        for b in range(B):
            row = W_xh[X[t, b]]
            dst = pre[t, b]
            for j in range(H):
                dst[j] = row[j] + b_h[j]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def embed_dense_cpu(pre, X, W_xh, b_h):
    """pre = X W_xh + b_h over all T·B rows at once (one GEMM)

    pre (T·B,H) out · X (T·B,D) · W_xh (D,H) · b_h (H,)
    """
    np.dot(X, W_xh, pre)
    N, H = pre.shape
    for n in range(N):
        for j in range(H):
            pre[n, j] += b_h[j]


# ------------------------------------------------------------------------ recurrence
@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def rnn_forward_cpu(Hx, W_hh, act):
    """h_t = φ(pre_t + h_{t-1} W_hh),  t = 1..T   (pre_t = x_t W_xh + b_h, precomputed)

    Hx (T+1,B,H) in: h_0, pre_1..pre_T; out: h_0..h_T · W_hh (H,H) · act 0=tanh 1=relu
    2=identity.  h_0 sits in front of h_1..h_T so that ∂W_hh is one GEMM over Hx[:T].
    Per step one (B,H)x(H,H) GEMM into a buffer, then the add and φ fused in one pass.
    """
    T = Hx.shape[0] - 1
    B, H = Hx.shape[1], Hx.shape[2]
    rec = np.empty((B, H), Hx.dtype)          # h_{t-1} W_hh, reused every step
    zero = Hx.dtype.type(0)
    for t in range(1, T + 1):
        np.dot(Hx[t - 1], W_hh, rec)
        h = Hx[t]
        if act == TANH:
            for b in range(B):
                for j in range(H):
                    h[b, j] = tanh(h[b, j] + rec[b, j])
        elif act == RELU:
            for b in range(B):
                for j in range(H):
                    z = h[b, j] + rec[b, j]
                    h[b, j] = z if z > zero else zero
        else:
            for b in range(B):
                for j in range(H):
                    h[b, j] += rec[b, j]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _dz_step(dz, carry, xi, h, act):
    """dz ← (dz + xi · carry) ⊙ φ'(h)   (inverts h_t = φ(z_t); xi = 0 skips carry)

    dz (B,H) in: the direct adjoint, out: ∂L/∂z · carry, h (B,H).  One branch-free
    loop per case, so each vectorizes.
    """
    B, H = dz.shape
    one = h.dtype.type(1)
    zero = h.dtype.type(0)
    if xi != zero:
        for b in range(B):
            for j in range(H):
                dz[b, j] += xi * carry[b, j]
    if act == TANH:
        for b in range(B):
            for j in range(H):
                dz[b, j] *= one - h[b, j] * h[b, j]
    elif act == RELU:
        for b in range(B):
            for j in range(H):
                dz[b, j] = dz[b, j] if h[b, j] > zero else zero


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def rnn_backward_cpu(dZ, dh0, Hx, W_hh, xi, act):
    """Reverse sweep, t = T..1:  a_t = dHs_t + ξ_{t+1} dz_{t+1} W_hhᵀ,  dz_t = a_t ⊙ φ'(h_t);
    then ∂L/∂h_0 = ξ_1 · dz_1 W_hhᵀ.

    dZ (T,B,H) in: dHs (the head's ∂L/∂h_t), out: dz_t · dh0 (B,H) out · Hx (T+1,B,H)
    h_0..h_T · W_hh (H,H) · xi (T,) ξ_1..ξ_T (all ones: full gradient; {0, 1/p}: randomized
    truncation, a zero skips that step's GEMM) · act 0=tanh 1=relu 2=identity
    """
    T, B, H = dZ.shape
    W_hhT = np.ascontiguousarray(W_hh.T)      # once per call: rows of the product are contiguous
    carry = np.zeros((B, H), dZ.dtype)        # dz_{t+1} W_hhᵀ
    zero = dZ.dtype.type(0)
    for t in range(T - 1, -1, -1):
        x = xi[t + 1] if t + 1 < T else zero
        _dz_step(dZ[t], carry, x, Hx[t + 1], act)   # inverts h_t = φ(z_t)
        if t > 0 and xi[t] != zero:
            np.dot(dZ[t], W_hhT, carry)                 # inverts h_{t-1} W_hh
    if xi[0] != zero:
        np.dot(dZ[0], W_hhT, dh0)
        for b in range(B):
            for j in range(H):
                dh0[b, j] *= xi[0]
    else:
        dh0[:] = zero


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def rnn_backward_truncated_cpu(dZ, dh0, Hx, W_hh, k, act):
    """Per-term truncation after k steps:  dz_s = Σ_{t=s}^{min(s+k-1,T)} (l_t's adjoint at z_s),
    ∂L/∂h_0 = dz_1 W_hhᵀ (only the terms with t <= k reach step 1).

    The chains of all loss terms advance together, one depth d = 0..k-1 at a time:
    C_t ← C_t ⊙ φ'(h_{t-d}) is added into dz_{t-d}, then C_t ← C_t W_hhᵀ for all t > d in
    one GEMM over (T-d-1)·B rows.  Cost: min(k,T) - 1 GEMMs of at most T·B rows.

    dZ (T,B,H) in: dHs (direct terms), out: dz_t · dh0 (B,H) out · Hx (T+1,B,H)
    h_0..h_T · W_hh (H,H) · k >= 1 · act 0=tanh 1=relu 2=identity
    """
    T, B, H = dZ.shape
    W_hhT = np.ascontiguousarray(W_hh.T)
    chain = dZ.copy()                          # C_t for every loss term t
    nxt = np.empty_like(dZ)
    zero = dZ.dtype.type(0)
    dZ[:] = zero
    depth = min(k, T)
    for d in range(depth):
        for t in range(d, T):                  # C_t sits at step s = t - d
            _dz_step(chain[t], chain[t], zero, Hx[t - d + 1], act)
            dst = dZ[t - d]
            src = chain[t]
            for b in range(B):
                for j in range(H):
                    dst[b, j] += src[b, j]
        if d + 1 < depth:                      # move every live chain one step back
            np.dot(chain.reshape(T * B, H)[(d + 1) * B:], W_hhT,
                   nxt.reshape(T * B, H)[(d + 1) * B:])
            chain, nxt = nxt, chain
    np.dot(dZ[0], W_hhT, dh0)


# ------------------------------------------------------------------ weight gradients
@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def rnn_weight_grads_cpu(dW_hh, db_h, dZ, Hx):
    """∂W_hh = Σ_t h_{t-1}ᵀ dz_t,  ∂b_h = Σ_t Σ_b dz_t   (one GEMM over all T·B rows, after the loop)

    dW_hh (H,H) out · db_h (H,) out · dZ (T,B,H) · Hx (T+1,B,H) h_0..h_T
    """
    T, B, H = dZ.shape
    np.dot(Hx[:T].reshape(T * B, H).T, dZ.reshape(T * B, H), dW_hh)
    db_h[:] = 0
    for t in range(T):
        for b in range(B):
            for j in range(H):
                db_h[j] += dZ[t, b, j]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def embed_tokens_backward_cpu(dW_xh, dZ, X):
    """∂W_xh = Σ_t x_tᵀ dz_t for one-hot x_t: a scatter-add, dW_xh[X[t,b]] += dz_t[b]

    dW_xh (D,H) out · dZ (T,B,H) · X (T,B) int64 token ids
    """
    T, B, H = dZ.shape
    dW_xh[:] = 0
    for t in range(T):
        for b in range(B):
            dst = dW_xh[X[t, b]]
            src = dZ[t, b]
            for j in range(H):
                dst[j] += src[j]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def embed_dense_backward_cpu(dW_xh, dZ, X):
    """∂W_xh = Xᵀ dZ over all T·B rows (one GEMM)

    dW_xh (D,H) out · dZ (T·B,H) · X (T·B,D)
    """
    np.dot(X.T, dZ, dW_xh)


# ---------------------------------------------------------------------- softmax head
@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _softmax_row(o, b_q):
    """o ← exp(o + b_q - m) with m = max(o + b_q); returns (m, Σ exp) so logsumexp = m + log Σ

    o (Q,) in/out · b_q (Q,)
    """
    Q = o.shape[0]
    m = o[0] + b_q[0]
    for q in range(Q):
        o[q] += b_q[q]
        m = o[q] if o[q] > m else m
    s = 0.0
    for q in range(Q):
        e = np.exp(o[q] - m)
        o[q] = e
        s += e
    return m, s


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def head_forward_backward_cpu(dHs, dW_hq, db_q, logits, Hs, Y, W_hq, b_q, scale):
    """o = H W_hq + b_q;  L = scale · Σ_n (logsumexp(o_n) - o_n[y_n]);
    do = scale · (softmax(o) - onehot(y));  ∂W_hq = Hᵀ do,  ∂b_q = Σ_n do_n,  dHs = do W_hqᵀ

    dHs (N,H) out · dW_hq (H,Q) out · db_q (Q,) out · logits (N,Q) work, out: do ·
    Hs (N,H) · Y (N,) int64 targets · W_hq (H,Q) · b_q (Q,) · scale: 1/N or 1.
    N = T·B rows; returns L (float64).  Softmax and CE fused, stable via the row max.
    """
    N, Q = logits.shape
    np.dot(Hs, W_hq, logits)
    total = 0.0
    db_q[:] = 0
    for n in range(N):
        o = logits[n]
        y = Y[n]
        o_y = o[y] + b_q[y]
        m, s = _softmax_row(o, b_q)
        total += m + np.log(s) - o_y
        inv = o.dtype.type(scale / s)
        for q in range(Q):
            o[q] *= inv
        o[y] -= scale
        for q in range(Q):
            db_q[q] += o[q]
    np.dot(Hs.T, logits, dW_hq)
    np.dot(logits, W_hq.T, dHs)
    return total * scale


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def head_loss_cpu(logits, Hs, Y, W_hq, b_q):
    """Σ_n (logsumexp(o_n) - o_n[y_n]) with o = H W_hq + b_q (forward only; float64 result)

    logits (N,Q) work · Hs (N,H) · Y (N,) int64 · W_hq (H,Q) · b_q (Q,)
    """
    N, Q = logits.shape
    np.dot(Hs, W_hq, logits)
    total = 0.0
    for n in range(N):
        o = logits[n]
        o_y = o[Y[n]] + b_q[Y[n]]
        m, s = _softmax_row(o, b_q)
        total += m + np.log(s) - o_y
    return total


# ------------------------------------------------------- composites (called by api.py)
# Plain Python: allocate each buffer once per call and run the kernels in order.
# Inputs arrive validated, C-contiguous, writeable, in one float dtype (token ids int64).

def forward(P, X, h0, act):
    """Hx (T+1,B,H) = h_0..h_T for token ids X (T,B) or dense X (T,B,D)."""
    T, B = X.shape[:2]
    H = P["W_hh"].shape[0]
    Hx = np.empty((T + 1, B, H), P["W_hh"].dtype)
    Hx[0] = h0
    if X.ndim == 2:
        embed_tokens_cpu(Hx[1:], X, P["W_xh"], P["b_h"])
    else:
        embed_dense_cpu(Hx[1:].reshape(T * B, H), X.reshape(T * B, -1), P["W_xh"], P["b_h"])
    rnn_forward_cpu(Hx, P["W_hh"], act)
    return Hx


def backward(P, X, Hx, dZ, act, k, xi):
    """Gradients of W_xh, W_hh, b_h and h0 given Hx = h_0..h_T and dZ = ∂L/∂h_t (direct
    terms; overwritten).  k: per-term truncation depth (Truncated(k), k < T), or None
    for the sweep with crossing factors xi (T,) (ones: full; {0, 1/p}: randomized)."""
    T, B, H = dZ.shape
    dt = dZ.dtype
    dh0 = np.empty((B, H), dt)
    if k is None:
        rnn_backward_cpu(dZ, dh0, Hx, P["W_hh"], xi, act)
    else:
        rnn_backward_truncated_cpu(dZ, dh0, Hx, P["W_hh"], k, act)
    dW_hh = np.empty((H, H), dt)
    db_h = np.empty(H, dt)
    rnn_weight_grads_cpu(dW_hh, db_h, dZ, Hx)
    dW_xh = np.empty(P["W_xh"].shape, dt)
    if X.ndim == 2:
        embed_tokens_backward_cpu(dW_xh, dZ, X)
    else:
        embed_dense_backward_cpu(dW_xh, dZ.reshape(T * B, H), X.reshape(T * B, -1))
    return {"W_xh": dW_xh, "W_hh": dW_hh, "b_h": db_h, "h0": dh0}


def adjoints(P, Hx, dZ, act):
    """A (T+1,B,H) = ∂L/∂h_0 … ∂L/∂h_T of the full gradient, given Hx = h_0..h_T and
    dZ = the direct terms ∂L/∂h_t (overwritten): a_t = dHs_t + dz_{t+1} W_hhᵀ, a_0 = dz_1 W_hhᵀ."""
    T, B, H = dZ.shape
    A = np.zeros((T + 1, B, H), dZ.dtype)
    A[1:] = dZ
    dh0 = np.empty((B, H), dZ.dtype)
    rnn_backward_cpu(dZ, dh0, Hx, P["W_hh"], np.ones(T, dZ.dtype), act)
    A[:T] += (dZ.reshape(T * B, H) @ P["W_hh"].T).reshape(T, B, H)     # one GEMM over all rows
    return A


def loss_and_grad(P, X, Y, h0, act, k, xi, scale):
    """(loss, grads, h_T): forward, fused softmax-CE head, backward."""
    Hx = forward(P, X, h0, act)
    T, B, H = Hx.shape[0] - 1, Hx.shape[1], Hx.shape[2]
    Q = P["W_hq"].shape[1]
    dt = Hx.dtype
    dHs = np.empty((T, B, H), dt)
    dW_hq = np.empty((H, Q), dt)
    db_q = np.empty(Q, dt)
    logits = np.empty((T * B, Q), dt)
    loss = head_forward_backward_cpu(dHs.reshape(T * B, H), dW_hq, db_q, logits,
                                     Hx[1:].reshape(T * B, H), Y.reshape(T * B), P["W_hq"],
                                     P["b_q"], scale)
    grads = backward(P, X, Hx, dHs, act, k, xi)
    grads["W_hq"] = dW_hq
    grads["b_q"] = db_q
    return loss, grads, Hx[T].copy()


def loss(P, X, Y, h0, act):
    """(Σ of the T·B cross-entropy terms, h_T), forward only."""
    Hx = forward(P, X, h0, act)
    T, B, H = Hx.shape[0] - 1, Hx.shape[1], Hx.shape[2]
    logits = np.empty((T * B, P["W_hq"].shape[1]), Hx.dtype)
    total = head_loss_cpu(logits, Hx[1:].reshape(T * B, H), Y.reshape(T * B), P["W_hq"], P["b_q"])
    return total, Hx[T].copy()


# --------------------------------------------------- arrays (for api.py's validation)
# api.py decides what to check; these say how on this backend's arrays.

def as_array(name, a):
    """``a`` as a numpy array; a CUDA array is an error on the CPU."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        raise TypeError(f"{name}: a CUDA array needs device='cuda'")
    try:
        return np.asarray(a)
    except Exception as e:
        raise TypeError(f"{name}: expected an array, got {type(a).__name__} ({e})") from None


def normalized(name, a, dtype, copy=False):
    """C-contiguous, writeable, of ``dtype``: ``a`` itself only if it already is all that and no
    copy is asked for."""
    if copy:
        return np.array(a, dtype=dtype, order="C", copy=True)
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.writeable else a.copy()


def first_nonfinite(a):
    """None if every value is finite, else a description of the first one that is not."""
    if np.isfinite(a).all():
        return None
    bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
    return f"{a[bad]} at index {bad}"


def id_range(ids):
    return int(ids.min()), int(ids.max())


def stack_states(h0, Hs):
    """Hx (T+1,B,H) = h_0, h_1..h_T, as the forward keeps them."""
    return np.concatenate([h0[None], Hs])
