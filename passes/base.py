"""Pass infrastructure, on torch.fx's own: a pass is a callable over a module returning
``PassResult(module, modified)``. Ours also declare whether they preserve the computation, can be
reversed, and mark the nodes they touched in ``node.meta['wasi_compress']``."""

from __future__ import annotations

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

META_KEY = "wasi_compress"

__all__ = ["META_KEY", "PassResult", "WasiPass", "mark"]


class WasiPass(PassBase):
    """Base of wasi-compress passes.

    ``preserves_computation``: outputs are unchanged (to float tolerance) after the pass.
    ``reversible``: ``reverse(module)`` undoes it.
    """

    name: str = "pass"
    preserves_computation: bool = False
    reversible: bool = False

    def call(self, module: nn.Module) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def reverse(self, module: nn.Module) -> PassResult:
        raise TypeError(f"pass {self.name!r} is not reversible")


def mark(node: fx.Node, pass_name: str, **info) -> None:
    """Record on a node that a pass touched it, and how."""
    node.meta.setdefault(META_KEY, {})[pass_name] = info
