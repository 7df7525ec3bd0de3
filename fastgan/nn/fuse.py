"""``fastgan.fuse``: swap layer + activation runs of an existing model for fused layers.

Recognised runs (a layer directly followed by its activation):

* ``nn.Linear`` -> activation                      becomes ``FusedLinear``
* ``nn.Conv{1,2,3}d`` / ``nn.ConvTranspose{1,2,3}d`` -> activation   becomes ``Conv*Act`` / ``ConvTranspose*Act``
* ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` -> activation              becomes ``BatchNormAct1d`` / ``BatchNormAct2d``

with activation one of ``nn.ReLU``, ``nn.LeakyReLU`` (slope >= 0), ``nn.Tanh``, ``nn.Sigmoid``
(``inplace`` or not): the ``module`` column of the activation table
(``fastgan.ops.activations.ACTIVATIONS``). The fused layer takes the layer's place and an
``nn.Identity`` the activation's, so every ``state_dict`` key stays as it was (activations hold no
state) and checkpoints load both ways; the fused layer holds the SAME parameter and buffer tensors
(optimizers built before fusing keep working).

Where: inside ``nn.Sequential`` (consecutive children), and inside other modules whose ``forward``
``torch.fx`` can trace: there a child layer is fused when its output goes only to an activation
child, each called exactly once in ``forward``. (If other methods of such a module call that
activation child directly, they will find an ``nn.Identity``: pass such modules to fuse() in parts.)
fx records the one path through ``forward`` that its tracing took, so a module whose ``forward`` (or
a method of its own that ``forward`` calls) branches in Python -- ``if``, conditional expressions,
``and`` / ``or``, loops with a condition, ``try`` -- is not fused at that level: a branch not taken
while tracing (``if noise is None``, ``if not self.training``) could put work between a layer and
its activation. Its children are still fused. Branches inside other helper functions stay invisible.
A traced ``forward`` that calls a grandchild (``self.block.fc(x)``) does not get it replaced: the
child's own forward may call it without the activation; nor is a module that forward may reach by
another name (registered twice, ``self.act2 = self.act``, or also held in a plain list / dict). A
Sequential child that its parent's code -- any method but ``__init__``, e.g. a ``features()`` for
feature matching -- walks through (``for layer in self.body``, ``self.body[1]``,
``enumerate(self.body)``) is not fused inside, since outputs between its children may be read
(feature taps); nor are the Sequentials in a ModuleList / Sequential whose elements that code walks
in turn (``for block in self.blocks: for layer in block``). One called whole is. Other side
effects of a forward (storing a layer's output on the module) are invisible to fuse().
Only exact types are fused: subclasses, layers with hooks (e.g. the old ``spectral_norm``),
parametrized layers and anything else are left as they are.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import functools
import inspect
import itertools
import textwrap
from collections import Counter

import torch
from torch import fx, nn

from fastgan.nn.layers import CONV_ACT_OF, FusedLinear
from fastgan.ops.activations import activation_of_module

__all__ = ["fuse"]


def fuse(module: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace layer -> activation runs in ``module`` with fused layers; returns the fused module.

    ``inplace=True`` changes ``module`` itself (what ``fastgan.Trainer`` does). ``inplace=False``
    leaves ``module``'s structure untouched and returns a new module tree that shares its parameter
    and buffer tensors (so both see the same training). Outputs, gradients and running statistics
    are those of the original module up to floating-point rounding, in train and eval mode.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    if not inplace:
        shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
        # Tensors kept as plain attributes are shared too: some are not graph leaves and cannot be
        # deep-copied at all (spectral_norm's / weight_norm's computed ``weight`` after a forward).
        for sub in module.modules():
            shared.update((id(v), v) for v in vars(sub).values() if isinstance(v, torch.Tensor))
        module = copy.deepcopy(module, shared)
    _fuse_tree(module, _batch_norm_act_classes())
    return module


def _batch_norm_act_classes() -> dict[type, type]:
    try:
        from fastgan.nn.batch_norm_act import BatchNormAct1d, BatchNormAct2d
    except ImportError:  # BatchNorm fusion not available in this build: those runs stay unfused
        return {}
    return {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d}


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _activation(m: nn.Module) -> tuple[str, float | None] | None:
    """(act, alpha) of a recognised activation module (a row of the activation table), else None."""
    if _has_hooks(m):
        return None
    return activation_of_module(m)


def _fused_layer(m: nn.Module, act: str, alpha: float | None, bn_classes: dict[type, type]) -> nn.Module | None:
    """The fused twin of layer ``m`` followed by ``act``, sharing m's tensors; None if m is not fusable."""
    if _has_hooks(m):
        return None
    kind = type(m)
    if kind is nn.Linear:
        return FusedLinear.from_linear(m, act, alpha)
    if kind in CONV_ACT_OF:
        if getattr(m, "padding_mode", "zeros") != "zeros" and kind not in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            return None
        return CONV_ACT_OF[kind].from_conv(m, act, alpha)
    if kind in bn_classes:
        return bn_classes[kind].from_batchnorm(m, act, alpha)
    return None


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _fuse_tree(m: nn.Module, bn_classes: dict[type, type], as_container: bool = False, deep: bool = False) -> None:
    """``as_container``: ``m`` is an ``nn.Sequential`` its parent does not (only) call but iterates,
    indexes or hands on (``for layer in self.body``, ``self.body[0]``): the output between two of its
    children may be read, so runs in it are left alone (its children are still fused inside).
    ``deep``: ``m`` is a container whose elements the parent walks through in turn (``for block in
    self.blocks: for layer in block``): the Sequentials inside it, down its container chain, are
    containers too."""
    containers: set[str] = set()
    deep_children: set[str] = set()
    if type(m) is nn.Sequential:
        if not as_container:
            _fuse_sequential(m, bn_classes)
    elif next(m.children(), None) is not None:
        _fuse_traced(m, bn_classes)
        containers, deep_children = _children_used_as_containers(m)
    for name, child in m.named_children():
        child_deep = type(child) in _CONTAINERS and (name in deep_children or (deep and type(m) in _CONTAINERS))
        _fuse_tree(child, bn_classes, as_container=name in containers or child_deep, deep=child_deep)


