"""The float64 reference itself, checked with central finite differences."""
import numpy as np
import pytest

import reference
from helpers import make_case

EPS = 1e-6


def numeric_grad(f, arr, idx):
    old = arr[idx]
    arr[idx] = old + EPS
    up = f()
    arr[idx] = old - EPS
    down = f()
    arr[idx] = old
    return (up - down) / (2 * EPS)


@pytest.mark.parametrize("act", ["tanh", "relu", "identity"])
@pytest.mark.parametrize("dense", [False, True])
def test_reference_matches_finite_differences(act, dense, rng):
    params, X, Y, h0 = make_case(rng, T=4, B=3, D=5, H=4, Q=6, dense=dense)
    res = reference.loss_and_grad(params, X, Y, h0, act)
    arrays = dict(params, h0=h0)
    for name, arr in arrays.items():
        for _ in range(4):
            idx = tuple(rng.integers(0, n) for n in arr.shape)
            num = numeric_grad(lambda: reference.loss_only(params, X, Y, h0, act), arr, idx)
            assert abs(res.grads[name][idx] - num) <= 1e-7 + 1e-5 * abs(num), (name, idx)


def test_reference_truncated_k_ge_T_equals_full(rng):
    params, X, Y, h0 = make_case(rng, T=5)
    full = reference.loss_and_grad(params, X, Y, h0)
    trunc = reference.loss_and_grad(params, X, Y, h0, k=5)
    for name in full.grads:
        np.testing.assert_allclose(trunc.grads[name], full.grads[name], rtol=1e-12, atol=1e-14)
