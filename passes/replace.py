"""Replace linear computations by other modules (subspace linears, training modules), reversibly.

A module site (an ``nn.Linear`` submodule) is swapped in place with ``set_submodule``: this works on the
user's own model class, so timm models keep their methods. A functional site (``F.linear`` on a
parameter) needs the fx graph: pass the captured GraphModule, and the call is rewritten into a call of
the new module (plus the computed bias where the model computes one, as BEiT does), and the dense
parameter is removed so it is never stored twice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from wasi_compress.passes.base import PassResult, WasiPass, mark
from wasi_compress.passes.capture import LinearSite

# builder(site, dense) -> module computing the same function (approximately, at a rank); `dense` is a
# transient nn.Linear sharing the site's weight and bias (no copy). The built module must offer
# `to_linear()` for the pass to be reversible.
Builder = Callable[[LinearSite, nn.Linear], nn.Module]


@dataclass
class _Replaced:
    site: LinearSite
    module_name: str            # where the new module lives
    param_owner: str | None = None  # functional sites: module that held the raw weight parameter
    param_name: str | None = None


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


class ReplaceLinearsPass(WasiPass):
    """Replace the given sites with modules made by `builder`. Reversible when the new modules have
    ``to_linear()``. Preserves computation only if the builder does (e.g. full rank)."""

    name = "replace_linears"
    reversible = True

    def __init__(self, sites: list[LinearSite], builder: Builder, *, preserves_computation: bool = False):
        self.sites = list(sites)
        self.builder = builder
        self.preserves_computation = preserves_computation
        self.replaced: list[_Replaced] = []

    def call(self, module: nn.Module) -> PassResult:
        functional = [s for s in self.sites if s.kind == "functional"]
        if functional and not isinstance(module, fx.GraphModule):
            raise TypeError(f"{functional[0].name} is a functional linear; pass the captured GraphModule")
        for site in self.sites:
            dense = dense_view(module, site)
            new = self.builder(site, dense)
            if site.kind == "module":
                module.set_submodule(site.name, new)
                self.replaced.append(_Replaced(site, site.name))
                if isinstance(module, fx.GraphModule):
                    for node in module.graph.nodes:
                        if node.op == "call_module" and node.target == site.name:
                            mark(node, self.name, site=site.name, module=type(new).__name__)
            else:
                self.replaced.append(self._rewrite_functional(module, site, new))
        if isinstance(module, fx.GraphModule) and functional:
            module.graph.lint()
            module.recompile()
        return PassResult(module, bool(self.sites))

    def _rewrite_functional(self, gm: fx.GraphModule, site: LinearSite, new: nn.Module) -> _Replaced:
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
        mark(call, self.name, site=site.name, module=type(new).__name__, functional=True)
        for attr in (weight_node, bias_node if site.bias_name else None):
            if isinstance(attr, fx.Node) and attr.op == "get_attr" and not attr.users:
                gm.graph.erase_node(attr)
        if param_owner is not None:
            owner = gm.get_submodule(param_owner)
            delattr(owner, param_name)
            if site.bias_name:
                b_owner, _, b_name = site.bias_name.rpartition(".")
                delattr(gm.get_submodule(b_owner), b_name)
        return _Replaced(site, module_name, param_owner, param_name)

    def reverse(self, module: nn.Module) -> PassResult:
        """Put dense linears back (W = L R for factored modules)."""
        for rec in reversed(self.replaced):
            new = module.get_submodule(rec.module_name)
            dense = new.to_linear()
            if rec.site.kind == "module":
                module.set_submodule(rec.module_name, dense)
                continue
            gm: fx.GraphModule = module  # type: ignore[assignment]
            call = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == rec.module_name)
            if rec.param_owner is None:
                gm.set_submodule(rec.module_name, dense)
                w_target, b_target = f"{rec.module_name}.weight", (f"{rec.module_name}.bias" if dense.bias is not None else None)
            else:
                owner = gm.get_submodule(rec.param_owner)
                delattr(owner, f"{rec.param_name}_linear")
                owner.register_parameter(rec.param_name, dense.weight)
                w_target = rec.site.weight_name
                b_target = None
                if rec.site.bias_name:
                    b_owner, _, b_name = rec.site.bias_name.rpartition(".")
                    gm.get_submodule(b_owner).register_parameter(b_name, dense.bias)
                    b_target = rec.site.bias_name
            with gm.graph.inserting_before(call):
                w = gm.graph.get_attr(w_target)
                b = gm.graph.get_attr(b_target) if b_target else None
                lin = gm.graph.call_function(F.linear, (call.args[0], w, b))
            call.replace_all_uses_with(lin)
            gm.graph.erase_node(call)
        if isinstance(module, fx.GraphModule):
            module.graph.lint()
            module.recompile()
        self.replaced.clear()
        return PassResult(module, True)
