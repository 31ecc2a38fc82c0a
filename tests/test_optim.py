"""StepInBackward: the same parameters as an ordinary step after backward, with no gradient left over."""

import copy

import pytest
import torch
from torch import nn

from wasi_compress.optim import StepInBackward, make_optimizer


@pytest.mark.parametrize("name,kwargs,state_tensors", [("sgd", {"momentum": 0.9, "weight_decay": 0.01}, 4), ("sgd", {}, 0),
                                                       ("adamw", {"weight_decay": 0.01}, 4)])
def test_step_in_backward_equals_an_ordinary_step(name, kwargs, state_tensors):
    torch.manual_seed(0)
    ordinary_model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    fused_model = copy.deepcopy(ordinary_model)
    ordinary = make_optimizer(ordinary_model.parameters(), name, lr=0.1, **kwargs)
    fused = make_optimizer(fused_model.parameters(), name, lr=0.1, step_in_backward=True, **kwargs)
    assert isinstance(fused, StepInBackward)
    for _ in range(4):
        x = torch.randn(5, 4)
        for model, opt in ((ordinary_model, ordinary), (fused_model, fused)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        assert all(p.grad is None for p in fused_model.parameters())
        for group in fused.param_groups:  # a schedule sets the rate through param_groups
            group["lr"] *= 0.5
        for group in ordinary.param_groups:
            group["lr"] *= 0.5
    for p, q in zip(ordinary_model.parameters(), fused_model.parameters()):
        assert torch.equal(p, q)
    assert len(fused.state) == len(ordinary.state) == state_tensors


def test_state_round_trips_and_hooks_come_off():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = make_optimizer(model.parameters(), "sgd", lr=0.1, momentum=0.9, step_in_backward=True)
    model(torch.randn(4, 3)).sum().backward()
    state = opt.state_dict()
    twin = copy.deepcopy(model)
    other = make_optimizer(twin.parameters(), "sgd", lr=0.1, momentum=0.9, step_in_backward=True)
    other.load_state_dict(state)
    assert torch.equal(other.state[twin.weight]["momentum_buffer"], opt.state[model.weight]["momentum_buffer"])
    with pytest.raises(ValueError, match="StepInBackward"):
        other.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    opt.remove()
    before = model.weight.detach().clone()
    model(torch.randn(4, 3)).sum().backward()
    assert model.weight.grad is not None and torch.equal(model.weight, before)
