"""Transformer blocks and linear roles read from the traced graph, not from names.

Names differ in every code base (timm's ``blocks.N.attn.qkv``, MobileViT's ``stages.2.1.transformer.0``,
CoaT's ``serial_blocks1.0``, LeViT's ``qkv.linear``, torchvision's ``mlp.0`` / ``mlp.3``); the data flow
does not. On the fx graph:

- an **attention core** is a ``scaled_dot_product_attention`` call, or a softmax with the matmul that
  forms its logits (q and k are that matmul's operands) and the matmul that applies it (v is the other
  operand; the core's output is that product);
- a linear whose output reaches a core's q, k or v operand before any other linear is ``q``, ``k`` or
  ``v`` (``qkv`` when it feeds more than one of them); a linear whose input comes from a core's output
  with no other linear in between is ``proj``;
- a linear whose output reaches the model's output with no linear in between is the ``head``;
- an MLP is a pair: ``fc2`` takes, through an activation function and no other linear, the output of
  ``fc1`` (one or more: gated MLPs have two), whose fan-out is ``fc2``'s fan-in, and ``fc2`` does not
  widen (fan-in >= fan-out);
- a **block** is an attention group (the linears of one or more cores) with the MLP that follows it,
  in execution order, named by the deepest module holding all of its linears.

Walks stop at linears and go at most ``_REACH`` nodes deep, so a residual stream that runs through
the whole model does not tie a linear to a distant core. Where the graph shows nothing (fx could not
trace the model, or the attention runs inside an untraced function), `role_of` / `block_of` on the
names is the fallback, and capture says which was used."""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

_REACH = 40  # nodes a walk may take from a linear
_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_SOFTMAX_FUNCS = (torch.softmax, F.softmax, torch.Tensor.softmax)
_MATMUL_FUNCS = (operator.matmul, torch.matmul, torch.bmm, torch.einsum, torch.baddbmm, torch.Tensor.matmul)
_MATMUL_METHODS = ("matmul", "bmm", "__matmul__")
_ACT_FUNCS = (F.gelu, F.relu, F.silu, F.hardswish, F.mish, F.elu, F.leaky_relu, F.relu6, F.hardsigmoid, F.sigmoid,
              torch.relu, torch.sigmoid, torch.tanh, F.tanh, F.glu)
_ACT_METHODS = ("relu", "sigmoid", "tanh", "gelu", "silu", "relu_", "sigmoid_", "tanh_")
_ACT_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Hardswish, nn.Mish, nn.ELU, nn.LeakyReLU, nn.ReLU6, nn.Sigmoid, nn.Tanh,
                nn.Hardsigmoid, nn.GLU)


@dataclass
class Core:
    """One attention: the nodes that are its q, k and v operands, and its output node."""

    q: set[fx.Node]
    k: set[fx.Node]
    v: set[fx.Node]
    out: fx.Node


def graph_structure(gm: fx.GraphModule, linear_nodes: dict[fx.Node, tuple[str, int, int]], *,
                    head: bool = True, through: dict[fx.Node, list[tuple[str, str]]] | None = None,
                    ) -> tuple[dict[str, str], dict[str, str]]:
    """Roles and blocks of the linears, read from the graph.

    ``linear_nodes``: each linear's node -> (site name, in_features, out_features). ``head``: whether
    the graph's output is the model's (not for the graph of a part of it). Returns (role by site name,
    block by site name); a site the graph says nothing about is absent from both. ``through``: a call of a
    function fx keeps whole that is given linear weights (torchvision's ``shifted_window_attention``) ->
    [(site name, role by name)]: an attention the graph cannot look into, at that call's place."""
    modules = dict(gm.named_modules())
    _mark_shape_nodes(gm)
    cores = _cores(gm, modules)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    names = {node: info[0] for node, info in linear_nodes.items()}
    roles: dict[str, str] = {}
    core_of: dict[str, int] = {}
    for node, (name, _, _) in linear_nodes.items():
        reached = _walk(node, linear_nodes, forward=True)
        slots = [(i, slot) for i, core in enumerate(cores) for slot in ("q", "k", "v") if reached & getattr(core, slot)]
        if slots:
            kinds = {slot for _, slot in slots}
            roles[name] = "qkv" if len(kinds) > 1 else kinds.pop()
            core_of[name] = slots[0][0]
        elif head and output in reached:
            roles[name] = "head"
        else:
            behind = _walk(node, linear_nodes, forward=False)
            fed = [i for i, core in enumerate(cores) if core.out in behind]
            if fed:
                roles[name], core_of[name] = "proj", fed[0]
    _mlp_roles(linear_nodes, modules, roles)
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    placed = [(position[n], [names[n]]) for n in linear_nodes]
    for node, members in (through or {}).items():
        roles.update({name: role if role in ("q", "k", "v", "qkv", "proj") else "qkv" for name, role in members})
        placed.append((position[node], [name for name, _ in members]))
    order = [name for _, group in sorted(placed, key=lambda p: p[0]) for name in group]
    return roles, _blocks(order, roles, core_of)


