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
