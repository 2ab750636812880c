"""The exact fold of a suffix's head: gating commutes with per-channel ops that map 0 to 0.

Switching channel k of A off (d_k = 0) and then applying any op that acts on each channel alone and maps
an all-zero channel to zero (ReLU and other activations with f(0) = 0, max / average pooling, flatten,
eval-mode dropout) equals applying the op and then switching the channel off. So when the suffix after
the layer is such ops followed by a Linear, the Linear's output for the gated network n of image s is

    y_sn = Q_s d_sn + b,    Q_s[o, k] = Σ_pos W[o, k, pos] · p_s[k, pos]

with p_s the head's output of the ungated A_s (`[K, pos]`, channel-major as `flatten` lays it out): one
head pass an image instead of N, no gated copies, and a [K] -> [O] product per perturbation instead of
the Linear on K·pos features. BatchNorm and any other affine op map 0 elsewhere and are not folded; nor
is anything that mixes channels or branches. `find_fold` reads this from the fx graph of the suffix and
says why when it does not apply.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

# elementwise modules with f(0) = 0 (Hardtanh only when its range holds 0: checked below)
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish,
                        nn.Tanh, nn.Identity, nn.Hardtanh)
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.mish,
                          torch.tanh, F.tanh}
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}


# Q_s by einsum for this many calls of a distillation, then from the weight laid out once as [K, O, P]: the
# layout costs about what 4-6 einsum calls lose (VGG16 fc6, 411 MB: 0.15-0.22 s against 27-37 ms a call on 2 cores,
# benchmarks/speed/bench_fold.py), so short runs do not pay it and long ones run faster.
LAYOUT_AFTER_CALLS = 4


@dataclass
class Fold:
    """A suffix split at its first Linear: head (GraphModule A [B, K, H, W] -> p, per channel: [B, K, h, w]
    or [B, K·h·w] channel-major or [B, K]), the Linear's weight [O, K·P] and bias [O] or None, and tail
    (GraphModule y [M, O] -> logits [M, C_out]). ops: the folded ops, for `Importance.meta`."""
    head: fx.GraphModule
    weight: Tensor
    bias: Tensor | None
    tail: fx.GraphModule
    ops: list[str]
    _by_channel: dict = field(default_factory=dict, repr=False)  # (dtype, K) -> weight as [K, O, P]
    _calls: int = field(default=0, repr=False)  # calls of logits on a head with positions (P > 1)

    def logits(self, A: Tensor, gates: Tensor) -> Tensor:
        """The logits of the N gated networks of every image: A Tensor[B, K, H, W], gates Tensor[B, N, K]
        (bool or 0/1) -> Tensor[B·N, C_out], row s·N + n for image s, perturbation n, equal to the suffix
        run on A · gates[s, n] (up to float rounding)."""
        B, K = A.shape[:2]
        N = gates.shape[1]
        p = self.head(A).reshape(B, K, -1)  # [B, K, P]
        O, P = self.weight.shape[0], p.shape[2]
        if self.weight.shape[1] != K * P:
            raise ValueError(f"the folded Linear takes {self.weight.shape[1]} features, the head gives {K}x{P}")
        d = gates.to(p.dtype)
        if P == 1:  # a pooled head ([B, K]): y_sn = W (d_sn * p_s), one GEMM over all B·N rows
            y = (d * p.transpose(1, 2)) @ self.weight.to(p.dtype).T  # [B, N, O]
        elif self._calls < LAYOUT_AFTER_CALLS and (p.dtype, K) not in self._by_channel:
            self._calls += 1  # a short run: Q_s by einsum, which permutes the weight at every call
            Q = torch.einsum("okp,bkp->bok", self.weight.to(p.dtype).reshape(O, K, P), p)  # [B, O, K]
            y = torch.bmm(d, Q.transpose(1, 2))  # [B, N, O] = Q_s d_sn
        else:  # a long one: the weight laid out once as [K, O, P], Q_s one batched GEMM per call
            Qt = torch.bmm(self._weight_by_channel(p.dtype, K), p.permute(1, 2, 0))  # [K, O, B]: Q_s, per image
            y = torch.bmm(d, Qt.permute(2, 0, 1))  # [B, N, O] = Q_s d_sn
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return self.tail(y.reshape(B * N, -1))

    def _weight_by_channel(self, dtype: torch.dtype, K: int) -> Tensor:
        """The Linear's weight as [K, O, P] (a batch of K matrices [O, P]), laid out once per dtype, so
        that Q_s is one batched GEMM per call instead of a permuted copy of the weight per call."""
        key = (dtype, K)
        if key not in self._by_channel:
            O = self.weight.shape[0]
            self._by_channel[key] = self.weight.to(dtype).reshape(O, K, -1).permute(1, 0, 2).contiguous()
        return self._by_channel[key]


def _describe(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return type(module).__name__
    return getattr(node.target, "__name__", str(node.target))


def _int_arg(node: fx.Node, position: int, name: str, default):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _step_kind(gm: fx.GraphModule, node: fx.Node) -> tuple[str | None, str]:
    """What a node of the head is: "elementwise" / "pool" (4D kept), "flatten" (4D -> channel-major 2D),
    "mean" (4D -> [B, K]), "linear" (the end), or None with the reason it does not fold."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Linear):
            return "linear", "Linear"
        if isinstance(m, nn.Hardtanh) and not (m.min_val <= 0 <= m.max_val):
            return None, f"{node.target} ({type(m).__name__}) maps 0 to {m.min_val if m.min_val > 0 else m.max_val}"
        if isinstance(m, _ELEMENTWISE_MODULES):
            return "elementwise", type(m).__name__
        if isinstance(m, nn.Dropout):
            return ("elementwise", "Dropout") if not m.training else (None, f"{node.target} (Dropout) in training mode")
        if isinstance(m, _POOL_MODULES):
            return "pool", type(m).__name__
        if isinstance(m, nn.Flatten):
            return ("flatten", "Flatten") if m.start_dim == 1 and m.end_dim == -1 else \
                (None, f"{node.target} (Flatten from dim {m.start_dim})")
        return None, f"{node.target} ({type(m).__name__}) is not a per-channel op that maps 0 to 0"
    if node.op == "call_function":
        fn = node.target
        if fn is F.linear:
            return "linear", "linear"
        if fn in _ELEMENTWISE_FUNCTIONS:
            return "elementwise", fn.__name__
        if fn is F.dropout:
            training = _int_arg(node, 2, "training", True)
            return ("elementwise", "dropout") if training is False else (None, "F.dropout with training=True")
        if fn in _POOL_FUNCTIONS:
            return "pool", fn.__name__
        if fn is torch.flatten:
            start, end = _int_arg(node, 1, "start_dim", 0), _int_arg(node, 2, "end_dim", -1)
            return ("flatten", "flatten") if start == 1 and end == -1 else (None, f"flatten({start}, {end})")
        return None, f"{_describe(node, None)} is not a per-channel op that maps 0 to 0"
    if node.op == "call_method":
        if node.target in ("relu", "relu_", "tanh"):
            return "elementwise", node.target
        if node.target == "flatten":
            start, end = _int_arg(node, 1, "start_dim", 0), _int_arg(node, 2, "end_dim", -1)
            return ("flatten", "flatten") if start == 1 and end == -1 else (None, f".flatten({start}, {end})")
        if node.target == "mean":
            dims = _int_arg(node, 1, "dim", None)
            keep = _int_arg(node, 2, "keepdim", False)
            if isinstance(dims, (tuple, list)) and sorted(d % 4 for d in dims) == [2, 3]:
                return ("mean", "mean") if not keep else ("pool", "mean")
            return None, f".mean({dims}) does not pool over space only"
        return None, f".{node.target}() is not a per-channel op that maps 0 to 0"
    return None, f"{node.op} {node.target}"


