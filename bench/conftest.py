import numpy as np
import pytest

import fastbptt

#: (T, B, V, H) of the book's two settings
CONFIGS = {"d2l-scratch": (35, 32, 28, 512), "d2l-concise": (35, 32, 28, 256)}


@pytest.fixture(params=list(CONFIGS), scope="module")
def workload(request):
    T, B, V, H = CONFIGS[request.param]
    rng = np.random.default_rng(0)
    params = fastbptt.init_params(V, H, V, seed=0)
    X = rng.integers(0, V, (T, B))
    Y = rng.integers(0, V, (T, B))
    h0 = np.zeros((B, H), np.float32)
    return request.param, (T, B, V, H), params, X, Y, h0
