"""Splitting a model at a layer with torch.fx: a prefix (input -> the layer's output) and a suffix
(the layer's output -> the model's output), so that distillation runs the prefix once per image and
only the suffix on the N gated copies.

The layer named is kept whole (a leaf of the trace), as is every module without children, so
models whose modules branch on input sizes (timm's Conv2dSame) still trace. The cut is clean when
nothing computed before it, other than the layer's output, is used after it (a skip connection
around the layer makes the cut unclean); otherwise an error lists clean cut points nearby.

Threads. torch.fx's symbolic tracing replaces `torch.nn.Module.__call__` and `__getattr__` for the
whole process while it traces. chip_ext's tracer hands every module call and attribute read made by
any other thread straight to torch's own methods, so a forward running in another thread (the
user's, or chip_ext's on a traced model) is unaffected; chip_ext's traces never overlap (a lock,
so the process-wide patches are made and undone in order); and each model is traced once per
structure and layer (`cached_trace`: the traces are remembered per model, weakly). A torch.fx trace
that the user's own code starts in another thread at the same time is outside this guarantee:
torch.fx itself is not thread-safe.
"""
from __future__ import annotations

import copy
import difflib
import functools
import threading
import weakref

import torch
from torch import fx, nn


class SplitError(ValueError):
    """The model cannot be split at the requested layer (the message says why and what would work)."""


_TRACE_LOCK = threading.Lock()  # one chip_ext trace at a time: torch.fx's patches are process-wide
_TRACES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_TRACES_LOCK = threading.Lock()


class _LeafTracer(fx.Tracer):
    """Keeps `keep_whole` and every module without children whole. Calls and attribute reads from
    threads other than the tracing one pass through untouched (torch.fx's patch of nn.Module is
    process-wide); no function is auto-wrapped (torch.fx would patch module globals for it)."""

    def __init__(self, keep_whole: set[str]):
        super().__init__(autowrap_modules=(), autowrap_functions=())
        self.keep_whole = keep_whole
        self.owner = threading.get_ident()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.keep_whole:
            return True
        if next(m.children(), None) is None:  # no submodules: keep it whole
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != self.owner:  # another thread's forward: torch's own __call__
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self.owner:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def trace(model: nn.Module, keep_whole: set[str] | None = None) -> fx.GraphModule:
    """torch.fx trace of `model`, keeping `keep_whole` and every module without children whole
    (a new trace each call; `cached_trace` remembers them)."""
    tracer = _LeafTracer(set(keep_whole or ()))
    try:
        with _TRACE_LOCK:
            graph = tracer.trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure gets the same explanation
        raise SplitError(
            f"torch.fx could not trace {type(model).__name__} to split it: {type(err).__name__}: {err}. "
            "chip_ext splits the model at the layer with torch.fx; control flow that depends on tensor "
            "values or shapes must live inside a module without children (such modules are kept whole)."
        ) from err
    _prune_unused(graph)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _may_mutate(n: fx.Node) -> bool:
    """Whether a node may change a tensor in place or have another side effect (kept even if unused)."""
    if n.op == "call_method":
        return n.target.endswith("_") and not n.target.startswith("__")
    name = getattr(n.target, "__name__", "")
    inplace = n.kwargs.get("inplace") is True or any(a is True for a in n.args)  # F.relu(x, inplace=True)
    return (n.is_impure() or inplace or "out" in n.kwargs or name.endswith("_")
            or (getattr(n.target, "__module__", None) in ("_operator", "operator")
                and (name.startswith("i") or name in ("setitem", "delitem"))))


def _prune_unused(graph: fx.Graph) -> None:
    """Removes computations whose result nothing uses (e.g. what `select_output` drops from a tuple), so
    they are not taken for a skip connection around a layer. Modules and anything that may work in
    place are kept."""
    for n in reversed(list(graph.nodes)):
        if n.op in ("call_method", "call_function") and not n.users and not _may_mutate(n):
            graph.erase_node(n)


def structure(model: nn.Module) -> tuple:
    """The identity of the module tree (a module replaced or added makes another structure)."""
    return tuple(id(m) for m in model.modules())


def cached_trace(model: nn.Module, keep_whole: frozenset[str] = frozenset()) -> fx.GraphModule:
    """trace(model, keep_whole), remembered per model (weakly) while its modules stay the same
    objects: tracing costs more than a forward, and a model is traced once, not once per call."""
    key = ("trace", frozenset(keep_whole))
    shape = structure(model)
    with _TRACES_LOCK:
        hit = _TRACES.setdefault(model, {}).get(key)
    if hit is None or hit[0] != shape:
        hit = (shape, trace(model, set(keep_whole)))
        with _TRACES_LOCK:
            _TRACES.setdefault(model, {})[key] = hit
    return hit[1]


