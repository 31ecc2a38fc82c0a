"""Capture a model: trace it with torch.fx, record shapes in ``node.meta``, and find every linear
computation (``nn.Linear``-like modules and ``F.linear`` calls on parameters) with a role.

When fx cannot trace a model, capture falls back to forward hooks on its linear modules during a real
forward pass, and says so (``method == "hooks"``, ``note`` gives fx's error). Nothing is skipped
silently: a linear that will not be handled is listed in ``skipped`` with its reason."""

from __future__ import annotations

import contextlib
import io
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.overrides import TorchFunctionMode

from wasi_compress import _compat  # noqa: F401  (before timm)

# Module types that act as a linear layer: the layers register themselves in modules/registry.py
# (re-exported here: register_linear_type is part of capture's API).
from wasi_compress.modules.registry import _LINEAR_TYPES, is_linear_module, register_linear_type  # noqa: F401

_FUNCTIONAL_LINEARS = (F.linear, torch._C._nn.linear)


@dataclass
class LinearSite:
    """One linear computation of the model."""

    name: str                 # module qualname, or the weight's qualname for a functional linear
    kind: str                 # "module" or "functional"
    role: str                 # qkv, q, k, v, proj, fc1, fc2, head, other
    in_features: int
    out_features: int
    bias: bool
    weight_name: str          # qualified name of the weight parameter ("" for factored modules)
    bias_name: str | None     # None with bias=True means the bias is computed in forward (BEiT's q/v bias)
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    node: str | None = None   # fx node name, when traced
    calls: int = 0            # times it ran in the example forward pass
    block: str | None = None  # the transformer block it belongs to (a module qualname), None outside blocks
    through: str | None = None  # a function fx keeps whole that is given the module's weight and calls F.linear
                                # on it (torchvision's shifted_window_attention): the module is never called


@dataclass
class Capture:
    model: nn.Module
    graph_module: fx.GraphModule | None
    method: str               # "fx" or "hooks"
    note: str | None
    sites: list[LinearSite]
    skipped: list[dict[str, str]] = field(default_factory=list)
    example_input: Any = None
    structure: str = "names"  # where roles and blocks came from: "graph", "graph+names" or "names"


