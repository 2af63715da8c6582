"""Backend switch: keyword wins over FLEXEBT_BACKEND; unknown names raise."""

import pytest
import torch

import flexebt
from flexebt.backends import requested_backend


def _qkv():
    return [torch.randn(1, 1, 4, 8) for _ in range(3)]


def test_default_is_auto_and_reference_runs_on_cpu():
    assert requested_backend(None) == "AUTO"
    ref = flexebt.flex_attention(*_qkv(), kernel_options={"BACKEND": "REFERENCE"})
    assert ref.shape == (1, 1, 4, 8)


def test_env_var_and_keyword_precedence(monkeypatch):
    monkeypatch.setenv("FLEXEBT_BACKEND", "reference")
    assert requested_backend(None) == "REFERENCE"
    assert requested_backend({"BACKEND": "AUTO"}) == "AUTO"
    monkeypatch.setenv("FLEXEBT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FLEXEBT_BACKEND"):
        flexebt.flex_attention(*_qkv())
    # The keyword wins, so a bad environment value is not consulted.
    assert flexebt.flex_attention(*_qkv(), kernel_options={"BACKEND": "REFERENCE"}).shape == (1, 1, 4, 8)


def test_other_kernel_options_are_accepted_like_torch():
    out = flexebt.flex_attention(*_qkv(), kernel_options={"BLOCK_M": 64, "BACKEND": "AUTO"})
    assert out.shape == (1, 1, 4, 8)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        flexebt.flex_attention(*_qkv(), kernel_options={"BACKEND": "TRITON"})


def test_triton_rejects_float64_and_huge_head_dims(monkeypatch):
    x = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        flexebt.flex_attention(x, x, x, kernel_options={"BACKEND": "TRITON"})
    y = torch.randn(1, 1, 4, 512)
    with pytest.raises(ValueError, match="head dims up to 256"):
        flexebt.flex_attention(y, y, y, kernel_options={"BACKEND": "TRITON"})
    # AUTO never fails for these: it takes the reference.
    assert flexebt.flex_attention(y, y, y).shape == y.shape


def test_auto_picks_reference_on_cpu(monkeypatch):
    from flexebt.backends import resolve_backend

    assert resolve_backend(None, torch.device("cpu"), "f", dtype=torch.float32) == "REFERENCE"
    assert resolve_backend(None, torch.device("cuda"), "f", dtype=torch.float64) == "REFERENCE"
    assert resolve_backend(None, torch.device("cuda"), "f", dtype=torch.float32, head_dim=512) == "REFERENCE"


def test_import_does_not_load_the_compiler():
    """``import flexebt`` leaves torch's compiler (dynamo) unloaded: it costs about as much as
    importing torch, and only compiled calls and the first kernel call need it."""
    import subprocess
    import sys

    code = "import sys, flexebt; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.interpreter
def test_kernel_backwards_are_skipped_by_dynamo_once_used():
    """The kernel Functions' backward rules are marked for dynamo to skip before the first kernel
    call runs (a traced backward would not be differentiable again)."""
    import flexebt.autograd as A

    q = torch.randn(1, 1, 16, 16, requires_grad=True)
    flexebt.flex_attention(q, q, q, kernel_options={"BACKEND": "TRITON"}).sum().backward()
    assert A._SKIPPED_BY_DYNAMO[0]
    for fn in A._EAGER_FUNCTIONS:
        assert getattr(fn.backward, "_torchdynamo_disable", False), fn.__name__
