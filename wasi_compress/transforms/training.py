"""`prepare_training_` makes a model WASI-, ASI- or vanilla-trainable in place; `to_inference_` turns
the trained modules back into inference modules. Between them the user trains in their own loop:

    handle = prepare_training_(model, WasiConfig(), example=x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    handle.attach(optimizer)      # the one call: per-step bookkeeping then runs from the optimizer's hooks
    ...  loss.backward(); optimizer.step(); optimizer.zero_grad()  ...
    to_inference_(model)

What `attach` does, so nothing else is needed per step: after every ``optimizer.step()`` the
optimizer-step rule's layers re-orthonormalise their factors (L R unchanged), and before every forward
the subspace-iteration layers take the learning rate and weight decay of the optimizer's first
parameter group (a scheduler that changes it drives them too)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from wasi_compress.errors import UserError
from wasi_compress.modules.pointwise import unwrap_pointwise_convs_, wrap_pointwise_convs_
from wasi_compress.modules.training import WASILinear
from wasi_compress.passes.training import to_inference
from wasi_compress.transforms.config import WasiConfig

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class TrainingHandle:
    """What `prepare_training_` did (``layers``: one TrainingLayer per linear site; ``frozen``: the
    parameters frozen by ``finetune_last``), and the per-step bookkeeping of the training modules.
    ``model`` is the model to train (the one passed in, or its traced GraphModule when a functional
    linear got a training module)."""

    model: nn.Module
    config: WasiConfig
    layers: list[Any]
    frozen: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    capture: Any = None
    activation_plan: Any = None     # the ActivationPlan when config.activation_budget was planned
    pointwise_convs: list[str] = field(default_factory=list)  # 1x1 convs computed as linears to be trained
    _hooks: list[Any] = field(default_factory=list, repr=False)

    def _wasi(self, update: str) -> list[WASILinear]:
        return [m for m in self.model.modules() if isinstance(m, WASILinear) and m.update == update]

    def after_step(self) -> None:
        """Re-orthonormalise the optimizer-step layers' factors (call after each optimizer step if the
        handle is not attached)."""
        reorthonormalize_(self.model)

    def set_lr(self, lr: float, weight_decay: float | None = None) -> None:
        """Learning rate (and weight decay) of the subspace-iteration layers' in-backward update."""
        for m in self._wasi("subspace-iteration"):
            m.lr = float(lr)
            if weight_decay is not None:
                m.weight_decay = float(weight_decay)

    def attach(self, optimizer) -> Any:
        """Run the bookkeeping from `optimizer`'s hooks (see the module docstring); returns it."""
        if not hasattr(optimizer, "register_step_post_hook") or not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{type(optimizer).__name__} has no register_step_post_hook; call handle.after_step() "
                            "after each step instead")
        self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.after_step()))

        in_backward = self._wasi("subspace-iteration")  # found once, not on every forward

        def follow(_module, _args) -> None:  # a pre-hook must return None, or it replaces the input
            group = optimizer.param_groups[0]
            for m in in_backward:
                m.lr, m.weight_decay = float(group["lr"]), float(group.get("weight_decay", 0.0))

        if in_backward:
            self._hooks.append(self.model.register_forward_pre_hook(follow))
        return optimizer

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @property
    def weight_ranks(self) -> dict[str, int | None]:
        return {layer.name: layer.weight_rank for layer in self.layers if layer.module == "wasi"}


def reorthonormalize_(model: nn.Module) -> None:
    """After an optimizer step: L, T = qr(L), R = T R in every optimizer-step WASILinear (L R unchanged)."""
    for m in model.modules():
        if isinstance(m, WASILinear) and m.update == "optimizer-step":
            m.reorthonormalize()