def select_output(model: nn.Module, key: int | str) -> nn.Module:
    """`model` returning only `output[key]` of its tuple or dict output (e.g. key=0, or "logits"), with the
    same module names, parameters and hooks (a shallow copy whose class overrides forward): chip_ext needs
    a model whose output is one logits tensor [B, C]."""
    cls = type(model)

    @functools.wraps(cls.forward)  # the original signature, which torch.fx reads to make its inputs
    def forward(self, *args, **kwargs):
        return cls.forward(self, *args, **kwargs)[key]

    selected = copy.copy(model)
    selected.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return selected


def output_problem(out, model: nn.Module) -> str | None:
    """Why a model output `out` (a value, or the traced graph's output argument) is not logits
    [B, C], with the way to wrap the model; None when it is one tensor."""
    if isinstance(out, (torch.Tensor, fx.Node)):
        return None
    if isinstance(out, dict):
        kind, keys = "a dict", f" with keys {list(out)[:6]}"
        example = repr(next(iter(out), "logits"))
    elif isinstance(out, (tuple, list)):
        kind, keys, example = f"a {type(out).__name__} of {len(out)} values", "", "0"
    else:
        kind, keys, example = f"a {type(out).__name__}", "", "0"
    return (f"{type(model).__name__}.forward returns {kind}{keys}; chip_ext needs a model that returns one "
            f"logits tensor [B, C]. Wrap it: chip_ext.select_output(model, {example}) keeps the module names "
            "and returns only that output")


def _input_dependent(nodes: list[fx.Node]) -> set[fx.Node]:
    dep: set[fx.Node] = set()
    for n in nodes:
        if n.op == "placeholder" or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def _leaks(nodes: list[fx.Node], cut_index: int, dep: set[fx.Node]) -> list[fx.Node]:
    """Input-dependent nodes before the cut (other than the cut) that are used after it."""
    after = set(nodes[cut_index + 1:])
    return [n for n in nodes[:cut_index] if n in dep and any(u in after for u in n.users)]


def clean_cut_points(model: nn.Module, gm: fx.GraphModule | None = None) -> list[str]:
    """Module names (in forward order) at which `split` can cut the model cleanly.

    A module qualifies when it is called once and nothing computed before its output (other than
    that output) is used after it. Containers qualify too (their output is their last node).
    """
    gm = gm if gm is not None else cached_trace(model)
    nodes = list(gm.graph.nodes)
    dep = _input_dependent(nodes)
    last: dict[str, int] = {}
    calls: dict[str, set[str]] = {}
    for i, n in enumerate(nodes):
        for key, value in n.meta.get("nn_module_stack", {}).items():
            path = value[0] if isinstance(value, tuple) else str(key)
            last[path] = i
            calls.setdefault(path, set()).add(str(key))
        if n.op == "call_module" and "nn_module_stack" not in n.meta:  # older torch: leaves only
            last[str(n.target)] = i
            calls.setdefault(str(n.target), set()).add(n.name)
    names = []
    for path, i in sorted(last.items(), key=lambda kv: (kv[1], -kv[0].count("."))):
        if path and len(calls[path]) == 1 and nodes[i] in dep and not _leaks(nodes, i, dep):
            names.append(path)
    return names


def _unknown_layer(model: nn.Module, layer: str) -> SplitError:
    names = [name for name, _ in model.named_modules() if name]
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return SplitError(f"layer {layer!r} is not a module of {type(model).__name__} "
                      f"(see model.named_modules()).{hint}")


