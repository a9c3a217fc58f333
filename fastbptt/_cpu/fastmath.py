"""Fast math for the CPU kernels: float32 tanh, exp and sigmoid that vectorize.

numba's ``np.tanh`` and ``np.exp`` compile to scalar libm calls; a step's or a softmax
row's loop over them does not vectorize.  For float32 these are branch-free rational /
polynomial approximations (max abs error of tanh ≈ 2.5e-7, relative error of exp ≈ 3e-7,
tested); float64 keeps numpy's functions, the accurate path.  Figures: docs/performance.md.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ..config import FASTMATH_POINTWISE

# --------------------------------------------------------------------------- tanh
# float32: Eigen's rational approximation (odd degree-13 polynomial over an even
# degree-6 one in x, input clamped to ±7.9053111), max abs error ≈ 2.5e-7, branch
# free so the step loop vectorizes; numba's np.tanh is a scalar libm call.  From
# |x| = 9.010914, where float32's tanh rounds to ±1, exactly ±1: a saturated unit's
# 1 − tanh² is 0, as in float32 arithmetic, not the clamp's 4.8e-7.
# float64: np.tanh (exact to 1 ulp; the float64 path is the accurate one).
_CLAMP = np.float32(7.90531110763549805)
_ONE_AT = np.float32(9.010914)
_A1, _A3, _A5, _A7 = (np.float32(4.89352455891786e-03), np.float32(6.37261928875436e-04),
                      np.float32(1.48572235717979e-05), np.float32(5.12229709037114e-08))
_A9, _A11, _A13 = (np.float32(-8.60467152213735e-11), np.float32(2.00018790482477e-13),
                   np.float32(-2.76076847742355e-16))
_B0, _B2, _B4, _B6 = (np.float32(4.89352518554385e-03), np.float32(2.26843463243900e-03),
                      np.float32(1.18534705686654e-04), np.float32(1.19825839466702e-06))


def _fast_float32(numpy_fn, float32_fn):
    """numpy_fn, usable inside @njit code, where a float32 argument takes float32_fn, a
    branch-free approximation that vectorizes (numba's own call is a scalar libm call)."""
    def fn(x):
        return numpy_fn(x)

    @overload(fn, jit_options={"fastmath": FASTMATH_POINTWISE, "error_model": "numpy"})
    def _fn(x):
        return float32_fn if x == types.float32 else (lambda x: numpy_fn(x))

    fn.__name__ = fn.__qualname__ = numpy_fn.__name__
    fn.__doc__ = f"{numpy_fn.__name__}(x), fast for float32 (see the module notes)"
    return fn


def _tanh_f32(x):
    one = np.float32(1) if x > 0 else np.float32(-1)
    saturated = abs(x) >= _ONE_AT
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
    return one if saturated else x * p / q


tanh = _fast_float32(np.tanh, _tanh_f32)


@njit(cache=True, fastmath=FASTMATH_POINTWISE, error_model="numpy")
def tanh_cpu(out, x):
    """out = tanh(x), elementwise (the kernels' tanh, exposed for tests) · out, x (N,)"""
    for i in range(x.shape[0]):
        out[i] = tanh(x[i])


# ---------------------------------------------------------------------------- exp
# float32 (the softmax): Cephes' expf, branch free so the row loop vectorizes:
# x = n·ln2 + r, |r| <= ln2/2, e^r by a degree-7 polynomial, 2^n from its exponent bits;
# x clamped to [-87.3, 88.3], where 2^n stays a normal float32.  float64: np.exp.
_EXP_LO, _EXP_HI = np.float32(-87.33654), np.float32(88.37626)
_LOG2E, _LN2_HI, _LN2_LO = np.float32(1.44269504088896341), np.float32(0.693359375), np.float32(-2.12194440e-4)
_E0, _E1, _E2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_E3, _E4, _E5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)


@intrinsic
def _pow2(typingctx, n):
    """2^n for an integral float32 n in [-126, 127]: the float32 with exponent bits n + 127"""
    def codegen(context, builder, sig, args):
        bits = builder.shl(builder.add(builder.fptosi(args[0], ir.IntType(32)), ir.IntType(32)(127)),
                           ir.IntType(32)(23))
        return builder.bitcast(bits, ir.FloatType())
    return types.float32(types.float32), codegen


def _exp_f32(x):
    x = _EXP_HI if x > _EXP_HI else x
    x = _EXP_LO if x < _EXP_LO else x
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - n * _LN2_HI - n * _LN2_LO
    p = r * _E0 + _E1
    p = p * r + _E2
    p = p * r + _E3
    p = p * r + _E4
    p = p * r + _E5
    p = p * (r * r) + r + np.float32(1)
    return p * _pow2(n)


exp = _fast_float32(np.exp, _exp_f32)


@njit(cache=True, fastmath=FASTMATH_POINTWISE, error_model="numpy")
def exp_cpu(out, x):
    """out = exp(x), elementwise (the kernels' exp, exposed for tests) · out, x (N,)"""
    for i in range(x.shape[0]):
        out[i] = exp(x[i])


# ------------------------------------------------------------------------ sigmoid


def sigmoid(x):
    """σ(x) = 1 / (1 + e^-x), the gates of the GRU and the LSTM: for float32 from the fast exp
    above, e = e^-|x|, σ = 1 / (1 + e) for x >= 0 and e / (1 + e) below (branch free, so a
    gate loop vectorizes; accurate relative to σ on both sides, so a closed gate is near 0,
    not the 1.2e-7 of ½ + ½ tanh(x/2), and 0 below −87.3); for float64 numpy's exp."""
    return 1.0 / (1.0 + np.exp(-x))


def _sigmoid_f32(x):
    e = exp(-abs(x))                 # clamped at e^-87.3: σ below that is 0 (float32's e^x is)
    s = np.float32(1) / (np.float32(1) + e)
    return s if x >= 0 else (np.float32(0) if x < _EXP_LO else e * s)       # NaN: e * s, NaN


@overload(sigmoid, jit_options={"fastmath": FASTMATH_POINTWISE, "error_model": "numpy"})
def _sigmoid(x):
    if x == types.float32:
        return _sigmoid_f32
    return lambda x: 1.0 / (1.0 + np.exp(-x))


@njit(cache=True, fastmath=FASTMATH_POINTWISE, error_model="numpy")
def sigmoid_cpu(out, x):
    """out = σ(x), elementwise (the kernels' sigmoid, exposed for tests) · out, x (N,)"""
    for i in range(x.shape[0]):
        out[i] = sigmoid(x[i])