def _mlp_roles(linear_nodes, modules, roles: dict[str, str]) -> None:
    """fc1/fc2 pairs among the linears the attention pass left without a role."""
    for node, (name, fan_in, fan_out) in linear_nodes.items():
        if name in roles or fan_in < fan_out:
            continue
        feeding, activated = _walk_back_to_linears(node, linear_nodes, modules)
        if not activated or not feeding:
            continue
        first = [n for n in feeding if linear_nodes[n][2] == fan_in and linear_nodes[n][0] not in roles]
        if first and len(first) == len(feeding):
            roles[name] = "fc2"
            for n in first:
                roles[linear_nodes[n][0]] = "fc1"


def _blocks(order: list[str], roles: dict[str, str], core_of: dict[str, int]) -> dict[str, str]:
    """Group the linears into blocks (attention groups, then the MLP after them) and name each block by
    the deepest module that holds all of its linears."""
    groups: list[list[str]] = []
    has_mlp = False
    for name in order:
        role = roles.get(name)
        if role in ("q", "k", "v", "qkv", "proj"):
            if not groups or has_mlp:
                groups.append([])
                has_mlp = False
            groups[-1].append(name)
        elif role in ("fc1", "fc2"):
            if not groups or (has_mlp and role == "fc1" and _mlp_done(groups[-1], roles)):
                groups.append([])
            groups[-1].append(name)
            has_mlp = True
    blocks = {}
    for group in groups:
        block = _common_module(group)
        for name in group:
            blocks[name] = block
    return blocks


def _mlp_done(group: list[str], roles: dict[str, str]) -> bool:
    """Whether the group's last MLP already has its fc2 (a new fc1 then starts another MLP block)."""
    return bool(group) and roles.get(group[-1]) == "fc2"


def _common_module(names: list[str]) -> str:
    """The deepest module qualname that is a prefix of every name (a linear's parent at least)."""
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _walk(start: fx.Node, linear_nodes, *, forward: bool) -> set[fx.Node]:
    """Nodes reachable from `start` (its users, or its inputs) within _REACH steps, stopping at linears."""
    seen: set[fx.Node] = set()
    queue = deque([(n, 1) for n in _next(start, forward)])
    while queue:
        node, depth = queue.popleft()
        if node in seen or depth > _REACH:
            continue
        seen.add(node)
        if node in linear_nodes:
            continue
        queue.extend((n, depth + 1) for n in _next(node, forward))
    return seen


def _walk_back_to_linears(start, linear_nodes, modules) -> tuple[list[fx.Node], bool]:
    """Backward from a linear: the linears reached first, and whether an activation function lies between."""
    seen: set[fx.Node] = set()
    feeding: list[fx.Node] = []
    activated = False
    queue = deque([(n, 1) for n in _next(start, False)])
    while queue:
        node, depth = queue.popleft()
        if node in seen or depth > _REACH:
            continue
        seen.add(node)
        if node in linear_nodes:
            feeding.append(node)
            continue
        activated = activated or _is_activation(node, modules)
        queue.extend((n, depth + 1) for n in _next(node, False))
    return feeding, activated


def _next(node: fx.Node, forward: bool) -> list[fx.Node]:
    """Neighbours along the data flow: shape reads (``x.shape``, ``x.size()``) and what is computed from
    them only carry sizes, and would tie every tensor to every reshape."""
    if forward:
        return [n for n in node.users if not n.meta.get(_SHAPE_KEY)]
    return [n for n in node.all_input_nodes if n.op not in ("get_attr", "placeholder") and not n.meta.get(_SHAPE_KEY)]


