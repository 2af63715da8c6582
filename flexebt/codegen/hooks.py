"""Where mod code enters the kernel templates: the hooks, declared once, and their expansion.

A template calls a hook as one statement (common.py of the templates shows the form):

    tu, dtds = hook.score_grad(s_raw=s_raw, scale=scale, b=off_b, h=off_h, q_idx=q_idx, kv_idx=kv_idx)

The keywords bind the hook's declared inputs to template variables, the names on the left receive
its declared outputs.  ``expand_hooks`` replaces every such statement with the code the mods
generate for it (``ModCode``), bound to those names, and rejects a call whose inputs or outputs
are not the declared ones.  The generated code may also read the tile context every hook sees:
``ZERO`` and ``VALID`` of the tile and the captured-tensor parameters.

The hooks, inputs -> outputs:

- ``score``: the modified score in the pass's units (templates/common.py): t = f(scale s_raw) in
  natural units, or, without a score_mod, scale s_raw log2 e (log2 units, one multiply).
- ``score_grad``: that score and f'(s) (dtds).
- ``captured_grad(dt, keep)``: adds dt df/dc to the gradient of each captured tensor c the score_mod
  reads (fp32 atomics where kept); reuses the loads of the ``score_grad`` before it in the same
  function.
- ``score_second``: the score, f', f'' and the captured tensors' terms ew = sum_c Gc f_c, ewds = sum_c Gc f_sc.
- ``captured_second_grad(gt, dt, a, keep)``: the captured tensors' second-order gradient (after a
  ``score_second`` in the same function).
- ``mask``: the mask_mod as a boolean tile (``valid`` where there is none).
- ``keep``: the tile's kept scores: ``valid`` where ``full`` (a compile-time constant: a full block
  runs no mask_mod), else ``valid`` and the mask.
"""

from __future__ import annotations

import ast
import dataclasses
import re

POSITION_INPUTS = ("b", "h", "q_idx", "kv_idx")
HOOKS = {
    "score": (("s_raw", "scale", *POSITION_INPUTS), 1),
    "score_grad": (("s_raw", "scale", *POSITION_INPUTS), 2),
    "captured_grad": (("dt", "keep"), 0),
    "score_second": (("s_raw", "scale", *POSITION_INPUTS), 5),
    "captured_second_grad": (("gt", "dt", "a", "keep"), 0),
    "mask": (("b", "h", "q_idx", "mq_idx", "kv_idx", "valid"), 1),
    "keep": (("full", "b", "h", "q_idx", "mq_idx", "kv_idx", "valid"), 1),
}
# a captured-gradient hook reuses the loads of this hook, earlier in the same function
PAIRED = {"captured_grad": "score_grad", "captured_second_grad": "score_second"}
# A position input must be the tile's variable of that position: a captured tensor indexed by a
# bare position is range-checked once on the host against that position's extent instead of per
# score (codegen/emit.py), which is only sound if the name really holds that position.
POSITION_VARIABLES = {"b": "off_b", "h": "off_h", "q_idx": "q_idx", "mq_idx": "mq_idx", "kv_idx": "kv_idx"}


@dataclasses.dataclass
class HookCall:
    name: str
    inputs: dict       # declared input -> template expression
    outputs: list      # names that receive the outputs
    indent: str


_START = re.compile(r"^(?P<indent>[ \t]*)(?:[\w, ]+=\s*)?hook\.(?P<name>\w+)\(", re.M)


def _statement_end(text: str, open_paren: int) -> int:
    """Index just past the ``)`` that closes the parenthesis at ``open_paren``."""
    depth = 0
    for i in range(open_paren, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError("flexebt templates: unclosed hook call")


def parse_call(statement: str, indent: str) -> HookCall:
    """A hook statement as a HookCall, checked against HOOKS."""
    node = ast.parse(statement.strip()).body[0]
    call = node.value
    name = call.func.attr
    if name not in HOOKS:
        raise ValueError(f"flexebt templates: unknown hook {name!r} (declared: {', '.join(HOOKS)})")
    declared, n_out = HOOKS[name]
    if call.args or [k.arg for k in call.keywords] != list(declared):
        raise ValueError(f"flexebt templates: hook {name} takes the keywords {', '.join(declared)} in that order, "
                         f"got {ast.unparse(call)}")
    for k in call.keywords:
        # bare names only: the expansion pastes an input into expressions as it is written
        if not isinstance(k.value, ast.Name):
            raise ValueError(f"flexebt templates: hook {name} input {k.arg}={ast.unparse(k.value)}: pass a variable "
                             f"(assign the expression to a name before the hook)")
        if POSITION_VARIABLES.get(k.arg, k.value.id) != k.value.id:
            raise ValueError(f"flexebt templates: hook {name} input {k.arg} must be the tile's "
                             f"{POSITION_VARIABLES[k.arg]}, got {k.value.id}")
    outputs = []
    if isinstance(node, ast.Assign):
        target = node.targets[0]
        outputs = [e.id for e in target.elts] if isinstance(target, ast.Tuple) else [target.id]
    if len(outputs) != n_out:
        raise ValueError(f"flexebt templates: hook {name} has {n_out} outputs, the template names {len(outputs)}")
    return HookCall(name, {k.arg: ast.unparse(k.value) for k in call.keywords}, outputs, indent)


def expand_hooks(text: str, code) -> str:
    """``text`` with every hook statement replaced by ``code.<hook>(call)`` (a list of lines) at the
    statement's indentation.  ``code.begin_function()`` is called at each ``def``, so a paired hook
    only sees the loads of its own function."""
    out, pos = [], 0
    for m in _START.finditer(text):
        if m.start() < pos:
            continue
        end = _statement_end(text, m.end() - 1)
        if text[end:text.find("\n", end)].strip():
            raise ValueError(f"flexebt templates: code after a hook call: {text[m.start():text.find(chr(10), end)]!r} "
                             f"(a hook is a statement of its own)")
        between = text[pos:m.start()]
        if re.search(r"^def ", between, re.M):
            code.begin_function()
        out.append(between)
        call = parse_call(text[m.start():end], m["indent"])
        out.append("\n".join(call.indent + line for line in getattr(code, call.name)(call)))
        pos = end
    out.append(text[pos:])
    return "".join(out)
