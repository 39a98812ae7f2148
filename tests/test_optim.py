"""Optimizers, learning-rate schedules and the weight EMA of a training stage.

The schedule tests pin down the exact shape of every `[*.optimizer]` schedule; the EMA tests
show what `ModelEMA` averages and what it copies.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from hatcli.engine.ema import ModelEMA
from hatcli.engine.schedule import LrSchedule, build_optimizer, lr_factor, param_groups, set_lr
from hatcli.errors import RecipeError
from hatcli.recipe import load_recipe
from hatcli.recipe_schema import OptimizerConfig

STEPS = 10  # iterations per epoch in the schedule tests
EPOCHS = 5


def small_net() -> nn.Sequential:
    """conv (weight, bias), BN (weight, bias), PReLU (weight), linear (weight, bias) for 6x6 inputs."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.PReLU(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def ids(params) -> set[int]:
    return {id(p) for p in params}


def curve(cfg: OptimizerConfig, steps: int = STEPS, epochs: int = EPOCHS) -> list[float]:
    schedule = LrSchedule(cfg, steps_per_epoch=steps, epochs=epochs)
    return [schedule.factor(step) for step in range(steps * epochs)]


# -- parameter groups and optimizers ---------------------------------------------------------


def test_weight_decay_weights_only_exempts_biases_and_norm_weights():
    net = small_net()
    conv, bn, prelu, _, fc = net
    groups = param_groups(net, OptimizerConfig(weight_decay=1e-4, weight_decay_weights_only=True))
    decay, no_decay = groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert ids(decay["params"]) == ids([conv.weight, fc.weight])
    assert ids(no_decay["params"]) == ids([conv.bias, bn.weight, bn.bias, prelu.weight, fc.bias])
    assert all(g["initial_lr"] == 0.1 for g in groups)


def test_one_group_by_default_and_frozen_parameters_are_left_out():
    net = small_net()
    net[0].weight.requires_grad_(False)
    (group,) = param_groups(net, OptimizerConfig(lr=0.5, weight_decay=1e-4))
    assert group["weight_decay"] == 1e-4 and group["initial_lr"] == 0.5
    assert ids(group["params"]) == ids(p for p in net.parameters() if p.requires_grad)
    assert id(net[0].weight) not in ids(group["params"])


def test_adamw_and_nesterov_sgd_get_the_recipe_hyper_parameters():
    net = small_net()
    adamw = build_optimizer(net, OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.05,
                                                 weight_decay_weights_only=True))
    assert isinstance(adamw, torch.optim.AdamW)
    assert [(g["lr"], g["weight_decay"], g["initial_lr"]) for g in adamw.param_groups] == [
        (1e-3, 0.05, 1e-3), (1e-3, 0.0, 1e-3)]

    sgd = build_optimizer(net, OptimizerConfig(lr=0.2, momentum=0.8, nesterov=True, weight_decay=4e-5))
    assert isinstance(sgd, torch.optim.SGD)
    (group,) = sgd.param_groups
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.2, 0.8, True, 4e-5)


def test_a_list_of_parameters_still_works():
    net = small_net()
    optimizer = build_optimizer([p for p in net.parameters()], OptimizerConfig())
    (group,) = optimizer.param_groups
    assert len(group["params"]) == len(list(net.parameters())) and group["initial_lr"] == 0.1


# -- schedules -------------------------------------------------------------------------------


def test_warmup_by_iterations_equals_warmup_by_epochs_and_ends_at_exactly_one():
    by_iters = curve(OptimizerConfig(schedule="constant", warmup_iters=15, warmup_factor=0.1))
    by_epochs = curve(OptimizerConfig(schedule="constant", warmup_epochs=1.5, warmup_factor=0.1))
    assert by_iters == by_epochs
    # factor(step) = warmup_factor + (1 - warmup_factor) * (step + 1) / W for step < W
    assert by_iters[0] == pytest.approx(0.1 + 0.9 / 15)
    assert all(a < b for a, b in zip(by_iters[:15], by_iters[1:15]))
    assert by_iters[14] == 1.0 and set(by_iters[14:]) == {1.0}


