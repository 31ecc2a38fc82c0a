"""Swap a model's LayerNorms, activations and attention for the forms that save less for backward
(``wasi_compress.modules.saved_forms``, issue 13), in place and reversibly.

``SavedFormsPass`` replaces modules of an exact type (a subclass, such as a form already swapped in or
timm's LayerNorm2d, is left alone; timm's own LayerNorm, which ViT uses and whose forward is
F.layer_norm unless timm's fast norm is on, counts as a LayerNorm):

- ``layernorm="shared"``: nn.LayerNorm -> ``SharedOutputLayerNorm`` (saves its output and rstd; exact);
- ``activation="code2"`` / ``"code8"``: nn.GELU -> ``CodedGELU``, nn.SiLU -> ``CodedSiLU`` (2- or 8-bit
  code of the input; approximate gradient), nn.ReLU -> ``MaskedReLU`` (1-bit mask; exact);
- ``attention="fused"``: ``fused_attn = True`` on timm attention modules (no (B, H, N, N) probabilities
  saved where SDPA's fused CPU kernel runs; timm's Swin, whose mask carries a trainable bias, falls back
  to the math path on CPU and saves more that way: use ``"as-is"`` there).

Every form shares the original's parameters and computes the same forward output. Each new module is
marked ``saved_forms`` (``original``: the qualified name of the class it replaced, ``form``); an
attention module switched to the fused path is marked with its former ``fused_attn``; ``reverse`` reads
the marks and gives back the modules replaced (``to_plain``: the very objects, holding the forms'
parameters). ``blocks`` (module-name prefixes) restricts the pass to those modules.

On a torch.fx GraphModule the leaf modules (nn.LayerNorm, nn.GELU ...) are its submodules and are swapped
the same way. A traced module becomes a call_function node instead (timm's LayerNorm becomes
``F.layer_norm`` on get_attr parameters): such a node becomes a call_module of the form, installed where
the parameters live (``blocks.0.norm1``, so parameter names and the state dict are unchanged; a functional
activation's form at ``saved_forms_<node>``), and the node's ``node.meta['wasi_compress']['saved_forms']``
records the call for ``reverse``. Attention in a graph was fixed when it was traced."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.nn.functional as F
from torch import fx, nn

from wasi_compress.marks import MARK_ATTR, copy_marks, mark_module, mark_of, marks_of
from wasi_compress.modules.saved_forms import CodedGELU, CodedSiLU, MaskedReLU, SharedOutputLayerNorm
from wasi_compress.passes.base import META_KEY, PassResult, WasiPass, mark

__all__ = ["ACTIVATION_FORMS", "ATTENTION_FORMS", "LAYERNORM_FORMS", "SavedFormsPass"]

LAYERNORM_FORMS = ("shared", "exact")
ACTIVATION_FORMS = ("code2", "code8", "exact")
ATTENTION_FORMS = ("fused", "as-is")
_BITS = {"code2": 2, "code8": 8}
# the functional calls a graph may hold, with their parameters in order and their defaults
_SIGNATURES = {F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"), F.gelu: ("input", "approximate"),
               F.silu: ("input", "inplace"), F.relu: ("input", "inplace")}
_DEFAULTS = {F.layer_norm: {"weight": None, "bias": None, "eps": 1e-5}, F.gelu: {"approximate": "none"},
             F.silu: {"inplace": False}, F.relu: {"inplace": False}}


def _check(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{option} must be one of {allowed}, got {value!r}")
    return value


class SavedFormsPass(WasiPass):
    """Replace LayerNorm / GELU / SiLU / ReLU modules (and, in a graph, their functional calls) by their
    saved-memory forms and switch timm attention to the fused kernel (module docstring). After ``call``,
    ``replaced`` maps each replaced module's name to its form and ``fused`` lists the attention modules
    switched."""

    name = "saved_forms"
    preserves_computation = True
    reversible = True

    def __init__(self, *, layernorm: str = "shared", activation: str = "code2", attention: str = "fused",
                 blocks: Iterable[str] | None = None):
        self.layernorm = _check("layernorm", layernorm, LAYERNORM_FORMS)
        self.activation = _check("activation", activation, ACTIVATION_FORMS)
        self.attention = _check("attention", attention, ATTENTION_FORMS)
        self.blocks = None if blocks is None else tuple(blocks)
        self.replaced: dict[str, str] = {}
        self.fused: list[str] = []

    def in_scope(self, name: str) -> bool:
        """Whether the module called ``name`` is one the pass may touch (``blocks`` prefixes)."""
        if self.blocks is None:
            return True
        return any(name == p or name.startswith(p + ".") for p in self.blocks)

    def form_of(self, module: nn.Module) -> tuple[nn.Module, str] | None:
        """(the replacement, its form) for a module of a type the options cover, else None."""
        if _is_plain_layernorm(module):
            return (SharedOutputLayerNorm.from_layernorm(module), "shared") if self.layernorm == "shared" else None
        kind, bits = type(module), _BITS.get(self.activation)
        if bits is None:
            return None
        if kind is nn.GELU:
            return CodedGELU.from_module(module, bits), self.activation
        if kind is nn.SiLU:
            return CodedSiLU.from_module(module, bits), self.activation
        if kind is nn.ReLU:
            return MaskedReLU.from_module(module), "mask"
        return None

    def call(self, module: nn.Module) -> PassResult:
        self.replaced, self.fused = {}, []
        made: dict[int, nn.Module] = {}  # a module used under several names gets one replacement
        for name, sub in list(module.named_modules(remove_duplicate=False)):
            if not name or not self.in_scope(name):
                continue
            if id(sub) not in made:
                built = self.form_of(sub)
                if built is None:
                    continue
                new, form = built
                made[id(sub)] = mark_module(copy_marks(sub, new), self.name, original=_qualname(sub), form=form)
            module.set_submodule(name, made[id(sub)])
            self.replaced[name] = mark_of(made[id(sub)], self.name)["form"]
        if isinstance(module, fx.GraphModule):
            _mark_nodes(module, self.replaced, self.name)
            self.replaced.update(self._replace_calls(module))
        if self.attention == "fused":
            self.fused = self._fuse_attention(module)
        return PassResult(module, bool(self.replaced or self.fused))

    def _fuse_attention(self, module: nn.Module) -> list[str]:
        changed = []
        for name, sub in module.named_modules():
            if name and self.in_scope(name) and getattr(sub, "fused_attn", None) is False:
                sub.fused_attn = True
                mark_module(sub, self.name, original=_qualname(sub), form="fused", fused_attn=False)
                changed.append(name)
        return changed

    def _replace_calls(self, gm: fx.GraphModule) -> dict[str, str]:
        """Functional layer_norm / gelu / silu / relu nodes -> call_module of their forms."""
        replaced: dict[str, str] = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _SIGNATURES or not self.in_scope(_scope(node)):
                continue
            site = self._call_site(gm, node, _call_kwargs(node))
            if site is None:
                continue
            name, module, info = site
            if name not in replaced:  # a LayerNorm called twice shares one form
                original = _traced_class(node) if info["holder"] else f"torch.nn.functional.{node.target.__name__}"
                gm.set_submodule(name, mark_module(module, self.name, original=original, form=info["form"]))
            new = _swap_node(gm, node, lambda: gm.graph.call_module(name, (_call_kwargs(node)["input"],)), keep=True)
            mark(new, self.name, **info)
            replaced[name] = info["form"]
        if replaced:
            gm.recompile()
        return replaced

    def _call_site(self, gm: fx.GraphModule, node: fx.Node, kw: dict[str, Any]):
        """(where the form goes, the form, what reverse needs) for one functional call, or None."""
        call = {"function": node.target, "kwargs": {k: v for k, v in kw.items() if k != "input"}}
        if node.target is F.layer_norm:
            return _layer_norm_site(gm, node, kw, call) if self.layernorm == "shared" else None
        bits = _BITS.get(self.activation)
        if bits is None:
            return None
        if node.target is F.gelu:
            module, form = CodedGELU(kw["approximate"], bits), self.activation
        elif node.target is F.silu:
            module, form = CodedSiLU(bits=bits), self.activation
        else:
            module, form = MaskedReLU(), "mask"
        return f"saved_forms_{node.name}", module, {"form": form, "call": call, "holder": False}

    def reverse(self, module: nn.Module) -> PassResult:
        """Plain modules back (same parameters), functional calls back in a graph, attention back on the
        path it had; marks removed."""
        changed = _restore_calls(module, self.name) if isinstance(module, fx.GraphModule) else False
        plain: dict[int, nn.Module] = {}
        for name, sub in list(module.named_modules(remove_duplicate=False)):
            info = mark_of(sub, self.name)
            if not name or info is None:
                continue
            changed = True
            if "fused_attn" in info:
                sub.fused_attn = info["fused_attn"]
                _unmark(sub, self.name)
                continue
            if id(sub) not in plain:
                plain[id(sub)] = _unmark(copy_marks(sub, sub.to_plain()), self.name)
            module.set_submodule(name, plain[id(sub)])
        _unmark_nodes(module, self.name)
        return PassResult(module, changed)


def _layer_norm_site(gm: fx.GraphModule, node: fx.Node, kw: dict[str, Any], call: dict[str, Any]):
    """F.layer_norm on a module's own weight and bias (get_attr ``P.weight`` / ``P.bias`` of a module P
    holding nothing else): the form replaces P, so parameter names do not change. None otherwise."""
    weight, bias = kw["weight"], kw["bias"]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight")):
        return None
    holder_name = weight.target[: -len(".weight")]
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"
                                 and bias.target == holder_name + ".bias"):
        return None
    holder = gm.get_submodule(holder_name)
    if isinstance(holder, SharedOutputLayerNorm):  # a second call of a LayerNorm already replaced
        form = holder
    elif set(holder._parameters) != {"weight"} | ({"bias"} if bias is not None else set()) or holder._modules \
            or holder._buffers:
        return None
    else:
        form = SharedOutputLayerNorm(tuple(kw["normalized_shape"]), eps=kw["eps"], bias=bias is not None,
                                     device="meta")
        form.weight, form.bias = holder.weight, (holder.bias if bias is not None else None)
        form = form.train(holder.training)._remember(holder)
    call["kwargs"].update(weight=weight.target, bias=bias.target if bias is not None else None)
    return holder_name, form, {"form": "shared", "call": call, "holder": True}


def _restore_calls(gm: fx.GraphModule, transform: str) -> bool:
    """The functional calls ``_replace_calls`` turned into call_module nodes, back; their forms removed
    (a replaced parameter holder gets its plain module back)."""
    forms: dict[str, bool] = {}
    for node in list(gm.graph.nodes):
        info = node.meta.get(META_KEY, {}).get(transform)
        if node.op != "call_module" or not info or "call" not in info:
            continue
        kwargs = dict(info["call"]["kwargs"])

        def restored(node=node, kwargs=kwargs, function=info["call"]["function"]) -> fx.Node:
            for key in ("weight", "bias"):
                if isinstance(kwargs.get(key), str):
                    kwargs[key] = gm.graph.get_attr(kwargs[key])
            return gm.graph.call_function(function, (node.args[0],), kwargs)

        _swap_node(gm, node, restored, keep=False, transform=transform)
        forms[node.target] = info["holder"]
    for name, holder in forms.items():
        if holder:
            gm.set_submodule(name, _unmark(copy_marks(gm.get_submodule(name), gm.get_submodule(name).to_plain()),
                                           transform))
        else:
            gm.delete_submodule(name)
    if forms:
        gm.recompile()
    return bool(forms)


def _swap_node(gm: fx.GraphModule, node: fx.Node, make, *, keep: bool, transform: str = "") -> fx.Node:
    """Put the node ``make()`` creates in place of ``node``, with its meta (``keep``: the marks too; else
    all but ``transform``'s); get_attr inputs left unused are erased."""
    with gm.graph.inserting_before(node):
        new = make()
    marks = {k: v for k, v in node.meta.get(META_KEY, {}).items() if keep or k != transform}
    new.meta = {**{k: v for k, v in node.meta.items() if k != META_KEY}, **({META_KEY: marks} if marks else {})}
    inputs = [n for n in node.all_input_nodes if n.op == "get_attr"]
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    for attr in inputs:
        if not attr.users:
            gm.graph.erase_node(attr)
    return new


def _call_kwargs(node: fx.Node) -> dict[str, Any]:
    """A functional call's arguments by name, defaults filled in."""
    kw = dict(_DEFAULTS[node.target])
    kw.update(zip(_SIGNATURES[node.target], node.args))
    kw.update(node.kwargs)
    return kw


def _scope(node: fx.Node) -> str:
    """The module a traced call ran in (fx's nn_module_stack), "" when unknown (the root)."""
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else ""


def _is_plain_layernorm(module: nn.Module) -> bool:
    """nn.LayerNorm itself, or timm's LayerNorm (ViT's norm layers) when its forward is F.layer_norm (not
    its fast-norm path)."""
    kind = type(module)
    if kind is nn.LayerNorm:
        return True
    return (kind.__name__ == "LayerNorm" and kind.__module__.startswith("timm.") and isinstance(module, nn.LayerNorm)
            and not getattr(module, "_fast_norm", False))


def _traced_class(node: fx.Node) -> str:
    """The qualified class name of the module a traced call ran in (fx's nn_module_stack)."""
    stack = node.meta.get("nn_module_stack")
    kind = list(stack.values())[-1][1] if stack else None
    return f"{kind.__module__}.{kind.__qualname__}" if isinstance(kind, type) else "unknown"


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _unmark(module: nn.Module, transform: str) -> nn.Module:
    """Drop ``transform``'s mark from a module (the others stay)."""
    marks = marks_of(module)
    marks.pop(transform, None)
    if marks:
        setattr(module, MARK_ATTR, marks)
    elif hasattr(module, MARK_ATTR):
        delattr(module, MARK_ATTR)
    return module


def _mark_nodes(module: fx.GraphModule, replaced: dict[str, str], transform: str) -> None:
    for node in module.graph.nodes:
        if node.op == "call_module" and node.target in replaced:
            mark(node, transform, form=replaced[node.target])


def _unmark_nodes(module: nn.Module, transform: str) -> None:
    if isinstance(module, fx.GraphModule):
        for node in module.graph.nodes:
            meta: dict[str, Any] = node.meta.get(META_KEY, {})
            meta.pop(transform, None)