def _fuse_sequential(seq: nn.Sequential, bn_classes: dict[type, type]) -> None:
    i = 0
    while i < len(seq) - 1:
        act = _activation(seq[i + 1])
        fused = _fused_layer(seq[i], *act, bn_classes) if act is not None else None
        if fused is not None:
            seq[i], seq[i + 1] = fused, nn.Identity()
            i += 2
        else:
            i += 1


class _ShallowTracer(fx.Tracer):
    """Traces one module's forward with every child as an opaque call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


_BRANCHES = (ast.If, ast.IfExp, ast.While, ast.BoolOp, ast.Try, ast.Match)


def _reached_code(cls: type, follow):
    """(fn, parsed source or None) for ``cls``'s forward and each function ``follow(fn, tree)`` names
    from a function already reached, each once."""
    todo, seen = _own_methods(cls, "forward"), set()
    while todo:
        fn = todo.pop()
        if fn in seen:
            continue
        seen.add(fn)
        tree = _source_tree(fn)
        yield fn, tree
        if tree is not None:
            todo.extend(follow(fn, tree))


def _forward_branches(m: nn.Module) -> bool:
    """Whether ``m``'s forward, or Python code it calls -- methods of ``m``'s class reached as
    ``self.<name>(...)``, ``super().<name>(...)`` or ``<Class>.<name>(self, ...)``, and functions of their
    modules called by name -- branches in Python (or cannot be read): fx would record only the path its
    tracing took. Calls reached any other way stay invisible."""
    cls = type(m)

    def callees(fn, tree):
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Attribute):  # self.x(...), super().x(...), Base.x(self, ...)
                yield from _own_methods(cls, node.func.attr)
            elif isinstance(node.func, ast.Name):  # a helper function of the module
                target = fn.__globals__.get(node.func.id)
                if _own_code(target):
                    yield target

    for _, tree in _reached_code(cls, callees):
        if tree is None or any(isinstance(node, _BRANCHES) or (isinstance(node, ast.comprehension) and node.ifs)
                               for node in ast.walk(tree)):
            return True
    return False


def _self_name(tree: ast.Module) -> str | None:
    """The name of the first parameter ("self", whatever it is called) of the function ``tree`` holds."""
    defs = [d for d in tree.body if isinstance(d, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return defs[0].args.args[0].arg if defs and defs[0].args.args else None


def _children_used_as_containers(m: nn.Module) -> tuple[set[str], set[str]]:
    """(walked, deep): the names of ``m``'s Sequential children that ``m``'s own code -- every method
    of its class but ``__init__``, not only forward (a ``features()`` method for a feature-matching
    loss) -- walks through instead of calling (see :func:`_walked_through`), and the names of its
    container children (Sequential, ModuleList, ModuleDict) whose ELEMENTS that code walks through in
    turn (``for block in self.blocks: for layer in block``, ``self.blocks[0][1]``). Such a
    Sequential's intermediate outputs may be read (feature taps), so fusing a layer with the
    activation after it would change what they see."""
    cls = type(m)
    kinds = {name: type(child) for name, child in m.named_children() if type(child) in _CONTAINERS}
    if not kinds:
        return set(), set()
    used: set[str] = set()
    deep: set[str] = set()
    for fn in _own_functions(cls):
        tree = _source_tree(fn)
        me = _self_name(tree) if tree is not None else None
        if me is None:
            continue
        parent = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == me
                    and node.attr in kinds):
                continue
            up = parent.get(id(node))
            if kinds[node.attr] is nn.Sequential and _walked_through(node, up):
                used.add(node.attr)
            if _elements_walked(tree, node, parent):
                deep.add(node.attr)
    return used, deep


def _own_functions(cls: type):
    """The Python functions (methods and property getters) of ``cls`` and its bases outside torch, but
    those that build the model: ``__init__`` and the methods it calls on ``self`` (an init helper such as
    ``reset_parameters``, transitively; ``forward`` always counts), unless other code of the class calls
    them too. Building the model walks its containers to initialise them, not to read features."""
    named = []
    for k in cls.__mro__:
        for name, f in vars(k).items():
            fn = f.fget if isinstance(f, property) else getattr(f, "__func__", f)
            if _own_code(fn) and all(fn is not other for _, other in named):
                named.append((name, fn))
    calls = {id(fn): _self_calls(fn) for _, fn in named}
    building, todo = {"__init__"}, ["__init__"]
    while todo:
        name = todo.pop()
        for other, fn in named:
            if other == name:
                for called in calls[id(fn)] - building:
                    building.add(called)
                    todo.append(called)
    building.discard("forward")  # called by nn.Module.__call__ (an __init__ may run it once to infer shapes)
    called_elsewhere = set().union(*(calls[id(fn)] for name, fn in named if name not in building))
    for name, fn in named:
        if name not in building or (name != "__init__" and name in called_elsewhere):
            yield fn


def _self_calls(fn) -> set[str]:
    """Names of the methods ``fn`` calls on its ``self`` (``self.reset(...)``)."""
    tree = _source_tree(fn)
    me = _self_name(tree) if tree is not None else None
    if me is None:
        return set()
    return {node.func.attr for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == me}


def _elements_walked(tree: ast.AST, node: ast.AST, parent: dict) -> bool:
    """Whether an element of the container expression ``node`` (``self.<name>``) is itself walked
    through: ``self.x[0][1]``, ``for layer in self.x[0]``, or a name bound to its elements
    (``for block in self.x`` / ``enumerate(self.x)`` / ``.children()``, a comprehension, ``block =
    self.x[i]``) that is walked through elsewhere in the function."""
    up = parent.get(id(node))
    if isinstance(up, ast.Subscript) and up.value is node and _walked_through(up, parent.get(id(up))):
        return True
    names: set[str] = set()
    it, up_it = node, up
    if isinstance(up_it, ast.Attribute) and up_it.value is it and up_it.attr in _CHILD_LISTS | {"values", "items"}:
        call = parent.get(id(up_it))
        if isinstance(call, ast.Call) and call.func is up_it:
            it, up_it = call, parent.get(id(call))
    if isinstance(up_it, ast.Call) and it in up_it.args and isinstance(up_it.func, ast.Name) \
            and up_it.func.id in _ITERATING:
        it, up_it = up_it, parent.get(id(up_it))
    if isinstance(up_it, (ast.For, ast.AsyncFor, ast.comprehension)) and up_it.iter is it:
        names = {n.id for n in ast.walk(up_it.target) if isinstance(n, ast.Name)}
    elif isinstance(up, ast.Subscript) and up.value is node:
        assign = parent.get(id(up))
        if isinstance(assign, ast.Assign) and assign.value is up:
            names = {n.id for t in assign.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return any(isinstance(n, ast.Name) and n.id in names and _walked_through(n, parent.get(id(n)))
               for n in ast.walk(tree))


_ITERATING = {"iter", "enumerate", "list", "tuple", "zip", "reversed", "len", "next", "map", "filter", "sorted"}
_CHILD_LISTS = {"children", "named_children", "modules", "named_modules", "_modules"}


def _walked_through(node: ast.AST, up: ast.AST | None) -> bool:
    """Whether the expression ``node`` (``self.<name>``) is walked through rather than called: indexed or
    sliced, iterated (``for``, a comprehension, ``enumerate(...)``, ``list(...)`` ...) or asked for its
    children. Calling it, or handing it whole to a function (``data_parallel(self.main, x)``), is not."""
    if isinstance(up, ast.Subscript) and up.value is node:
        return True
    if isinstance(up, (ast.For, ast.AsyncFor, ast.comprehension)) and up.iter is node:
        return True
    if isinstance(up, ast.Call) and node in up.args and isinstance(up.func, ast.Name) and up.func.id in _ITERATING:
        return True
    return isinstance(up, ast.Attribute) and up.value is node and up.attr in _CHILD_LISTS


def _own_methods(cls: type, name: str) -> list:
    """Every definition of method ``name`` along ``cls``'s MRO (super() runs a base class's) that is
    Python code outside torch (nn.Module's own excluded)."""
    found = [vars(k)[name] for k in cls.__mro__ if name in vars(k)]
    return [fn for fn in (getattr(f, "__func__", f) for f in found) if _own_code(fn)]


@functools.lru_cache(maxsize=None)
def _source_tree(fn) -> ast.Module | None:
    """The parsed source of ``fn``, or None where it cannot be read (parsed once per function: a model's
    blocks share their class's methods)."""
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None


def _own_code(fn) -> bool:
    """A Python function outside torch (whose own modules fx traces as leaves or knows)."""
    return inspect.isfunction(fn) and not (fn.__module__ or "").startswith("torch")


def _fuse_traced(m: nn.Module, bn_classes: dict[type, type]) -> None:
    traced = isinstance(m, fx.GraphModule)
    aliased: set[int] = set()
    if traced:
        graph = m.graph  # already traced: its graph is its forward (no branches), targets may be dotted
    else:
        if _forward_branches(m):
            return
        try:
            with _attributes_kept(m):  # tracing runs forward: what it assigns (self.feats = h) is undone
                graph = _ShallowTracer().trace(m)
        except Exception:  # noqa: BLE001 - data-dependent control flow etc.: not traceable, leave this level
            return
        # fx names a module by the FIRST name it is registered under; forward may reach it through
        # another one (self.fc_alias = self.fc, a dict of activations): replacing the name fx gives
        # would leave the one forward calls as it was. Only modules reachable by one name are fused.
        aliased = _aliased_modules(m)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for node in list(graph.nodes):
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        if len(node.args) != 1 or node.kwargs or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_module" or calls[user.target] != 1 or user.args != (node,) or user.kwargs:
            continue
        if not (_owned_here(node.target, calls, traced) and _owned_here(user.target, calls, traced)):
            continue
        layer, act_module = m.get_submodule(node.target), m.get_submodule(user.target)
        if id(layer) in aliased or id(act_module) in aliased:
            continue
        act = _activation(act_module)
        fused = _fused_layer(layer, *act, bn_classes) if act is not None else None
        if fused is not None:
            _set_submodule(m, node.target, fused)
            _set_submodule(m, user.target, nn.Identity())


_MODULE_STATE = frozenset(vars(nn.Module()))  # nn.Module's own registries (_modules, _parameters, hooks ...)


@contextlib.contextmanager
def _attributes_kept(m: nn.Module):
    """Run a trace of ``m.forward`` without leaving its side effects on ``m``: attributes it assigns
    (fx Proxies, counters) are restored afterwards, and lists / dicts / sets it appends to are traced
    on copies."""
    saved = vars(m).copy()
    for key, value in saved.items():
        if key not in _MODULE_STATE and isinstance(value, (list, dict, set)):
            vars(m)[key] = copy.copy(value)
    try:
        yield
    finally:
        vars(m).clear()
        vars(m).update(saved)


def _aliased_modules(m: nn.Module) -> set[int]:
    """ids of the modules under ``m`` reachable by more than one path: registered under several names,
    or also held in a plain list / tuple / dict / set attribute of ``m``."""
    count = Counter(id(sub) for _, sub in m.named_modules(remove_duplicate=False))
    aliased = {i for i, n in count.items() if n > 1}
    for key, value in vars(m).items():
        if key in _MODULE_STATE:
            continue
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple, set, frozenset)) else ()
        aliased.update(id(v) for v in items if isinstance(v, nn.Module))
    return aliased


def _owned_here(target: str, calls: Counter, traced: bool) -> bool:
    """Whether a module this graph calls may be replaced from here. A direct child: yes. A deeper one
    (``self.block.fc(x)`` in a forward; the dotted targets of an fx-traced GraphModule) belongs to an
    intermediate module whose own forward may call it without the activation: only in a GraphModule,
    and only when no module on the path to it is itself called by the graph."""
    if "." not in target:
        return True
    if not traced:
        return False
    parts = target.split(".")
    return not any(calls[".".join(parts[:i])] for i in range(1, len(parts)))


def _set_submodule(m: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(m.get_submodule(parent) if parent else m, name, module)