class WasiTracer(fx.Tracer):
    """fx tracer that knows timm's not-traceable modules and functions and keeps linear-like modules
    (ours included) as leaves."""

    def __init__(self, extra_leaf_types: tuple[type, ...] = ()):
        from timm.layers import get_notrace_functions, get_notrace_modules

        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self._leaf_types = tuple(get_notrace_modules()) + tuple(_LINEAR_TYPES) + tuple(extra_leaf_types)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace with WasiTracer; raises whatever fx raises when it cannot. Arguments of forward
    after the first that have a plain default (None, a bool, a number, a string: EVA's ``attn_mask=None,
    is_causal=False``) are traced at that default, not as inputs: the graph takes the model's input
    only, as the model is called, and nothing downstream (ONNX export) sees a flag turned into a tensor."""
    tracer = WasiTracer()
    graph = tracer.trace(model, concrete_args=_plain_defaults(model))
    _drop_specialised_inputs(graph)
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def _drop_specialised_inputs(graph: fx.Graph) -> None:
    """fx keeps a specialised argument as an input checked by asserts (``is_causal == False``); the
    checks are for callers passing it, and the graph is called with the model's input only: drop them,
    so an exporter never sees them."""
    import operator

    guards = {operator.eq, torch._assert, fx._symbolic_trace._assert_is_none}
    for ph in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        closure, stack = [], list(ph.users)
        while stack:
            node = stack.pop()
            if node not in closure:
                closure.append(node)
                stack.extend(node.users)
        if closure and all(n.op == "call_function" and n.target in guards for n in closure):
            for node in reversed(_topological(graph, closure)):
                graph.erase_node(node)
            graph.erase_node(ph)


def _topological(graph: fx.Graph, nodes: list[fx.Node]) -> list[fx.Node]:
    wanted = set(nodes)
    return [n for n in graph.nodes if n in wanted]


def _plain_defaults(model: nn.Module) -> dict[str, Any] | None:
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    plain = {p.name: p.default for p in params[1:]
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty
             and (p.default is None or isinstance(p.default, (bool, int, float, str)))}
    return plain or None


def role_of(name: str) -> str:
    """Role of a linear from its qualified name (timm, torchvision, HF BERT and common conventions)."""
    parts = [p for p in name.lower().split(".") if p not in ("weight", "bias")]
    last = parts[-1] if parts else ""
    if any(p.startswith("head") or p == "classifier" for p in parts) or (last == "fc" and len(parts) == 1):
        return "head"
    if last in ("qkv", "qk", "in_proj", "qkv_proj", "c_attn", "to_qkv"):  # qk: ConViT GPSA's fused q, k
        return "qkv"
    for role, names in (("q", ("q", "q_proj", "query", "to_q", "wq")),
                        ("k", ("k", "k_proj", "key", "to_k", "wk")),
                        ("v", ("v", "v_proj", "value", "to_v", "wv"))):
        if last in names:
            return role
    in_attention = any("attn" in p or "attention" in p for p in parts[:-1])
    if last in ("proj", "out_proj", "o_proj", "to_out", "wo") and (in_attention or last != "proj"):
        return "proj"
    if last == "dense" and "attention" in parts:
        return "proj"
    if last.startswith("fc1") or last in ("lin1", "w1", "w3", "up_proj", "gate_proj", "c_fc") or (last == "dense" and "intermediate" in parts):
        return "fc1"
    if last.startswith("fc2") or last in ("lin2", "w2", "down_proj") or (last == "dense" and "output" in parts):
        return "fc2"
    if last == "proj":
        return "proj"
    return "other"


def _module_site(name: str, m: nn.Module) -> LinearSite:
    attr = _LINEAR_TYPES[next(t for t in _LINEAR_TYPES if isinstance(m, t))]
    bias = getattr(m, "bias", None)
    return LinearSite(
        name=name, kind="module", role=role_of(name),
        in_features=int(m.in_features), out_features=int(m.out_features), bias=bias is not None,
        weight_name=f"{name}.{attr}" if name else attr, bias_name=(f"{name}.bias" if name else "bias") if bias is not None else None,
    )


def _record_module_calls(model: nn.Module, sites: dict[str, LinearSite]) -> list[Callable[[], None]]:
    """Forward hooks that record each linear module's input/output shapes and call count."""
    handles = []
    for name, m in model.named_modules():
        if name in sites:
            site = sites[name]

            def hook(_m, args, out, site=site):
                if site.calls == 0 and args and isinstance(args[0], torch.Tensor):
                    site.input_shape = tuple(args[0].shape)
                    site.output_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
                site.calls += 1

            handles.append(m.register_forward_hook(hook).remove)
    return handles


def capture(model: nn.Module, example_input: Any, *, rewrite_attention: bool = True) -> Capture:
    """Trace `model` (fx, else hooks), propagate shapes on `example_input`, and list its linears.

    With ``rewrite_attention`` (default), nn.MultiheadAttention modules are first rewritten in place into
    ExplicitMultiheadAttention so their projections are visible."""
    skipped = _hidden_attention(model, rewrite_attention)
    module_sites = {name: _module_site(name, m) for name, m in model.named_modules()
                    if is_linear_module(m) and not _inside(name, {s["name"] for s in skipped})}
    example = example_input if isinstance(example_input, tuple) else (example_input,)
    gm, note = _trace_or_note(model, example)
    functional: list[LinearSite] = []
    order: dict[str, int] = {}
    seen_functional: dict[str, None] = {}  # hooks path: parameters used as F.linear weights outside linear modules
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if gm is not None:
                gm, note = _shapes_on_graph(gm, model, module_sites, example, note)
                if gm is not None:
                    functional, order = _scan_graph(gm, module_sites, skipped)
            if gm is None:
                order, seen_functional = _run_with_hooks(model, module_sites, example)
    finally:
        model.train(was_training)
    if gm is not None:
        _weights_passed_to_functions(gm, module_sites)
    sites = _called_sites(module_sites, seen_functional, skipped) + functional
    if gm is not None:  # execution order is graph order (a site used through a function: that call's place)
        position = {node.name: i for i, node in enumerate(gm.graph.nodes)}
        sites.sort(key=lambda s: position.get(s.node, len(position)))
    else:
        sites.sort(key=lambda s: order.get(s.name, len(order)))
    structure = _roles_and_blocks(gm, sites, model)
    return Capture(model, gm, "fx" if gm is not None else "hooks", note, sites, skipped, example_input, structure)