def find_fold(suffix: fx.GraphModule) -> tuple[Fold | None, str]:
    """The fold of `suffix` (the GraphModule after the layer) -> (Fold, "folded: ops + Linear") or
    (None, why not). The head must be a chain from the input (each node the only user of the one before)
    of per-channel ops with f(0) = 0, ending at a Linear (nn.Linear or F.linear of parameters); at most one
    flatten/mean, after which only elementwise ops."""
    nodes = list(suffix.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None, f"the suffix has {len(inputs)} inputs"
    chain: list[fx.Node] = []
    names: list[str] = []
    node, flat = inputs[0], False
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None, f"{node.name} has {len(users)} users (a branch or a skip connection)"
        nxt = users[0]
        if nxt.args[:1] != (node,):
            return None, f"{nxt.name} does not take {node.name} as its first input"
        kind, what = _step_kind(suffix, nxt)
        if kind is None:
            return None, what
        if kind == "linear":
            break
        if flat and kind != "elementwise":
            return None, f"{what} after the features were flattened"
        flat = flat or kind in ("flatten", "mean")
        chain.append(nxt)
        names.append(what)
        node = nxt
    linear = nxt
    if linear.op == "call_module":
        lin = suffix.get_submodule(linear.target)
        weight, bias = lin.weight, lin.bias
    else:
        w_node = _int_arg(linear, 1, "weight", None)
        b_node = _int_arg(linear, 2, "bias", None)
        if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr") or \
                (b_node is not None and not (isinstance(b_node, fx.Node) and b_node.op == "get_attr")):
            return None, "F.linear of computed weights"
        weight = _fetch(suffix, w_node.target)
        bias = _fetch(suffix, b_node.target) if b_node is not None else None
    head = _subgraph(suffix, inputs[0], chain, chain[-1] if chain else inputs[0])
    tail = _tail(suffix, linear, set(chain) | {inputs[0], linear})
    if tail is None:
        return None, "a computation after the Linear reads the folded ops"
    return Fold(head, weight.detach(), None if bias is None else bias.detach(), tail, names), \
        "folded: " + " -> ".join(names + ["Linear"])


def _fetch(gm: fx.GraphModule, target: str) -> Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _subgraph(gm: fx.GraphModule, placeholder: fx.Node, chain: list[fx.Node], last: fx.Node) -> fx.GraphModule:
    g = fx.Graph()
    env = {placeholder: g.placeholder("activation")}
    for n in chain:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[last])
    return fx.GraphModule(gm, g)


def _tail(gm: fx.GraphModule, linear: fx.Node, skip: set[fx.Node]) -> fx.GraphModule | None:
    g = fx.Graph()
    env = {linear: g.placeholder("first_linear")}
    for n in gm.graph.nodes:
        if n in skip:
            continue
        if any(isinstance(a, fx.Node) and a in skip and a is not linear for a in n.all_input_nodes):
            return None
        if n.op == "output":
            g.output(fx.map_arg(n.args[0], lambda a: env[a]))
        else:
            env[n] = g.node_copy(n, lambda a: env[a])
    tail = fx.GraphModule(gm, g)
    tail.graph.eliminate_dead_code()
    tail.recompile()
    return tail


__all__ = ["Fold", "find_fold"]
