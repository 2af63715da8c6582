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

# A worker of a parallel run (pytest-xdist) keeps to one thread: the CPU tests are mostly Triton's
# interpreter (Python), and two workers with two torch threads each would fight over two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """The whole CPU suite (``python -m pytest`` with no test paths, no ``-n``) runs in one
    worker per CPU core when pytest-xdist is installed (it is in the test extras); a run of chosen
    files, the GPU tests (``-m gpu``) or FLEXEBT_TEST_WORKERS=0 stays in one process."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker itself runs its share in its own process
        return None
    try:
        import xdist  # noqa: F401
    except ImportError:
        return None
    opt = config.option
    chosen = [a for a in config.invocation_params.args if not str(a).startswith("-")]
    wanted = os.environ.get("FLEXEBT_TEST_WORKERS", str(min(os.cpu_count() or 1, 4)))
    if getattr(opt, "numprocesses", None) or chosen or "gpu" in (opt.markexpr or "").replace("not gpu", "") \
            or int(wanted) < 2:
        return None
    opt.numprocesses = int(wanted)
    opt.dist = "load"
    return None


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