def _roles_and_blocks(gm: fx.GraphModule | None, sites: list[LinearSite], model: nn.Module) -> str:
    """Each site's role and block from the graph (passes/structure.py); where the model's graph does not
    show a linear (fx could not trace the model, or it sits inside a module fx keeps as a leaf, such as
    timm's MobileVitBlock), from the graph of the largest traceable module holding it; from its name
    where no graph shows it. Returns where they came from."""
    roles: dict[str, str] = {}
    blocks: dict[str, str] = {}
    if gm is not None:
        _structure_of(gm, "", sites, roles, blocks, head=True)
    hidden = [s for s in sites if s.name not in roles and s.kind == "module"]
    if hidden and gm is not None:
        _structure_inside_leaves(gm, model, "", hidden, roles, blocks)
    elif hidden:
        for name, child in model.named_children():
            _structure_of_parts(child, f"{name}.", hidden, roles, blocks)
    from_names = 0
    for site in sites:
        if site.name in roles and not (roles[site.name] in ("other", "head") and site.role in _BLOCK_ROLES):
            site.role, site.block = roles[site.name], blocks.get(site.name)
        elif site.name in roles:  # the graph saw no block role where the name names one (HF BERT's output.dense)
            site.block = block_of(site.name)
        else:
            from_names += 1
            site.block = block_of(site.name) if site.role in _BLOCK_ROLES else None
    if from_names == len(sites):
        return "names"
    return "graph" if not from_names else "graph+names"


def _structure_of(gm: fx.GraphModule, prefix: str, sites: list[LinearSite], roles: dict, blocks: dict, *, head: bool) -> None:
    from wasi_compress.passes.structure import graph_structure

    by_target = {s.name: s for s in sites if s.kind == "module"}  # every call of a module
    by_node = {s.node: s for s in sites if s.kind == "functional"} if not prefix else {}
    linear_nodes = {}
    for node in gm.graph.nodes:
        site = by_target.get(prefix + str(node.target)) if node.op == "call_module" else by_node.get(node.name)
        if site is not None:
            linear_nodes[node] = (site.name, site.in_features, site.out_features)
    through: dict[fx.Node, list[tuple[str, str]]] = {}
    if not prefix:
        nodes = {n.name: n for n in gm.graph.nodes}
        for s in sites:
            if s.through and s.node in nodes:
                through.setdefault(nodes[s.node], []).append((s.name, s.role))
    if linear_nodes or through:
        found_roles, found_blocks = graph_structure(gm, linear_nodes, head=head, through=through)
        roles.update(found_roles)
        blocks.update(found_blocks)


def _structure_of_parts(module: nn.Module, prefix: str, sites: list[LinearSite], roles: dict, blocks: dict) -> None:
    """Trace `module` (named `prefix`) for the structure of the sites inside it; where fx cannot trace
    it, its children, one by one."""
    inside = [s for s in sites if s.name.startswith(prefix) and s.name not in roles]
    if not inside or is_linear_module(module):
        return
    try:
        gm = trace(module)
    except Exception:  # fx raises many error types; the children are tried next
        for name, child in module.named_children():
            _structure_of_parts(child, f"{prefix}{name}.", inside, roles, blocks)
        return
    _structure_of(gm, prefix, inside, roles, blocks, head=False)
    _structure_inside_leaves(gm, module, prefix, inside, roles, blocks)


def _structure_inside_leaves(gm: fx.GraphModule, module: nn.Module, prefix: str, sites: list[LinearSite],
                             roles: dict, blocks: dict) -> None:
    """The sites a traced graph hides inside leaf modules (called as a whole): trace those modules."""
    hidden = [s for s in sites if s.name not in roles]
    for node in gm.graph.nodes:
        if node.op != "call_module" or not any(s.name.startswith(f"{prefix}{node.target}.") for s in hidden):
            continue
        _structure_of_parts(module.get_submodule(node.target), f"{prefix}{node.target}.", hidden, roles, blocks)


