"""Shared test helpers: tolerances per dtype and random cases."""
import numpy as np

#: Tolerances per compute dtype, written once: relative to the reference, with an
#: absolute floor scaled by the largest reference magnitude of the same array.
TOL = {np.float64: dict(rtol=1e-9, floor=1e-12), np.float32: dict(rtol=3e-4, floor=3e-5)}


def assert_close(got, want, dtype, name=""):
    tol = TOL[np.dtype(dtype).type]
    want = np.asarray(want, np.float64)
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    atol = tol["floor"] * max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=atol, err_msg=name)


def make_case(rng, T=5, B=2, D=11, H=7, Q=11, dtype=np.float64, dense=False, h0=True, scale=0.5):
    """Random params (std `scale`, large enough that tanh is nonlinear), inputs, targets, h0."""
    params = {
        "W_xh": rng.normal(0, scale, (D, H)), "W_hh": rng.normal(0, scale, (H, H)),
        "b_h": rng.normal(0, 0.1, H), "W_hq": rng.normal(0, scale, (H, Q)), "b_q": rng.normal(0, 0.1, Q),
    }
    params = {k: v.astype(dtype) for k, v in params.items()}
    X = rng.normal(0, 1, (T, B, D)).astype(dtype) if dense else rng.integers(0, D, (T, B))
    Y = rng.integers(0, Q, (T, B))
    hh = rng.normal(0, 0.5, (B, H)).astype(dtype) if h0 else None
    return params, X, Y, hh
