"""loss_and_grad at the book's two settings, float32, beside a plain numpy BPTT.

One benchmark group per setting, both systems in it, so the table's ratios are
same-run ratios.  Compile time is excluded (a warm-up call before timing).
`make test` runs this file as a smoke check with benchmarking disabled.
"""
import numba
import numpy as np

import fastbptt
from fastbptt.peers import numpy_loss_and_grad


def _info(benchmark, name, shape):
    T, B, V, H = shape
    benchmark.group = name
    benchmark.extra_info.update(T=T, B=B, V=V, H=H, threads=numba.get_num_threads(), device="cpu")


def test_fastbptt(benchmark, workload):
    name, shape, params, X, Y, h0 = workload
    _info(benchmark, name, shape)
    want, _ = numpy_loss_and_grad(params, X, Y, h0)
    loss, _, _ = fastbptt.loss_and_grad(params, X, Y, h0)      # warm-up: compile outside the timer
    assert abs(loss - want) < 1e-4
    benchmark(fastbptt.loss_and_grad, params, X, Y, h0)


def test_numpy_reference(benchmark, workload):
    name, shape, params, X, Y, h0 = workload
    _info(benchmark, name, shape)
    loss, grads = numpy_loss_and_grad(params, X, Y, h0)
    _, want, _ = fastbptt.loss_and_grad(params, X, Y, h0)
    for k in want:
        np.testing.assert_allclose(grads[k], want[k], rtol=1e-3, atol=1e-6)
    benchmark(numpy_loss_and_grad, params, X, Y, h0)