def test_cosine_starts_after_warmup_and_ends_at_min_lr_factor():
    cfg = OptimizerConfig(schedule="cosine", warmup_iters=10, min_lr_factor=0.05)
    factors = curve(cfg)
    assert factors[9] == 1.0 and factors[10] == 1.0  # end of warm-up, first decayed step
    total = STEPS * EPOCHS
    assert lr_factor(cfg, 10 + (total - 10) // 2, STEPS, EPOCHS) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(cfg, total, STEPS, EPOCHS) == pytest.approx(0.05)  # the end of training
    assert lr_factor(cfg, total + 7, STEPS, EPOCHS) == pytest.approx(0.05)
    assert 0.05 < factors[-1] < 0.06
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_poly_with_power_two():
    cfg = OptimizerConfig(schedule="poly", power=2.0, min_lr_factor=0.1)
    factors = curve(cfg)
    assert factors[0] == 1.0
    assert factors[25] == pytest.approx(0.1 + 0.9 * 0.5**2)
    assert lr_factor(cfg, STEPS * EPOCHS, STEPS, EPOCHS) == pytest.approx(0.1)


def test_step_decays_by_gamma_at_each_milestone_epoch():
    factors = curve(OptimizerConfig(schedule="step", milestones=[2, 4], gamma=0.1))
    per_epoch = [factors[e * STEPS:(e + 1) * STEPS] for e in range(EPOCHS)]
    expected = [1.0, 1.0, 0.1, 0.1, 0.01]
    for values, want in zip(per_epoch, expected):
        assert values == pytest.approx([want] * STEPS)


def test_by_epoch_is_constant_within_an_epoch_but_warms_up_per_iteration():
    cfg = OptimizerConfig(schedule="cosine", by_epoch=True, warmup_iters=5)
    factors = curve(cfg)
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    for epoch in range(1, EPOCHS):
        values = factors[epoch * STEPS:(epoch + 1) * STEPS]
        assert len(set(values)) == 1
        per_iteration = lr_factor(cfg.model_copy(update={"by_epoch": False}), epoch * STEPS, STEPS, EPOCHS)
        assert values[0] == per_iteration  # the value at the epoch's first iteration
    assert factors[STEPS] > factors[2 * STEPS] > factors[-1] > 0


def test_constant_is_one_after_warmup():
    assert curve(OptimizerConfig(schedule="constant")) == [1.0] * (STEPS * EPOCHS)
    assert curve(OptimizerConfig(schedule="constant", warmup_epochs=1))[STEPS - 1:] == [1.0] * (STEPS * (EPOCHS - 1) + 1)


def test_apply_scales_every_group_by_its_own_initial_lr():
    cfg = OptimizerConfig(lr=0.1, schedule="cosine", weight_decay_weights_only=True)
    optimizer = build_optimizer(small_net(), cfg)
    optimizer.param_groups[1]["initial_lr"] = 0.01  # e.g. a smaller LR for some group
    schedule = LrSchedule(cfg, steps_per_epoch=STEPS, epochs=EPOCHS)
    lr = schedule.apply(optimizer, 25)
    assert lr == optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.01 * 0.5)
    assert set_lr(optimizer, 0.1, 0.5) == 0.05  # the older helper still sets every group


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"warmup_epochs": 1, "warmup_iters": 100},
    {"milestones": [4, 2]},
    {"milestones": [2, 2]},
    {"milestones": [0, 3]},
    {"min_lr_factor": 1.0},
    {"warmup_factor": 1.5},
    {"power": 0},
    {"schedule": "linear"},
    {"warmup_itrs": 5},
])
def test_invalid_optimizer_tables_are_rejected(bad):
    with pytest.raises(ValidationError):
        OptimizerConfig(**bad)


def test_both_warmups_in_a_recipe_is_an_error_with_file_and_line(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('task = "t"\n[model]\nname = "mobilenet_v1"\n\n[float.optimizer]\nwarmup_epochs = 1\nwarmup_iters = 9\n')
    with pytest.raises(RecipeError, match=r"r\.toml:5: `float\.optimizer`: .*warmup_epochs or warmup_iters, not both"):
        load_recipe(path)


# -- EMA ---------------------------------------------------------------------------------------------


def bn_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.train()
        model(torch.randn(2, 3, 8, 8))  # moves running stats, bumps num_batches_tracked


def test_ema_copy_is_frozen_and_in_eval_mode():
    ema = ModelEMA(bn_net())
    assert not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_with_constant_decay_one_half_is_the_average_and_copies_integers():
    model = bn_net()
    ema = ModelEMA(model, decay=0.5, tau=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perturb(model)
    assert ema.update(model) == 0.5
    after = model.state_dict()
    for key, value in ema.module.state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, (before[key] + after[key]) / 2)
        else:
            assert torch.equal(value, after[key])
    assert ema.module[1].num_batches_tracked.item() == 1


def test_ema_decay_ramps_up_with_tau():
    ema = ModelEMA(bn_net(), decay=0.999, tau=10)
    assert ema.effective_decay(1) == pytest.approx(0.999 * (1 - math.exp(-0.1)))
    assert ema.effective_decay(1000) == pytest.approx(0.999)


def test_ema_of_an_fx_graph_module():
    model = torch.fx.symbolic_trace(bn_net())
    assert isinstance(model, torch.fx.GraphModule)
    ema = ModelEMA(model, decay=0.5, tau=0)
    assert isinstance(ema.module, torch.fx.GraphModule)
    weight = model.state_dict()["0.weight"].clone()
    perturb(model)
    ema.update(model)
    torch.testing.assert_close(ema.module.state_dict()["0.weight"], weight + 0.5)
    x = torch.randn(1, 3, 8, 8)
    assert ema.module(x).shape == model.eval()(x).shape


def test_ema_of_a_wrapped_model_averages_the_inner_module():
    class Wrapper:  # what DistributedDataParallel looks like to ModelEMA
        def __init__(self, module):
            self.module = module

    model = bn_net()
    ema = ModelEMA(Wrapper(model), decay=0.5, tau=0)
    assert isinstance(ema.module, nn.Sequential)  # not the wrapper
    weight = model[0].weight.detach().clone()
    perturb(model)
    ema.update(Wrapper(model))
    torch.testing.assert_close(ema.module[0].weight, weight + 0.5)
    assert set(ema.module.state_dict()) == set(model.state_dict())  # no "module." prefix

    ema_dp = ModelEMA(nn.DataParallel(model))  # a real torch wrapper on CPU
    assert set(ema_dp.module.state_dict()) == set(model.state_dict())


def test_ema_state_dict_round_trip():
    model = bn_net()
    ema = ModelEMA(model, decay=0.9, tau=5)
    for _ in range(3):
        perturb(model)
        ema.update(model)
    state = ema.state_dict()
    assert (state["updates"], state["decay"], state["tau"]) == (3, 0.9, 5)

    restored = ModelEMA(bn_net())
    restored.load_state_dict(state)
    assert (restored.updates, restored.decay, restored.tau) == (3, 0.9, 5)
    mine, theirs = restored.module.state_dict(), ema.module.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
