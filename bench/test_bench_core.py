"""loss_and_grad (float32, full BPTT) beside each peer, per config of `fastbptt bench`.

One benchmark group per config with every system in it, so the table's ratios are
same-run ratios.  Each system is checked to give fastbptt's loss, then called once
to compile/warm up outside the timer.  A peer that is not installed is skipped.
`make test` runs this file as a smoke check with benchmarking disabled; `make bench`
times it.
"""
import numba
import pytest

from fastbptt import bench


@pytest.mark.parametrize("system", bench.SYSTEMS)
def test_loss_and_grad(benchmark, workload, system):
    name, (T, B, V, H), params, X, Y, h0 = workload
    want = bench.make_fastbptt(params, X, Y, h0)()
    try:
        fn = bench.MAKERS[system](params, X, Y, h0)
    except ImportError as e:
        pytest.skip(f"{system}: {e}")
    assert abs(fn() - want) <= 1e-4 * max(1.0, abs(want))      # same loss, and the warm-up call
    benchmark.group = name
    benchmark.extra_info.update(T=T, B=B, V=V, H=H, threads=numba.get_num_threads(), device="cpu",
                                gflop=bench.flops(T, B, V, H) / 1e9)
    benchmark(fn)
