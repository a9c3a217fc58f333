"""Kernel-level properties of fastbptt._cpu not visible through the API."""
import numpy as np

from fastbptt import _cpu


def test_float32_tanh_is_accurate_everywhere():
    x = np.concatenate([np.linspace(-20, 20, 400001), [0.0, 1e-30, -1e-8, 7.9, 7.91, 100.0, -100.0]])
    x = x.astype(np.float32)
    out = np.empty_like(x)
    _cpu.tanh_cpu(out, x)
    err = np.abs(out.astype(np.float64) - np.tanh(x.astype(np.float64)))
    assert err.max() < 1e-6
    assert np.all(np.abs(out) <= 1.0)
    assert np.all(np.sign(out) == np.sign(x))


def test_float64_tanh_is_numpy():
    x = np.linspace(-10, 10, 1001)
    out = np.empty_like(x)
    _cpu.tanh_cpu(out, x)
    np.testing.assert_allclose(out, np.tanh(x), rtol=1e-15, atol=1e-16)


def test_softmax_head_is_stable_for_huge_logits():
    Hs = np.array([[1000.0, -1000.0], [0.0, 0.0]], np.float32)
    W_hq = np.eye(2, dtype=np.float32)
    b_q = np.zeros(2, np.float32)
    Y = np.array([1, 0])
    dHs = np.empty_like(Hs)
    dW, db, logits = np.empty((2, 2), np.float32), np.empty(2, np.float32), np.empty((2, 2), np.float32)
    loss = _cpu.head_forward_backward_cpu(dHs, dW, db, logits, Hs, Y, W_hq, b_q, 1.0)
    assert np.isfinite(loss) and abs(loss - (2000.0 + np.log(2))) < 1e-2
    assert np.all(np.isfinite(dHs)) and np.all(np.isfinite(dW))
