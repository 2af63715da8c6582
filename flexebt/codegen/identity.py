"""Which objects a mod depends on: the tensors it captures and a fingerprint of everything else.

The kernel cache keys generated code on ``fingerprint(mod)``; each call finds the mod's current
captured tensors with ``captured_tensors(mod)`` (and ``resolve`` follows the recorded access steps
inside ``torch.compile``).

Both come from one walk over everything the mod's code can reach:

- a function: its code object, closure cells, defaults and keyword defaults, and every global its
  code names (names of nested code objects and identifier-like string constants included);
- a bound method: its function, and the attributes of ``__self__`` that the function's code
  names; a ``functools.partial``: function, arguments and keywords; a callable object: its
  class's ``__call__`` (``forward`` for an ``nn.Module``) and the attributes that code names;
- an object reached that way (``self``, ``self.cfg``, a captured config object, a user module):
  the attributes named by the code that reached it, found without running any code: the
  instance ``__dict__``, an ``nn.Module``'s parameters / buffers / submodules, class attributes.
  A method or property of a user class that is named adds its own code's names, so
  ``self.helper()`` reading ``self.scale`` is covered.  Code that reads attributes by computed
  name (``getattr``, ``vars``, ``__dict__``, ``globals``, ``eval``) makes every attribute count;
- containers (list, tuple, dict, ``nn.ModuleList`` / ``ParameterList`` / ``ParameterDict`` /
  ``ModuleDict`` / ``Sequential``): every item.

Values that the trace bakes into the kernel (numbers, strings, dtypes) enter the fingerprint by
value; tensors by the metadata the generated code depends on (dtype, rank, requires_grad, device
type, one element or not), never by values or shape, which are kernel arguments; two routes to
one tensor enter as an alias, so the slot layout is part of the key.  An object that cannot be
described enters by identity with a strong reference held by the key: it stays alive as long as
the cache entry, so its ``id`` can never be reused by another object.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
from typing import Callable

import torch

from .. import runtime

_Module = torch.nn.Module
_CONTAINERS = (torch.nn.ModuleList, torch.nn.ParameterList, torch.nn.ParameterDict, torch.nn.ModuleDict,
               torch.nn.Sequential)


@dataclasses.dataclass
class Buffer:
    """A tensor the mod reads: its slot in the kernel's argument list."""

    tensor: torch.Tensor
    path: str  # where it was found, e.g. "closure[0]", "global:bias" or "self.bias"
    steps: tuple = ()  # how to read it again: ("cell", i), ("global", name), ("attr", name), ("item", key)


class Buffers(list):
    """``captured_tensors``' result: a list of ``Buffer`` that also knows the mod's name (messages)
    and the checks that pin everything else the kernel was generated for (``guards``)."""

    mod_name = "mod"
    guards: tuple = ()


# Top-level packages whose plain functions, classes and modules are taken as fixed: keyed by
# identity (or name), not walked.  A library function with a closure (``and_masks``) is walked.
_LIBRARY = frozenset({"torch", "triton", "numpy", "math", "builtins", "functools", "operator", "_operator",
                      "typing", "abc", "collections", "itertools", "_functools", "cmath", "enum", "types"})
# Names that let code read attributes or globals by computed name: every attribute counts.
_DYNAMIC = frozenset({"getattr", "vars", "__dict__", "globals", "locals", "eval", "exec", "attrgetter",
                      "methodcaller", "__getattribute__"})
# Dunders of a user class that never run from a mod's body.
_NOT_IMPLICIT = frozenset({"__init__", "__new__", "__repr__", "__str__", "__setattr__", "__delattr__", "__del__",
                           "__init_subclass__", "__module__", "__qualname__", "__doc__", "__dict__", "__weakref__",
                           "__annotations__", "__slots__", "__firstlineno__", "__static_attributes__",
                           "__getstate__", "__setstate__", "__reduce__", "__reduce_ex__", "__format__", "__dir__",
                           "__class_getitem__", "__orig_bases__", "__parameters__", "__abstractmethods__",
                           "_abc_impl", "__sizeof__", "__hash__", "__eq__", "__ne__"})

