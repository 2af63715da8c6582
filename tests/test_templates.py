"""The kernel templates' contract: declared signatures, hook statements, the joined module."""

import re
import typing

import pytest
import torch

from flexebt.codegen import hooks, source
from flexebt.kernels import signatures
from flexebt.kernels.signatures import SIGNATURES, KernelSignature

GOOD = "t2 = hook.score(s_raw=s_raw, scale=scale, b=off_b, h=off_h, q_idx=q_idx, kv_idx=kv_idx)"


def test_every_entry_kernel_gets_its_declared_parameters():
    text = source.template_text("flex_attention")
    assert "__SIGNATURE__" not in text
    entries = re.findall(r"^def (flex_\w+)\((.*?)\):", text, flags=re.M | re.S)
    assert {name for name, _ in entries} == set(SIGNATURES)
    for name, params in entries:
        names = [p.split(":")[0].strip() for p in params.replace("__BUFFERS__", ",").split(",") if p.strip()]
        sig = SIGNATURES[name]
        assert names == [*sig.params, "HEAD_GROUP", *sig.constexprs], name


GROUPS = {name: cls for name, cls in vars(signatures).items()
          if isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")}


def test_argument_groups_keep_entry_points_narrow_and_flat():
    """Grouped arguments (block tables, query streams, own keys) keep every entry point at a few
    dozen parameters; a group never holds another (Triton 3.6 drops a nested group's specialised
    integers) and no field is optional."""
    assert max(sig.width for sig in SIGNATURES.values()) <= 40
    assert {"BlockArgs", "StreamArgs", "OwnArgs"} <= set(GROUPS)
    for cls in GROUPS.values():
        for field, kind in typing.get_type_hints(cls).items():
            assert kind in (torch.Tensor, int), (cls.__name__, field, kind)


def test_every_group_field_a_template_reads_is_declared():
    """``OWN.KP``, ``STREAM.Q``, ``BLOCKS.MB``, ...: each field read in the templates belongs to a
    declared group (a misspelt one would only fail when Triton compiles that pass)."""
    text = source.template_text("flex_attention")
    fields = set().union(*(cls._fields for cls in GROUPS.values()))
    read = set(re.findall(r"\b(?:OWN|STREAM2?|BLOCKS|KV_BLOCKS|Q2?_BLOCKS)\.(\w+)", text))
    assert read and read <= fields, read - fields


def test_bind_orders_by_declaration_and_refuses_unknown_or_missing_names():
    sig = KernelSignature("k", ("A", "B", "C"), frozenset({"B"}), ("X",))
    assert sig.bind(C=3, A=1) == (1, None, 3)
    with pytest.raises(TypeError, match="D"):
        sig.bind(A=1, C=3, D=4)
    with pytest.raises(TypeError, match="C"):
        sig.bind(A=1)
    with pytest.raises(TypeError, match="declared but not given"):
        sig.check_constexprs([])
    with pytest.raises(ValueError):
        KernelSignature("k", ("A", "A"), frozenset(), ())


def test_every_hook_statement_of_the_templates_is_declared():
    text = source.template_text("flex_attention")
    calls = re.findall(r"hook\.(\w+)\(", text)
    assert set(calls) == set(hooks.HOOKS)  # each declared hook is used, nothing undeclared is


@pytest.mark.parametrize("bad, why", [
    (GOOD.replace("s_raw=s_raw", "s_raw=a + b"), "pass a variable"),
    (GOOD.replace("kv_idx=kv_idx", "kv_idx=q_idx"), "must be the tile's kv_idx"),
    (GOOD.replace("b=off_b, ", ""), "takes the keywords"),
    (GOOD.replace("t2 = ", "t2, x = "), "has 1 outputs"),
    (GOOD.replace("hook.score", "hook.scores"), "unknown hook"),
])
def test_hook_statements_outside_the_declaration_are_refused(bad, why):
    with pytest.raises(ValueError, match=why):
        hooks.parse_call(bad, "")


def test_code_after_a_hook_and_an_unpaired_captured_gradient_are_refused():
    with pytest.raises(ValueError, match="a statement of its own"):
        hooks.expand_hooks(f"def f():\n    {GOOD}.to(x)\n", None)
    code = source.ModCode(None, None, {}, [], False)
    code.traced_score = type("S", (), {"loads": [type("L", (), {"learned": True})()], "name": "m"})()
    with pytest.raises(ValueError, match="needs a score_grad before it"):
        hooks.expand_hooks("def f():\n    hook.captured_grad(dt=dt, keep=keep)\n", code)


def test_a_name_defined_in_two_template_files_is_refused(monkeypatch):
    monkeypatch.setitem(source.TEMPLATE_FILES, "twice", ("common", "common"))
    with pytest.raises(ValueError, match="more than one template file"):
        source.template_text("twice")
