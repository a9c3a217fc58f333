import pytest

from fastbptt import bench


@pytest.fixture(params=list(bench.CONFIGS), scope="module")
def workload(request):
    """(name, (T,B,V,H), params, X, Y, h0) for each config of the harness."""
    shape = bench.CONFIGS[request.param]
    return (request.param, shape) + bench.workload(*shape)