_ALL = object()          # "every attribute" name set
_MISSING = object()
_ATOMS = frozenset({int, bool, str, bytes, type(None), complex, torch.dtype, torch.device, torch.memory_format,
                    torch.layout, type(Ellipsis), range})
# Key tags: plain objects, so they can never equal a value atom or a name.
_F, _FLIB, _BM, _P, _CO, _L, _D, _OBJ, _MOD, _CLS, _END, _EMPTY, _REF, _TA, _SET = (object() for _ in range(15))


class _Ident:
    """Keys an object by identity; the strong reference keeps it (and so its id) alive."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return type(other) is _Ident and other.obj is self.obj


def _is_library(modname) -> bool:
    return isinstance(modname, str) and modname.partition(".")[0] in _LIBRARY


def _code_names(code: types.CodeType):
    """Names a code object can read as globals or attributes (nested code and identifier-like
    string constants included), or ``_ALL`` if it can read them by computed name."""
    hit = runtime.code_names.get(code)
    if hit is None:
        names, stack = set(), [code]
        while stack:
            c = stack.pop()
            names.update(c.co_names)
            for k in c.co_consts:
                if isinstance(k, types.CodeType):
                    stack.append(k)
                elif isinstance(k, str) and k.isidentifier():
                    names.add(k)
        hit = runtime.code_names.put(code, _ALL if names & _DYNAMIC else tuple(sorted(names)))
    return hit


def _callable_names(fn):
    """The names the code behind a callable can read (every name if unknown)."""
    t = type(fn)
    if t is types.FunctionType:
        return _code_names(fn.__code__)
    if t is types.MethodType:
        return _callable_names(fn.__func__)
    if t is functools.partial:
        return _callable_names(fn.func)
    if t is types.BuiltinFunctionType or isinstance(fn, torch._ops.OpOverloadPacket):
        return ()
    call = getattr(type(fn), "forward" if isinstance(fn, _Module) else "__call__", None)
    return _code_names(call.__code__) if type(call) is types.FunctionType else _ALL


def _reachable_names(root):
    """The names that any user function reachable from ``root`` can read (its closure cells,
    defaults, the globals its code names, partials, bound methods' functions), or ``_ALL``: an
    object the mod passes to a helper (``helper(cfg, x)`` reading ``cfg.scale``) is read by the
    helper's code, so the object is described with those names too."""
    t = type(root)
    if root is not None and t not in (types.FunctionType, types.MethodType, functools.partial):
        call = getattr(t, "forward" if isinstance(root, _Module) else "__call__", None)
        root = call if type(call) is types.FunctionType else None  # a callable object: its class's code
    names, seen, stack = set(), set(), [root]
    while stack:
        f = stack.pop()
        t = type(f)
        if t is types.MethodType:
            stack.append(f.__func__)
            continue
        if t is functools.partial:
            stack.append(f.func)
            stack.extend(f.args)
            stack.extend(f.keywords.values())
            continue
        if t is not types.FunctionType:
            continue
        if id(f) in seen or (f.__closure__ is None and _is_library(f.__module__)):
            continue
        seen.add(id(f))
        code_names = _code_names(f.__code__)
        if code_names is _ALL:
            return _ALL
        names.update(code_names)
        for cell in f.__closure__ or ():
            try:
                stack.append(cell.cell_contents)
            except ValueError:
                pass
        stack.extend(f.__defaults__ or ())
        stack.extend((f.__kwdefaults__ or {}).values())
        g = f.__globals__
        stack.extend(g[n] for n in code_names if n in g and type(g[n]) in (types.FunctionType, types.MethodType,
                                                                             functools.partial))
    return tuple(sorted(names))


def _union(a, b):
    if a is _ALL or b is _ALL:
        return _ALL
    if not b:
        return a
    extra = [n for n in b if n not in a]
    return a + tuple(extra) if extra else a


def _user_mro(cls) -> tuple:
    """The classes of ``cls.__mro__`` defined outside the library packages (cached per class)."""
    hit = runtime.user_classes.get(cls, cls.__mro__)  # a class whose bases were reassigned is looked at again
    if hit is None:
        hit = runtime.user_classes.put(cls, tuple(k for k in cls.__mro__ if not _is_library(k.__module__)), cls.__mro__)
    return hit


def _class_names(cls) -> tuple:
    """The attributes the user classes of ``cls`` define, but for data dunders (a dataclass's
    ``__dataclass_fields__``, ``__match_args__``: bookkeeping no mod reads, which reaches the
    dataclasses module's own objects)."""
    return tuple(dict.fromkeys(n for k in _user_mro(cls) for n, val in k.__dict__.items()
                               if not (n.startswith("__") and n.endswith("__")) or callable(val)
                               or type(val) in (staticmethod, classmethod, property)))


# the methods torch.autograd.Function.apply reads from a user's Function subclass
_FUNCTION_PROTOCOL = ("forward", "setup_context", "backward", "jvp", "vmap", "generate_vmap_rule")


def _is_function_class(c) -> bool:
    """A user's torch.autograd.Function subclass (its ``apply`` is torch's)."""
    return isinstance(c, type) and issubclass(c, torch.autograd.Function) and not _is_library(c.__module__)


def _class_attr(cls, name):
    """``name`` defined by a user class of ``cls.__mro__`` (read without running descriptors):
    (value, owning class) or (_MISSING, None).  Library classes' attributes are fixed code."""
    for klass in _user_mro(cls):
        d = klass.__dict__
        if name in d:
            return d[name], klass
    return _MISSING, None


def _flatten(chain) -> tuple:
    out = []
    while chain:
        chain, step = chain
        out.append(step)
    return tuple(reversed(out))


def _path(steps) -> str:
    parts = []
    for kind, arg in steps:
        if kind == "cell":
            parts.append(f"closure[{arg}]")
        elif kind == "global":
            parts.append(f"global:{arg}")
        elif kind == "attr":
            parts.append(f".{arg}" if parts else arg)
        elif kind == "type":
            parts.append("type()")
        else:
            parts.append(f"[{arg!r}]")
    return "".join(p if i == 0 or p.startswith((".", "[")) else "." + p for i, p in enumerate(parts))


class _Walk:
    """One pass over what a mod can read; ``key`` describes it, ``tensors`` lists its tensors."""

    __slots__ = ("key", "tensors", "memo", "tmemo", "keep", "steps", "guards", "where", "checks", "reach")

    def __init__(self, steps: bool, checks: bool = False):
        self.steps = steps  # build Buffer entries (captured_tensors) or only the key (fingerprint)
        self.checks = checks  # also record the guards of the compiled path
        self.key = []
        self.tensors = Buffers()
        self.memo = {}
        self.tmemo = {}
        self.keep = []
        self.guards = []
        self.where = {}  # memo key -> access steps of the first route to that object
        self.reach = ()  # names read by any function the mod can call (set by root)

    def guard(self, kind: str, chain, value=None):
        """Record a check on the value at ``chain``: how a compiled graph pins what the key holds
        (``guards_hold`` in the compiled path evaluates them while dynamo traces)."""
        if self.checks:
            self.guards.append((_flatten(chain), kind, value))

    # -- entry ------------------------------------------------------------------------------
    def root(self, mod):
        t = type(mod)
        self.reach = _reachable_names(mod)
        if t is types.FunctionType or t is types.MethodType or t is functools.partial or mod is None:
            self.value(mod, (), None)
            return
        attr = "forward" if isinstance(mod, _Module) else "__call__"
        func = None if isinstance(mod, type) else getattr(t, attr, None)
        if type(func) is types.FunctionType:  # a callable object: its class's __call__ / forward, and self
            self.key.append(_CO)
            self.function(func, ((None, ("type", None)), ("attr", attr)))
            self.obj(mod, _code_names(func.__code__), None)
        else:
            self.value(mod, (), None)

    # -- values -----------------------------------------------------------------------------
    def value(self, v, names, chain):
        emit = self.key.append
        t = type(v)
        if t in _ATOMS:
            emit(t)
            emit(v)
            self.atom_guard(v, chain)
        elif t is float:
            emit(t)
            emit(v if v == v and v != 0.0 else repr(v))  # -0.0 / nan by spelling
            self.atom_guard(v, chain)
        elif isinstance(v, torch.Tensor):
            self.tensor(v, chain)
        elif t is types.FunctionType:
            self.function(v, chain)
        elif t is types.MethodType:
            func = v.__func__
            emit(_BM)
            self.value(func, (), (chain, ("attr", "__func__")))
            fnames = _code_names(func.__code__) if type(func) is types.FunctionType else ()
            if _is_function_class(v.__self__):  # MyFn.apply: torch's apply reads the class's protocol
                fnames = ()                      # methods (cls() adds them), not whatever its code names
            self.value(v.__self__, fnames, (chain, ("attr", "__self__")))
        elif t is functools.partial:
            emit(_P)
            fnames = _callable_names(v.func)  # the arguments are read by the partial's function
            self.value(v.func, names, (chain, ("attr", "func")))
            self.value(v.args, fnames, (chain, ("attr", "args")))
            self.value(v.keywords, fnames, (chain, ("attr", "keywords")))
        elif t is tuple or t is list or (isinstance(v, (tuple, list)) and not hasattr(v, "__dict__")):
            emit(_L)
            emit(t)
            emit(len(v))
            self.guard("type", chain)
            self.guard("len", chain, len(v))
            for j, item in enumerate(v):
                self.value(item, names, (chain, ("item", j)))
        elif isinstance(v, dict) and not hasattr(v, "__dict__"):
            self.mapping(v, names, chain)
        elif t is types.ModuleType:
            self.module(v, names, chain)
        elif isinstance(v, type):
            self.cls(v, names, chain)
        elif t is frozenset or t is set:
            emit(_SET)
            self.guard("fixed", chain)
            try:
                emit(frozenset(v) if all(type(x) in _ATOMS for x in v) else _Ident(v))
            except TypeError:
                emit(_Ident(v))
        elif t is types.BuiltinFunctionType or t is types.BuiltinMethodType or t is types.WrapperDescriptorType \
                or t is types.MethodWrapperType or t is types.MethodDescriptorType or t is torch._ops.OpOverload \
                or t is torch._ops.OpOverloadPacket:
            emit(_REF)
            emit(_Ident(v))
            self.guard("fixed", chain)
        elif isinstance(v, enum.Enum):  # a member (an IntEnum's is also a number): one object, by identity
            emit(_REF)
            emit(_Ident(v))
            self.guard("fixed", chain)
        elif t.__module__ == "numpy" and hasattr(v, "tobytes"):  # arrays and scalars: baked by value
            emit(t)
            emit((v.dtype.str, v.shape, v.tobytes()))
            self.guard("numpy", chain)  # dynamo guards numpy values by shape only: refused when compiling
        elif isinstance(v, (int, float, complex, str, bytes)):  # a subclass of a number or a string: by value
            emit(t)
            base = next(b for b in (bool, int, float, complex, str, bytes) if isinstance(v, b))
            plain = base(v)
            emit(plain if not (base is float and (plain != plain or plain == 0.0)) else repr(plain))
            self.guard("type", chain)
            self.atom_guard(plain, chain)
        elif hasattr(v, "__dict__") or hasattr(type(v), "__slots__"):
            self.obj(v, names, chain)
        else:
            emit(_REF)
            emit(_Ident(v))
            self.guard("fixed", chain)

    def atom_guard(self, v, chain):
        """A baked number, string, dtype...: equal with its type; a nan or a zero by its spelling."""
        if type(v) is float and (v != v or v == 0.0):
            self.guard("float", chain, "nan" if v != v else v)
        else:
            self.guard("eq", chain, v)

    def tensor(self, v, chain):
        slot = self.tmemo.get(id(v))
        if slot is not None:
            self.key.append((_TA, slot))
            if self.checks:  # the second route must keep reaching the same tensor (one slot)
                self.guard("same", chain, self.where[("tensor", id(v))])
            return
        self.tmemo[id(v)] = len(self.tmemo)
        if self.checks:
            self.where[("tensor", id(v))] = _flatten(chain)
        self.keep.append(v)
        # (elements: none, one or more -- one element is read without an index; an empty tensor
        # gets its own kernels, whose trace refuses any read of it as torch does)
        self.key.append((v.dtype, v.dim(), v.requires_grad, v.is_cuda, v.device.type if not v.is_cpu else "cpu",
                         min(v.numel(), 2), wide_offsets(v)))
        if self.steps:
            steps = _flatten(chain)
            self.tensors.append(Buffer(v, _path(steps), steps))

    def _seen(self, memo_key, obj, chain) -> bool:
        """Emit a back-reference if ``obj`` was described already (cycles, shared objects); a
        compiled graph then checks that this route still reaches the object of the first."""
        ordinal = self.memo.get(memo_key)
        if ordinal is not None:
            self.key.append(_REF)
            self.key.append(ordinal)
            if self.checks:
                self.guard("same", chain, self.where[memo_key])
            return True
        self.memo[memo_key] = len(self.memo)
        self.keep.append(obj)
        if self.checks:
            self.where[memo_key] = _flatten(chain)
        return False

    def function(self, fn, chain):
        emit = self.key.append
        if self._seen(id(fn), fn, chain):
            return
        code = fn.__code__
        cells = fn.__closure__
        # a library function without a closure is fixed code (a method calling super() only closes
        # over its own class); one made by a library factory may close over the user's objects
        if _is_library(fn.__module__) and (cells is None or code.co_freevars == ("__class__",)):
            emit(_FLIB)
            emit(fn)  # functions compare by identity; the key holds it
            self.guard("fixed", chain)
            return
        emit(_F)
        emit(code)
        self.guard("fixed", chain)  # a function is pinned by its code object
        names = _code_names(code)
        if cells:
            for i, cell in enumerate(cells):
                try:
                    val = cell.cell_contents
                except ValueError:  # empty cell
                    emit(_EMPTY)
                    continue
                self.value(val, names, (chain, ("cell", i)))
        d = fn.__defaults__
        if d:
            self.value(d, names, (chain, ("attr", "__defaults__")))
        else:
            emit(None)
        kw = fn.__kwdefaults__
        if kw:
            self.value(kw, names, (chain, ("attr", "__kwdefaults__")))
        else:
            emit(None)
        self.named_entries(fn.__globals__, names, chain, "global")

    def named_entries(self, d: dict, names, chain, step: str):
        """The entries of a namespace (a function's globals, a module's dict) that the code names
        (every public one when it reads names it computes), each with its access step."""
        emit = self.key.append
        for name in (names if names is not _ALL else [n for n in d if not n.startswith("__")]):
            if name in d:
                emit(name)
                self.value(d[name], names, (chain, (step, name)))
        emit(_END)

    def mapping(self, v, names, chain):
        emit = self.key.append
        emit(_D)
        emit(type(v))
        emit(len(v))
        self.guard("type", chain)
        if all(type(k) in _ATOMS or type(k) is float for k in v):
            self.guard("keys", chain, tuple(v))
        else:
            self.guard("len", chain, len(v))
        for k, item in v.items():
            if type(k) in _ATOMS:
                emit(k)
            elif type(k) is float:
                emit(repr(k))
            else:
                emit(_Ident(k))
            self.value(item, names, (chain, ("item", k)))

    def module(self, m, names, chain):
        emit = self.key.append
        emit(_MOD)
        emit(m.__name__)
        self.guard("fixed", chain)
        if _is_library(m.__name__) or self._seen((id(m), names), m, chain):
            return
        self.named_entries(m.__dict__, names, chain, "attr")

    def cls(self, c, names, chain):
        emit = self.key.append
        emit(_CLS)
        emit(c)  # classes compare by identity; the key holds it
        self.guard("fixed", chain)
        if _is_library(c.__module__) or self._seen((id(c), names), c, chain):
            return
        if _is_function_class(c) and names is not _ALL:
            names = _union(names, _FUNCTION_PROTOCOL)  # what torch's Function.apply calls on the class
        names = self._expand(c, names)
        if names is _ALL:  # every attribute of its user classes
            names = _class_names(c)
        for name in names:
            val, owner = _class_attr(c, name)
            if val is not _MISSING:
                emit(name)
                self.class_value(val, names, (chain, ("attr", name)))
        emit(_END)

    def class_value(self, val, names, chain):
        """A class attribute (``chain`` reads ``getattr(cls, name)``): methods and properties by
        their functions, the rest as values."""
        t = type(val)
        if t is staticmethod:
            self.key.append(t)
            self.value(val.__func__, names, chain)
        elif t is classmethod:
            self.key.append(t)
            self.value(val.__func__, names, (chain, ("attr", "__func__")))
        elif t is property:
            self.key.append(t)
            self.value(val.fget, names, (chain, ("attr", "fget")))
            self.value(val.fset, names, (chain, ("attr", "fset")))
        else:
            self.value(val, names, chain)

    def _expand(self, cls, names):
        """``names`` plus the names read by the user-class methods / properties it names, and the
        user-class dunders Python calls implicitly (``__call__``, ``__getitem__``, operators)."""
        if names is _ALL:
            return _ALL
        user = _user_mro(cls)
        if not user:
            return names
        extra = [n for k in user for n, val in k.__dict__.items()  # (methods: data such as a dataclass's
                 if n.startswith("__") and n.endswith("__") and n not in _NOT_IMPLICIT  # fields are not called)
                 and (callable(val) or type(val) in (staticmethod, classmethod, property))]
        out = _union(names, tuple(dict.fromkeys(extra)))
        i = 0
        while out is not _ALL and i < len(out):
            val, owner = _class_attr(cls, out[i])
            i += 1
            if val is _MISSING:
                continue
            if type(val) in (staticmethod, classmethod):
                val = val.__func__
            funcs = (val.fget, val.fset) if type(val) is property else (val,)
            for f in funcs:
                if type(f) is types.FunctionType:
                    out = _union(out, _code_names(f.__code__))
        return out

    def obj(self, o, names, chain):
        emit = self.key.append
        cls = type(o)
        emit(_OBJ)
        emit(cls)
        self.guard("type", chain)
        if self._seen((id(o), names), o, chain):
            return
        d = getattr(o, "__dict__", None)
        if not isinstance(d, dict):
            d = None
        is_mod = isinstance(o, _Module)
        stores = (d.get("_parameters"), d.get("_buffers"), d.get("_modules")) if is_mod and d else ()
        names = _union(names, self.reach)  # an object handed to a helper is read by the helper's code
        if names is not _ALL:
            names = self._expand(cls, names)  # (code it reaches may read names it computes: _ALL)
        if names is _ALL:
            listed = list(d or ())
            for s in stores:
                listed += list(s or ())
            listed += _class_names(cls)
            names = tuple(dict.fromkeys(listed))
        user = _user_mro(cls)
        dynamic = any("__getattr__" in k.__dict__ or "__getattribute__" in k.__dict__ for k in user)
        for name in names:
            found = False
            if d is not None and name in d:
                emit(name)
                self.value(d[name], names, (chain, ("attr", name)))
                found = True
            for s in stores:
                if s and name in s:
                    emit(name)
                    self.value(s[name], names, (chain, ("attr", name)))
                    found = True
            val, owner = _class_attr(cls, name)
            if val is not _MISSING:
                found = True
                emit(name)
                if type(val) is types.MemberDescriptorType:  # a __slots__ attribute
                    slot = getattr(o, name, _MISSING)
                    if slot is _MISSING:
                        emit(_EMPTY)
                    else:
                        self.keep.append(slot)
                        self.value(slot, names, (chain, ("attr", name)))
                else:
                    self.class_value(val, names, ((chain, ("type", None)), ("attr", name)))
                    if (d is None or name not in d) and (type(val) in _ATOMS or type(val) is float):
                        # read through the instance too: an instance attribute set later shadows it
                        self.atom_guard(val, (chain, ("attr", name)))
            if not found and dynamic:
                try:
                    got = getattr(o, name, _MISSING)
                except Exception:  # noqa: BLE001 - an attribute that cannot be read does not count
                    got = _MISSING
                if got is not _MISSING:
                    self.keep.append(got)
                    emit(name)
                    self.value(got, names, (chain, ("attr", name)))
        if is_mod and isinstance(o, _CONTAINERS):  # indexed containers: every item
            listy = not isinstance(o, (torch.nn.ParameterDict, torch.nn.ModuleDict))
            for s in stores:
                for k, item in (s or {}).items():
                    emit(k)
                    self.value(item, names, (chain, ("item", int(k) if listy else k)))
        emit(_END)


def _mod_name(mod) -> str:
    if type(mod) is types.MethodType:
        return f"{type(mod.__self__).__name__}.{getattr(mod.__func__, '__name__', 'method')}"
    if type(mod) is functools.partial:
        return f"partial({_mod_name(mod.func)})"
    name = getattr(mod, "__qualname__", None) or getattr(mod, "__name__", None)
    return name if isinstance(name, str) else type(mod).__name__


def resolve(fn: Callable, steps: tuple):
    """Follow access steps from ``fn`` (attribute and index reads only, traceable by dynamo)."""
    obj = fn
    for kind, arg in steps:
        if kind == "cell":
            obj = obj.__closure__[arg].cell_contents
        elif kind == "item":
            obj = obj[arg]
        elif kind == "attr":
            obj = getattr(obj, arg)
        elif kind == "type":
            obj = type(obj)
        else:
            obj = obj.__globals__[arg]
    return obj


def captured_tensors(fn: Callable, guards: bool = False) -> Buffers:
    """The tensors a mod reads through its closure, defaults, globals, bound object, partial
    arguments and containers, in a deterministic order (the walk order of ``fingerprint``);
    with ``guards``, also the checks that pin the rest of the key (the compiled path's guards)."""
    return describe(fn, guards)[1]


def _walk_root(w: "_Walk", fn) -> None:
    try:
        w.root(fn)
    except RecursionError:
        raise NotImplementedError(
            f"flexebt: the mod {_mod_name(fn)!r} reaches more objects than flexebt can describe (it reads names it "
            f"computes -- getattr, vars, __dict__, globals(), eval -- so every attribute of every object it can "
            f"reach counts, and those reach whole libraries). Read what it needs by name (cfg.temperature instead "
            f"of getattr(cfg, 'temperature')), or capture the values in a closure.") from None


def describe(fn: Callable, guards: bool = False) -> tuple:
    """``(fingerprint(fn), captured_tensors(fn))`` from one walk."""
    w = _Walk(True, guards)
    _walk_root(w, fn)
    w.tensors.mod_name = _mod_name(fn)
    w.tensors.guards = tuple(w.guards)
    return tuple(w.key), w.tensors


def fingerprint(obj):
    """A hashable description of everything a mod's generated code can depend on (see the module
    docstring); equal fingerprints mean the same kernel serves both mods."""
    if obj is None:
        return None
    w = _Walk(False)
    _walk_root(w, obj)
    return tuple(w.key)


def storage_span(t: torch.Tensor) -> int:
    """Elements from the first to the last one ``t`` addresses (strides included: a view may
    address far past its numel; 0 for an empty tensor)."""
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0) if t.numel() else 0


def wide_offsets(t: torch.Tensor) -> bool:
    """Whether element offsets into ``t`` (strides included: a view may address far past its
    numel) can reach 2**31, so the kernels must compute them in int64.  An expanded tensor that
    requires grad reaches the kernels as a contiguous copy (``prepare_captured``), whose offsets
    go up to its numel: that counts too."""
    return max(storage_span(t), t.numel()) >= 2 ** 31