def split(model: nn.Module, layer: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Returns (prefix, suffix): prefix(x) is `layer`'s output A; suffix(A) is the model's output."""
    if layer not in dict(model.named_modules()) or layer == "":
        raise _unknown_layer(model, layer)
    gm = cached_trace(model, frozenset({layer}))
    nodes = list(gm.graph.nodes)
    problem = output_problem(nodes[-1].args[0], model)
    if problem:
        raise SplitError(problem)
    cuts = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == layer]
    if not cuts:
        raise SplitError(f"layer {layer!r} is never called in {type(model).__name__}.forward, so its "
                         "output cannot be perturbed")
    if len(cuts) > 1:
        raise SplitError(f"layer {layer!r} is called {len(cuts)} times in forward (a shared module); "
                         "its output is not one tensor to perturb")
    ci = cuts[0]
    cut = nodes[ci]
    dep = _input_dependent(nodes)
    leaks = _leaks(nodes, ci, dep)
    if leaks:
        valid = clean_cut_points(model)
        position = {name: i for i, name in enumerate(valid)}
        flat = list(dict(model.named_modules()))
        here = flat.index(layer)
        near = sorted(valid, key=lambda name: abs(flat.index(name) - here) if name in flat else 1 << 30)[:6]
        near = sorted(near, key=position.get)
        raise SplitError(
            f"cannot cut {type(model).__name__} cleanly at {layer!r}: "
            f"{', '.join(n.name for n in leaks[:5])} computed before it "
            f"{'is' if len(leaks) == 1 else 'are'} used after it (a skip connection around the layer). "
            f"Clean cut points near it: {', '.join(repr(v) for v in near) or 'none found'}")

    # prefix: everything up to the cut, returning the cut's output
    prefix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes[:ci + 1]:
        env[n] = prefix_graph.node_copy(n, lambda a: env[a])
    prefix_graph.output(env[cut])

    # suffix: a placeholder for the cut's output, then everything after it; input-independent nodes
    # from before the cut (constants, parameters read by get_attr) are copied over as needed
    suffix_graph = fx.Graph()
    senv: dict[fx.Node, fx.Node] = {cut: suffix_graph.placeholder("activation")}

    def lookup(a: fx.Node) -> fx.Node:
        if a not in senv:
            senv[a] = suffix_graph.node_copy(a, lookup)
        return senv[a]

    for n in nodes[ci + 1:]:
        senv[n] = suffix_graph.node_copy(n, lookup)
    prefix = fx.GraphModule(gm, prefix_graph, f"{type(model).__name__}Prefix")
    suffix = fx.GraphModule(gm, suffix_graph, f"{type(model).__name__}Suffix")
    return prefix, suffix


_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _is_global(size) -> bool:
    return size in (1, (1, 1), [1, 1])


def _spatial_dims(dims) -> bool:
    """dims (a literal of the traced call) are H and W of a 4-D tensor: (2, 3) or (-2, -1)."""
    return (isinstance(dims, (tuple, list)) and all(isinstance(d, int) for d in dims)
            and {d % 4 for d in dims} == {2, 3})


def _ends_spatial(gm: fx.GraphModule, n: fx.Node, reshapes: bool = False) -> bool:
    """Global pooling or flattening: where the feature maps end (CAM's layer is just before).
    reshapes: count view/reshape too (they also shuffle channels inside networks: ShuffleNet)."""
    import torch.nn.functional as F

    if n.op == "call_module":
        m = gm.get_submodule(str(n.target))
        return (isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and _is_global(m.output_size)) \
            or isinstance(m, nn.Flatten)
    if n.op == "call_function":
        if n.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            size = n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")
            return _is_global(size)
        if n.target is torch.flatten:
            return True
        if n.target in (torch.mean, torch.amax, torch.sum):
            dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            return _spatial_dims(dims)
    if n.op == "call_method":
        if n.target == "flatten" or (reshapes and n.target in ("view", "reshape")):
            return True
        if n.target in ("mean", "amax", "sum"):
            dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            return _spatial_dims(dims)
    return False


def default_layer(model: nn.Module) -> str:
    """The layer CAM would use: the last clean cut point before the feature maps end (the first global
    pooling or flattening that the rest of the network depends on alone), skipping pooling modules
    and containers whose output is one (so VGG16 gives its conv5_3 ReLU 'features.29', ResNet-50
    'layer4', timm's EfficientNet-Lite0 'bn2'). Static: read off the torch.fx graph (of the model in
    its current mode: pass it in eval mode, as distill does), no forward is run."""
    gm = cached_trace(model)
    nodes = list(gm.graph.nodes)
    problem = output_problem(nodes[-1].args[0], model)
    if problem:
        raise SplitError(problem)
    dep = _input_dependent(nodes)
    # the feature maps end at the first global pooling or flattening that is itself a clean cut: the
    # pooling of a squeeze-excitation block or an auxiliary head is not (the maps it came from are
    # used after it), nor is a reshape of a parameter
    end = None
    for reshapes in (False, True):  # view/reshape only when nothing else ends the maps
        end = next((i for i, n in enumerate(nodes)
                    if n in dep and _ends_spatial(gm, n, reshapes) and not _leaks(nodes, i, dep)), None)
        if end is not None:
            break
    if end is None:
        raise SplitError(f"{type(model).__name__} has no global pooling or flattening in its forward, so there is "
                         "no default layer: pass layers= (see chip_ext.split.clean_cut_points(model))")
    modules = dict(model.named_modules())
    index = {}
    for i, n in enumerate(nodes):
        for key, value in n.meta.get("nn_module_stack", {}).items():
            index[value[0] if isinstance(value, tuple) else str(key)] = i
        if n.op == "call_module" and "nn_module_stack" not in n.meta:
            index[str(n.target)] = i
    candidates = []
    for name in clean_cut_points(model, gm):
        i = index.get(name)
        out = nodes[i] if i is not None else None
        pooled = out is not None and out.op == "call_module" and isinstance(gm.get_submodule(str(out.target)),
                                                                              _POOL_MODULES)
        if i is not None and i < end and not pooled and not isinstance(modules.get(name), _POOL_MODULES):
            candidates.append((i, -name.count("."), name))
    if not candidates:
        raise SplitError(f"no clean cut point of {type(model).__name__} before its global pooling; pass layers=")
    return max(candidates)[2]