_BLOCK_ROLES = ("qkv", "q", "k", "v", "proj", "fc1", "fc2")
_BLOCK = re.compile(r"(?:^|\.)(?:blocks|layers|layer)\.(\d+)(?=\.|$)")


def block_of(name: str) -> str | None:
    """The block a layer belongs to by its name (the fallback where the graph shows no structure): its
    name up to the last ``blocks.N`` / ``layers.N`` / ``layer.N`` (``encoder.layer.N`` in HF BERT,
    ``layers.S.blocks.B`` in Swin), or None outside the blocks."""
    last = None
    for m in _BLOCK.finditer(name):
        last = m
    return None if last is None else name[: last.end()]


def _hidden_attention(model: nn.Module, rewrite_attention: bool) -> list[dict[str, str]]:
    """Rewrite nn.MultiheadAttention (or, without the rewrite, list it as skipped)."""
    from wasi_compress.passes.attention import ExplicitAttentionPass

    if rewrite_attention:
        ExplicitAttentionPass()(model)
    return [{"name": name, "reason": "nn.MultiheadAttention hides its q/k/v projections (attention rewrite disabled)"}
            for name, m in model.named_modules() if type(m) is nn.MultiheadAttention]


def _trace_or_note(model: nn.Module, example: tuple) -> tuple[fx.GraphModule | None, str | None]:
    hf_note = ""
    if getattr(model, "hf_source", None) is not None and len(example) == 1:
        # transformers' own tracer first: it knows its models' control flow (the generic one does not)
        from wasi_compress.hf import trace_hf

        try:
            return trace_hf(model, example[0], tuple(_LINEAR_TYPES)), None
        except Exception as exc:  # HFTracer raises as many error types as fx does
            hf_note = f"transformers.utils.fx could not trace it ({type(exc).__name__}: {_first_line(exc)}); "
    try:
        return trace(model), (hf_note + "traced with the generic tracer") if hf_note else None
    except Exception as exc:  # fx raises many error types (TraceError, TypeError, AssertionError...)
        return None, (f"{hf_note}fx could not trace {type(model).__name__} ({type(exc).__name__}: {_first_line(exc)}); linears "
                      "were found with forward hooks; functional linears are listed as skipped")


def _shapes_on_graph(gm, model, module_sites, example, note):
    """Shapes on the traced graph. If the graph does not run on the example, run the model itself: if
    it fails too, its own error (e.g. a wrong input size) is what the user must see; if it runs, the
    graph is unfaithful and capture falls back to hooks, saying why."""
    handles = _record_module_calls(gm, module_sites)
    try:
        _propagate_shapes(gm, example)
    except Exception as exc:
        model(*example)
        cause = exc.__cause__ or exc
        note = (f"fx traced {type(model).__name__} but the graph failed on the example input "
                f"({type(cause).__name__}: {_first_line(cause)}); linears were found with forward hooks")
        for site in module_sites.values():
            site.calls, site.input_shape, site.output_shape, site.node = 0, None, None, None
        return None, note
    finally:
        for remove in handles:
            remove()
    return gm, note


def _run_with_hooks(model, module_sites, example) -> tuple[dict[str, int], dict[str, None]]:
    """One forward pass with hooks: call order, shapes, and F.linear weights outside linear modules."""
    handles = _record_module_calls(model, module_sites)
    call_order: list[str] = []
    for name, m in model.named_modules():
        if name in module_sites:
            handles.append(m.register_forward_pre_hook(lambda _m, _a, name=name: call_order.append(name)).remove)
    recorder = _FunctionalLinearRecorder({id(p): n for n, p in model.named_parameters()})
    try:
        with recorder:
            model(*example)
    finally:
        for remove in handles:
            remove()
    order: dict[str, int] = {}
    for name in call_order:
        order.setdefault(name, len(order))
    called = {name for name, site in module_sites.items() if site.calls}
    return order, {w: None for w in recorder.weights if not _inside(w.rpartition(".")[0], called)}


