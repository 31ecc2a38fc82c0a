"""One training step, the learning-rate schedule and the run's optimizer."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wasi_compress.modules.training import WASILinear
from wasi_compress.transforms.training import reorthonormalize_


def after_step_fn(model: nn.Module) -> Callable[[], None]:
    """What runs after each optimizer step: re-orthonormalise the optimizer-step WASI layers."""
    return lambda: reorthonormalize_(model)


def learning_rate(config, step: int, total_steps: int) -> float:
    """The learning rate of a global step: constant, or cosine decay from --lr towards 0 over the run."""
    base = config.effective_lr
    if config.schedule == "constant" or total_steps <= 0:
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def lr_setter(model: nn.Module, optimizer, config, steps_per_epoch: int) -> Callable[[int], None]:
    """Sets the step's learning rate on the optimizer and on every subspace-iteration layer (which
    updates its L, R in backward with its own `lr`)."""
    layers = [m for m in model.modules() if isinstance(m, WASILinear) and m.update == "subspace-iteration"]
    total = steps_per_epoch * config.epochs

    def set_lr(step: int) -> None:
        lr = learning_rate(config, step, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for m in layers:
            m.lr = lr

    return set_lr


def train_step(model: nn.Module, optimizer, x: Tensor, y: Tensor,
               after_step: Callable[[], None], micro_batches: int = 1) -> tuple[Tensor, Tensor]:
    """Forward, cross-entropy, backward, optimizer step, then re-orthonormalise optimizer-step WASI
    layers. Subspace-iteration layers update their L, R during backward.

    With ``micro_batches`` m > 1 the batch is split into m chunks whose gradients accumulate before the
    one optimizer step: each chunk's loss is weighted by its share of the batch, so the accumulated
    gradient is the full batch's mean-loss gradient (exact up to float summation order, for models with
    no batch-coupled layer such as BatchNorm), while autograd saves one chunk's activations at a time."""
    optimizer.zero_grad(set_to_none=True)
    chunks_x, chunks_y = x.tensor_split(micro_batches), y.tensor_split(micro_batches)
    chunks = [(cx, cy) for cx, cy in zip(chunks_x, chunks_y) if len(cx)]
    # the loss is a float even when the inputs are token ids
    total, outs = (x.new_zeros(()) if x.is_floating_point() else torch.zeros((), device=x.device)), []
    for i, (cx, cy) in enumerate(chunks):
        sync = i == len(chunks) - 1 or not hasattr(model, "no_sync")  # DDP all-reduces on the last chunk only
        with (contextlib.nullcontext() if sync else model.no_sync()):
            out = model(cx)
            loss = F.cross_entropy(out, cy) * (len(cx) / len(x))
            loss.backward()
        total += loss.detach()
        outs.append(out.detach())
        del out, loss
    optimizer.step()
    after_step()
    return total, outs[0] if len(outs) == 1 else torch.cat(outs)


def make_run_optimizer(params: list[nn.Parameter], config, *, ordinary: bool = False):
    """The run's optimizer; `ordinary` forces a plain step after backward (the vanilla baseline's)."""
    from wasi_compress.optim import make_optimizer

    return make_optimizer(params, config.optimizer, lr=config.effective_lr, momentum=config.effective_momentum,
                          weight_decay=config.weight_decay, step_in_backward=config.in_backward and not ordinary)