def prepare_training_(model: nn.Module, config: WasiConfig | None = None, *, example: torch.Tensor,
                      filter_fn: FilterFn | None = None, calib: tuple[torch.Tensor, torch.Tensor] | None = None,
                      loss_fn: Callable | None = None, weight_ranks: dict[str, int | None] | None = None,
                      activation_ranks: dict[str, list[int] | None] | None = None) -> TrainingHandle:
    """Insert the training modules of ``config.method`` into `model`, IN PLACE, and return the handle.

    ``example``: an input batch (shapes; two images are enough). ``filter_fn(module, fqn) -> bool``
    chooses the linears of the trained blocks that change (default: ``config.roles``). ``calib``:
    (inputs, labels) for planning ``config.activation_budget``, with ``loss_fn`` (cross-entropy by
    default). ``weight_ranks`` / ``activation_ranks`` fix ranks per layer (a plan, or a resumed run)
    instead of the thresholds and the budget. Layers outside the blocks stay dense and trainable."""
    from wasi_compress.passes.capture import capture
    from wasi_compress.passes.training import TrainingPass, freeze_before

    config = config or WasiConfig()
    if not isinstance(config, WasiConfig):
        raise TypeError(f"config must be a WasiConfig, got {type(config).__name__}")
    cap = capture(model, example)
    pointwise: list[str] = []
    if config.method != "vanilla" and filter_fn is None and not _block_sites(cap, config):
        # no linear in a block: the model writes its MLPs (and q/k/v) as 1x1 convolutions (visformer, FastViT)
        pointwise = wrap_pointwise_convs_(model)
        if pointwise:
            cap = capture(model, example)
    in_backward = config.update == "subspace-iteration"
    training_pass = TrainingPass(cap, method=config.method, update=config.update, threshold=config.threshold,
                                 activation_threshold=config.activation_threshold, weight_ranks=weight_ranks,
                                 activation_ranks=activation_ranks, lr=config.lr if in_backward else None,
                                 weight_decay=config.weight_decay if in_backward else 0.0,
                                 finetune_last=config.finetune_last, roles=config.roles, filter_fn=filter_fn)
    # no layer the method could change (a plan or threshold keeping eligible layers dense is a choice, not this)
    if config.method != "vanilla" and not config.allow_unchanged and not training_pass.selected_sites():
        unwrap_pointwise_convs_(model)
        raise UserError(f"method {config.method} would change nothing on this model: {_why_unchanged(cap)}; train it with "
                        "method vanilla, or pass --allow-unchanged (allow_unchanged=True) to go on anyway")
    frozen = freeze_before(model, training_pass.blocks[0], example) if config.finetune_last is not None else []
    planned = None
    if config.activation_budget is not None and activation_ranks is None:
        planned = _plan_activations(model, training_pass, config, calib, loss_fn)
        training_pass.activation_ranks = planned.ranks
    trained = training_pass(model).graph_module
    for layer in training_pass.layers:
        try:
            m = trained.get_submodule(layer.name)
        except AttributeError:
            continue
        layer.trained = isinstance(m, WASILinear) or any(p.requires_grad for p in m.parameters())
    handle = TrainingHandle(trained, config, training_pass.layers, frozen, training_pass.blocks, cap, planned)
    handle.pointwise_convs = pointwise
    return handle


def _block_sites(cap, config: WasiConfig) -> list:
    return [s for s in cap.sites if s.block is not None and s.role in config.roles]


def _why_unchanged(cap) -> str:
    if not cap.sites:
        return "it has no linear layer (nor 1x1 convolution) that capture could find"
    return (f"none of its {len(cap.sites)} linear layers sits in a transformer block (no attention or MLP in its "
            "graph, and no block in their names), or none passes the filter")


def _plan_activations(model, training_pass, config: WasiConfig, calib, loss_fn):
    """Tucker ranks per layer under the activation budget (passes.training.plan_activation_ranks)."""
    import torch.nn.functional as F

    from wasi_compress.errors import UserError
    from wasi_compress.passes.training import layer_candidates, plan_activation_ranks

    if calib is None:
        raise UserError("activation_budget needs a labelled calibration batch: pass calib=(inputs, labels)")
    inputs, labels = calib
    candidates = layer_candidates(model, training_pass.selected_sites(), inputs, labels, loss_fn or F.cross_entropy,
                                  thresholds=config.calibration_thresholds)
    return plan_activation_ranks(candidates, config.activation_budget_bytes)


def to_inference_(model: nn.Module, *, dense: bool = False) -> nn.Module:
    """Replace, IN PLACE, every training module by its inference form and return the model: a
    WASILinear becomes a SubspaceLinear (its trained factors; with ``dense=True`` an nn.Linear holding
    W = L R), an ASILinear or CompactInputLinear the nn.Linear it wraps (the same tensors). The marks
    the transforms left stay on the new modules, so `save` knows each site."""
    return to_inference(model, dense=dense)
