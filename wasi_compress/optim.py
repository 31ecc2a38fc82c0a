"""Optimizers for fine-tuning, including one whose steps run inside backward.

``StepInBackward`` gives every parameter its own optimizer and steps it from the parameter's
post-accumulate-grad hook, then drops the gradient: the gradients of the whole model never exist at
once, only the one being consumed (the pattern of PyTorch's "optimizer step in backward" recipe). For
per-parameter rules (SGD with or without momentum, AdamW, weight decay) the result equals an ordinary
step after backward. It cannot run under DDP, whose all-reduce comes after the hooks fire, nor with
anything that needs all gradients together (clipping by global norm).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["StepInBackward", "make_optimizer"]


def make_optimizer(params: Iterable[nn.Parameter], name: str, *, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0, step_in_backward: bool = False):
    """torch SGD (with `momentum`) or AdamW over `params`; with `step_in_backward`, a StepInBackward of them."""
    def factory(group: list[nn.Parameter]) -> torch.optim.Optimizer:
        if name == "sgd":
            return torch.optim.SGD(group, lr=lr, momentum=momentum, weight_decay=weight_decay)
        if name == "adamw":
            return torch.optim.AdamW(group, lr=lr, weight_decay=weight_decay)
        raise ValueError(f"unknown optimizer {name!r}")

    params = list(params)
    return StepInBackward(params, factory) if step_in_backward else factory(params)


class StepInBackward:
    """One optimizer per parameter, stepped as soon as backward has accumulated that parameter's gradient.

    Duck-types the parts of torch.optim.Optimizer a training loop uses: ``param_groups`` (set the
    learning rate there), ``state``, ``zero_grad``, ``step`` (a no-op: the steps already ran),
    ``state_dict`` and ``load_state_dict``. ``remove()`` detaches the hooks."""

    def __init__(self, params: Iterable[nn.Parameter], factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer]):
        self.params = [p for p in params if p.requires_grad]
        self.optimizers = [factory([p]) for p in self.params]
        by_id = {id(p): opt for p, opt in zip(self.params, self.optimizers)}

        def step_now(p: Tensor) -> None:
            by_id[id(p)].step()
            p.grad = None

        self._handles = [p.register_post_accumulate_grad_hook(step_now) for p in self.params]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    @property
    def state(self) -> dict[Tensor, dict[str, Any]]:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def step(self) -> None:
        """Nothing left to do: every parameter stepped during backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"step_in_backward": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state.get("step_in_backward")
        if states is None or len(states) != len(self.optimizers):
            raise ValueError("this optimizer state was not written by a StepInBackward over the same parameters")
        for opt, s in zip(self.optimizers, states):
            opt.load_state_dict(s)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
