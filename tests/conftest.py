import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("SUPEREDIT_NO_PROGRESS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models are far faster single-threaded, above all on a busy 2-core machine.
torch.set_num_threads(1)

from helpers import FAMILIES, tiny_adapter  # noqa: E402


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def adapter(family):
    return tiny_adapter(family)
