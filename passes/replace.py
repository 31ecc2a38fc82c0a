"""Replace linear computations by other modules (subspace linears, training modules), reversibly.

A module site (an ``nn.Linear`` submodule) is swapped in place with ``set_submodule``: this works on the
user's own model class, so timm models keep their methods. A functional site (``F.linear`` on a
parameter) needs the fx graph: pass the captured GraphModule, and the call is rewritten into a call of
the new module (plus the computed bias where the model computes one, as BEiT does), and the dense
parameter is removed so it is never stored twice."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from wasi_compress.marks import mark_module, marked_modules
from wasi_compress.passes.base import META_KEY, PassResult, WasiPass, mark
from wasi_compress.passes.capture import LinearSite

# builder(site, dense) -> module computing the same function (approximately, at a rank); `dense` is a
# transient nn.Linear sharing the site's weight and bias (no copy). The built module must offer
# `to_linear()` for the pass to be reversible.
Builder = Callable[[LinearSite, nn.Linear], nn.Module]


def dense_view(model: nn.Module, site: LinearSite) -> nn.Linear:
    """An nn.Linear sharing the site's parameters (no copy)."""
    if site.kind == "module":
        m = model.get_submodule(site.name)
        if isinstance(m, nn.Linear):
            return m
        if hasattr(m, "to_linear"):
            return m.to_linear()
        raise TypeError(f"{site.name}: {type(m).__name__} is not a dense linear")
    weight = model.get_parameter(site.weight_name)
    bias = model.get_parameter(site.bias_name) if site.bias_name else None
    lin = nn.Linear(site.in_features, site.out_features, bias=bias is not None, device="meta")
    lin.weight = weight
    lin.bias = bias
    return lin


@dataclass
class Replaced:
    """What one call replaced (for reading; `reverse` uses the marks on the model, not this list)."""

    site: LinearSite
    module_name: str            # where the new module lives


def site_module(model: nn.Module, site: LinearSite) -> nn.Module:
    """What a site is to a filter_fn: its module, or a dense view of a functional linear's parameters."""
    return model.get_submodule(site.name) if site.kind == "module" else dense_view(model, site)


