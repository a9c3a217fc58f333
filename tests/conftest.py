import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))     # reference.py, helpers.py


@pytest.fixture
def rng(request):
    # a distinct, reproducible stream per test
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True, scope="session")
def _plans_of_the_tests(tmp_path_factory):
    # the sweep shapes the tests measure go to a plan of their own, not the user's
    from fastbptt._cpu import plan
    folder = tmp_path_factory.mktemp("plans")
    real = plan.cache_dir
    plan.cache_dir = lambda: folder
    plan.forget()
    yield
    plan.cache_dir = real
    plan.forget()
