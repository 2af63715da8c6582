"""The kernel templates' contract: declared signatures, hook statements, the joined module."""

import ast
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


def test_each_pass_reads_only_the_fields_of_its_groups():
    """Follow each entry kernel's grouped parameters (their declared types, kernels/signatures.py)
    into the functions they are handed to: every field read on the way (``OWN.G_KP``,
    ``STREAM.Sq``) must be a field of that pass's group type -- a pass handed a group without
    the field would only fail when Triton compiles that branch."""
    tree = ast.parse(source.template_text("flex_attention").replace("__BUFFERS__", ""))
    funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    params = {name: [a.arg for a in f.args.args] for name, f in funcs.items()}
    reads, handed = {}, {}  # (function, parameter) -> fields read / (callee, parameter) it goes to
    for name, f in funcs.items():
        for node in ast.walk(f):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in params[name]:
                reads.setdefault((name, node.value.id), set()).add(node.attr)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in funcs:
                for i, arg in enumerate(node.args):
                    if isinstance(arg, ast.Name) and arg.id in params[name]:
                        handed.setdefault((name, arg.id), set()).add((node.func.id, params[node.func.id][i]))
    checked = 0
    for sig in SIGNATURES.values():
        for group, kind in sig.groups:
            todo, seen = [(sig.name, group)], set()
            while todo:
                at = todo.pop()
                if at in seen:
                    continue
                seen.add(at)
                extra = reads.get(at, set()) - set(kind._fields)
                assert not extra, f"{sig.name}: {group} ({kind.__name__}) has no field {sorted(extra)} ({at[0]})"
                checked += len(reads.get(at, ()))
                todo.extend(handed.get(at, ()))
    assert checked > 50  # the walk found the reads


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
    code.traced_score = type("S", (), {"loads": [type("L", (), {"learned": True})()], "name": "m", "no_derivative": ""})()
    with pytest.raises(ValueError, match="needs a score_grad before it"):
        hooks.expand_hooks("def f():\n    hook.captured_grad(dt=dt, keep=keep)\n", code)


def test_a_name_defined_in_two_template_files_is_refused(monkeypatch):
    monkeypatch.setitem(source.TEMPLATE_FILES, "twice", ("common", "common"))
    with pytest.raises(ValueError, match="more than one template file"):
        source.template_text("twice")