class ReplaceLinearsPass(WasiPass):
    """Replace the given sites with modules made by `builder`. Reversible when the new modules have
    ``to_linear()``: every new module is marked (wasi_compress.marks) and every rewritten graph node
    carries its mark in ``node.meta``, and `reverse` reads those marks, so it works on any model this
    pass changed, also a copy or a reloaded one. Preserves computation only if the builder does."""

    name = "replace_linears"
    reversible = True

    def __init__(self, sites: list[LinearSite], builder: Builder, *, preserves_computation: bool = False):
        self.sites = list(sites)
        self.builder = builder
        self.preserves_computation = preserves_computation
        self.replaced: list[Replaced] = []
        # marks name this instance, so reverse undoes its own replacements only (they survive copies)
        self.instance = uuid.uuid4().hex

    def call(self, module: nn.Module) -> PassResult:
        functional = [s for s in self.sites if s.kind == "functional"]
        if functional and not isinstance(module, fx.GraphModule):
            raise TypeError(f"{functional[0].name} is a functional linear; pass the captured GraphModule")
        for site in self.sites:
            dense = dense_view(module, site)
            new = mark_module(self.builder(site, dense), self.name, site=site.name, kind=site.kind, instance=self.instance)
            if site.kind == "module":
                module.set_submodule(site.name, new)
                self.replaced.append(Replaced(site, site.name))
                if isinstance(module, fx.GraphModule):
                    for node in module.graph.nodes:
                        if node.op == "call_module" and node.target == site.name:
                            mark(node, self.name, site=site.name, module=type(new).__name__)
            else:
                self.replaced.append(Replaced(site, self._rewrite_functional(module, site, new)))
        if isinstance(module, fx.GraphModule) and functional:
            module.graph.lint()
            module.recompile()
        return PassResult(module, bool(self.sites))

    def _rewrite_functional(self, gm: fx.GraphModule, site: LinearSite, new: nn.Module) -> str:
        node = next(n for n in gm.graph.nodes if n.name == site.node)
        weight_node = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
        bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        owner_name, _, pname = site.weight_name.rpartition(".")
        if site.name != site.weight_name:
            # the weight belonged to an nn.Linear used functionally: the new module takes its place
            module_name, param_owner, param_name = site.name, None, None
            gm.set_submodule(site.name, new)
        else:
            owner = gm.get_submodule(owner_name)
            param_owner, param_name = owner_name, pname
            module_name = f"{owner_name}.{pname}_linear" if owner_name else f"{pname}_linear"
            owner.add_module(f"{pname}_linear", new)
        with gm.graph.inserting_after(node):
            call = gm.graph.call_module(module_name, (node.args[0],))
        out = call
        if site.bias and site.bias_name is None:  # computed bias: keep computing it
            if getattr(new, "bias", None) is not None:
                raise ValueError(f"{site.name}: its bias is computed in forward; build the module without bias")
            with gm.graph.inserting_after(call):
                out = gm.graph.call_function(torch.add, (call, bias_node))
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        mark(call, self.name, site=site.name, module=type(new).__name__, functional=True, param_owner=param_owner,
             param_name=param_name, weight_name=site.weight_name, bias_name=site.bias_name, instance=self.instance)
        for attr in (weight_node, bias_node if site.bias_name else None):
            if isinstance(attr, fx.Node) and attr.op == "get_attr" and not attr.users:
                gm.graph.erase_node(attr)
        if param_owner is not None:
            owner = gm.get_submodule(param_owner)
            delattr(owner, param_name)
            if site.bias_name:
                b_owner, _, b_name = site.bias_name.rpartition(".")
                delattr(gm.get_submodule(b_owner), b_name)
        return module_name

    def reverse(self, module: nn.Module) -> PassResult:
        """Put dense linears back (W = L R for factored modules), found by this pass's marks."""
        if isinstance(module, fx.GraphModule):
            for call in [n for n in module.graph.nodes if self._own(n.meta.get(META_KEY, {}).get(self.name))
                         and n.meta[META_KEY][self.name].get("functional")]:
                self._restore_functional(module, call, call.meta[META_KEY][self.name])
        for name, m, info in list(marked_modules(module, self.name)):
            if info["kind"] == "module" and self._own(info):
                module.set_submodule(name, m.to_linear())
        if isinstance(module, fx.GraphModule):
            module.graph.lint()
            module.recompile()
        self.replaced.clear()
        return PassResult(module, True)

    def _own(self, info: dict | None) -> bool:
        return info is not None and info.get("instance") == self.instance

    def _restore_functional(self, gm: fx.GraphModule, call: fx.Node, info: dict) -> None:
        """The F.linear call (and its raw parameters) that `_rewrite_functional` replaced by `call`."""
        dense = gm.get_submodule(call.target).to_linear()
        if info["param_owner"] is None:
            gm.set_submodule(call.target, dense)
            w_target, b_target = f"{call.target}.weight", (f"{call.target}.bias" if dense.bias is not None else None)
        else:
            owner = gm.get_submodule(info["param_owner"])
            delattr(owner, f"{info['param_name']}_linear")
            owner.register_parameter(info["param_name"], dense.weight)
            w_target, b_target = info["weight_name"], None
            if info["bias_name"]:
                b_owner, _, b_name = info["bias_name"].rpartition(".")
                gm.get_submodule(b_owner).register_parameter(b_name, dense.bias)
                b_target = info["bias_name"]
        with gm.graph.inserting_before(call):
            w = gm.graph.get_attr(w_target)
            b = gm.graph.get_attr(b_target) if b_target else None
            lin = gm.graph.call_function(F.linear, (call.args[0], w, b))
        call.replace_all_uses_with(lin)
        gm.graph.erase_node(call)
