import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", module="torch.nn.attention.flex_attention")

# Triton fixes its interpreter mode when it is first imported, so the session decides once:
# without CUDA the Triton kernels run in the interpreter (CPU tensors); with CUDA they compile,
# and the interpreter tests run only if TRITON_INTERPRET=1 was set by the caller.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(autouse=True)
def _seed_and_clean_env(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.delenv("FLEXEBT_BACKEND", raising=False)


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device (and TRITON_INTERPRET unset)")
    no_interp = pytest.mark.skip(reason="interpreter tests: run with TRITON_INTERPRET=1 (automatic without CUDA)")
    for item in items:
        if "gpu" in item.keywords and (not torch.cuda.is_available() or INTERPRET):
            item.add_marker(no_gpu)
        if "interpreter" in item.keywords and not INTERPRET:
            item.add_marker(no_interp)