_SHAPE_KEY = "wasi_compress_shape_only"
_SHAPE_ATTRS = ("shape", "dtype", "device", "ndim", "is_cuda")
_SHAPE_METHODS = ("size", "dim", "numel", "type", "get_device")


def _mark_shape_nodes(gm: fx.GraphModule) -> None:
    """Mark (node.meta) the nodes that compute sizes: shape reads and what depends on nothing else."""
    for node in gm.graph.nodes:
        reads = (node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in _SHAPE_ATTRS) \
            or (node.op == "call_method" and node.target in _SHAPE_METHODS)
        inputs = node.all_input_nodes
        derived = node.op == "call_function" and bool(inputs) and all(n.meta.get(_SHAPE_KEY) for n in inputs)
        node.meta[_SHAPE_KEY] = bool(reads or derived)


def _cores(gm: fx.GraphModule, modules) -> list[Core]:
    cores = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _SDPA:
            args = list(node.args[:3]) + [node.kwargs.get(k) for k in ("query", "key", "value")[len(node.args):]]
            q, k, v = ({a} if isinstance(a, fx.Node) else set() for a in args[:3])
            cores.append(Core(q, k, v, node))
        elif _is_softmax(node, modules):
            core = _softmax_core(node)
            if core is not None:
                cores.append(core)
    return cores


def _softmax_core(softmax: fx.Node) -> Core | None:
    """q and k: operands of the matmul that forms the logits (or, with no such matmul, as in CoaT's
    factorised attention, the softmax's own input is k); v: the other operand of the matmul applying it."""
    source = softmax.args[0] if softmax.args else softmax.kwargs.get("input")
    if not isinstance(source, fx.Node):
        return None
    logits = _first(source, _is_matmul, forward=False, include_start=True)
    q, k = (set(), {source}) if logits is None else ({_operands(logits)[0]}, set(_operands(logits)[1:2]))
    product = _first(softmax, _is_matmul, forward=True)
    if product is None:
        return None
    on_path = _ancestors_within(product, softmax)
    v = {a for a in _operands(product) if a not in on_path}
    return Core(q, k, v, product)


def _first(start: fx.Node, test, *, forward: bool, limit: int = 12, include_start: bool = False) -> fx.Node | None:
    """The nearest node passing `test` from `start` (breadth first, at most `limit` steps)."""
    seen, queue = set(), deque([(start, 0)])
    while queue:
        node, depth = queue.popleft()
        if node in seen or depth > limit:
            continue
        seen.add(node)
        if (include_start or node is not start) and test(node):
            return node
        queue.extend((n, depth + 1) for n in _next(node, forward))
    return None


def _ancestors_within(node: fx.Node, stop: fx.Node, limit: int = 12) -> set[fx.Node]:
    """The operands of `node` that descend from `stop` within `limit` steps."""
    out = set()
    for arg in _operands(node):
        seen, queue = set(), deque([(arg, 0)])
        while queue:
            n, depth = queue.popleft()
            if n in seen or depth > limit:
                continue
            seen.add(n)
            if n is stop:
                out.add(arg)
                break
            queue.extend((m, depth + 1) for m in _next(n, False))
    return out


def _operands(node: fx.Node) -> list[fx.Node]:
    args = node.args[1:] if node.target is torch.einsum else node.args
    if node.target is torch.baddbmm:
        args = node.args[1:3]
    return [a for a in args if isinstance(a, fx.Node)]


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMUL_FUNCS) or \
        (node.op == "call_method" and node.target in _MATMUL_METHODS)


def _is_softmax(node: fx.Node, modules) -> bool:
    if node.op == "call_function":
        return node.target in _SOFTMAX_FUNCS
    if node.op == "call_method":
        return node.target == "softmax"
    return node.op == "call_module" and isinstance(modules.get(node.target), nn.Softmax)


def _is_activation(node: fx.Node, modules) -> bool:
    if node.op == "call_function":
        return node.target in _ACT_FUNCS
    if node.op == "call_method":
        return node.target in _ACT_METHODS
    if node.op == "call_module":
        m = modules.get(node.target)
        return isinstance(m, _ACT_MODULES) or any(key in type(m).__name__ for key in ("GELU", "ReLU", "SiLU", "Swish", "Hardswish"))
    return False