def _weights_passed_to_functions(gm: fx.GraphModule, module_sites: dict[str, LinearSite]) -> None:
    """Linear modules forward never calls but whose weight it passes to a function fx keeps whole (a
    ``torch.fx.wrap``ped function such as torchvision's ``shifted_window_attention``, which calls
    ``F.linear(x, qkv_weight, qkv_bias)`` inside): sites too, marked ``through`` that function. A
    replacement module serves them through its ``weight`` (W = L R)."""
    by_weight = {s.weight_name: s for s in module_sites.values() if s.calls == 0}
    for node in gm.graph.nodes:
        module = getattr(node.target, "__module__", None) or ""
        if node.op != "call_function" or module == "torch" or module.startswith(("torch.", "_operator", "builtins")):
            continue
        for arg in [*node.args, *node.kwargs.values()]:
            site = by_weight.get(arg.target) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None
            if site is not None:
                site.calls += 1
                site.node = site.node or node.name
                site.through = getattr(node.target, "__name__", str(node.target))


def _called_sites(module_sites, seen_functional, skipped) -> list[LinearSite]:
    """The module sites forward called; the others, and functional linears hooks cannot see, are skipped."""
    sites = []
    for name, site in module_sites.items():
        if site.calls == 0:
            if site.weight_name in seen_functional:
                seen_functional.pop(site.weight_name)
                reason = "its weight is used through F.linear, which forward hooks cannot capture (fx could not trace the model)"
            else:
                reason = "not called by forward on the example input"
            skipped.append({"name": name, "reason": reason})
        else:
            sites.append(site)
    for weight_name in seen_functional:
        skipped.append({"name": weight_name, "reason": "F.linear on this parameter, seen in the forward pass; forward hooks "
                        "cannot capture a functional linear (fx could not trace the model)"})
    return sites


def _propagate_shapes(gm: fx.GraphModule, example: tuple) -> None:
    """ShapeProp, minus the traceback it prints to stderr before re-raising a failing node's error
    (the caller decides what the user sees). Anything else written to stderr is passed on."""
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        ShapeProp(gm).propagate(*example)  # on error the buffer, with its traceback, is dropped
    if buffer.getvalue():
        sys.stderr.write(buffer.getvalue())


class _FunctionalLinearRecorder(TorchFunctionMode):
    """Qualified names of the parameters used as the weight of an F.linear call (hooks path)."""

    def __init__(self, param_names: dict[int, str]):
        super().__init__()
        self.param_names = param_names
        self.weights: dict[str, None] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FUNCTIONAL_LINEARS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self.param_names.get(id(weight))
            if name is not None:
                self.weights.setdefault(name, None)
        return func(*args, **kwargs)


def _scan_graph(gm: fx.GraphModule, module_sites: dict[str, LinearSite], skipped: list) -> tuple[list[LinearSite], dict[str, int]]:
    """Execution order of module linears and the functional linears on parameters."""
    params = dict(gm.named_parameters())
    functional: list[LinearSite] = []
    order: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in module_sites:
            module_sites[node.target].node = module_sites[node.target].node or node.name
            order.setdefault(node.target, len(order))
        elif node.op == "call_function" and node.target in _FUNCTIONAL_LINEARS:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target in params):
                skipped.append({"name": node.name, "reason": "F.linear on a computed weight, not a parameter"})
                continue
            bias_is_param = isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target in params
            w = params[weight.target]
            # A linear module's weight used through F.linear (e.g. BEiT/EVA qkv with a computed q/v bias):
            # the site takes the module's name and the module itself is not a separate site.
            owner = weight.target[: -len(".weight")] if weight.target.endswith(".weight") else None
            name = owner if owner in module_sites else weight.target
            if owner in module_sites:
                module_sites.pop(owner)
            inp = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
            out = node.meta.get("tensor_meta")
            site = LinearSite(
                name=name, kind="functional", role=role_of(name),
                in_features=int(w.shape[1]), out_features=int(w.shape[0]), bias=bias is not None,
                weight_name=weight.target, bias_name=bias.target if bias_is_param else None,
                input_shape=tuple(inp.shape) if inp is not None else None,
                output_shape=tuple(out.shape) if out is not None else None, node=node.name, calls=1,
            )
            if any(s.name == site.name for s in functional):
                next(s for s in functional if s.name == site.name).calls += 1
                continue
            functional.append(site)
            order.setdefault(site.name, len(order))
    return functional, order


def _inside(name: str, parents: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in parents)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else "")[:200]
