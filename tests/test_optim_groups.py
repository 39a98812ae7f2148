"""Per-parameter optimizer rules (`param_rules`) and cosine with warm restarts (`cosine_restarts`).

What low-bit QAT recipes rely on: some parameters (biases, learned quantizer scales or clip
values, the classifier) get their own weight decay or learning rate, and the LR can restart
(SGDR, Loshchilov & Hutter). Each test below states one rule of how these keys behave.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from hatcli.engine.checkpoint import load_checkpoint, save_checkpoint
from hatcli.engine.schedule import LrSchedule, _split, build_optimizer, lr_factor, param_groups
from hatcli.engine.trainer import TrainSpec, fit
from hatcli.errors import ArtifactError, Interrupted, RecipeError
from hatcli.quant.lsq import LsqFakeQuantize
from hatcli.recipe import load_recipe
from hatcli.recipe_schema import OptimizerConfig
from tiny_nets import TinyFamily, TinyNet
from replay import ReplayBatches, StopAt


class Clip(nn.Module):
    """A PACT-like learned clip value: a quantizer parameter that must not decay."""

    no_weight_decay = True

    def __init__(self) -> None:
        super().__init__()
        self.clip_val = nn.Parameter(torch.tensor([6.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.relu(x), self.clip_val)


def net() -> nn.Sequential:
    """`0` conv (weight, bias), `1` BN (weight, bias), `2` clip (clip_val), `4` linear (weight, bias)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Clip(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def rules(*items: dict, **options) -> OptimizerConfig:
    return OptimizerConfig(param_rules=list(items), **options)


def settings(model: nn.Module, cfg: OptimizerConfig) -> dict[str, tuple[float, float]]:
    """Parameter name -> (initial_lr, weight_decay) of the group it landed in."""
    where = {id(p): (g["initial_lr"], g["weight_decay"]) for g in param_groups(model, cfg) for p in g["params"]}
    return {name: where[id(p)] for name, p in model.named_parameters() if id(p) in where}


# -- weight decay and learning rate per parameter -------------------------------------------------


def test_a_bias_rule_removes_weight_decay_from_biases_only():
    got = settings(net(), rules({"pattern": "*.bias", "weight_decay": 0.0}, weight_decay=1e-4))
    assert got == {"0.weight": (0.1, 1e-4), "0.bias": (0.1, 0.0), "1.weight": (0.1, 1e-4), "1.bias": (0.1, 0.0),
                   "2.clip_val": (0.1, 0.0),  # a quantizer parameter: no_weight_decay still holds
                   "4.weight": (0.1, 1e-4), "4.bias": (0.1, 0.0)}


def test_lr_scale_sets_the_groups_initial_lr_and_the_schedule_scales_it():
    cfg = rules({"pattern": "4.*", "lr_scale": 0.1}, lr=0.2, schedule="cosine", weight_decay=0.0)
    model = net()
    optimizer = build_optimizer(model, cfg)
    stage, head = optimizer.param_groups  # the stage's LR first: it is the one logged
    assert ids(head["params"]) == ids(model[4].parameters())
    assert stage["initial_lr"] == 0.2 and head["initial_lr"] == pytest.approx(0.02)
    schedule = LrSchedule(cfg, steps_per_epoch=10, epochs=5)
    for step in (0, 25, 49):
        logged = schedule.apply(optimizer, step)
        assert logged == stage["lr"] == 0.2 * schedule.factor(step)
        assert head["lr"] == pytest.approx(0.02 * schedule.factor(step))
    assert schedule.factor(25) == pytest.approx(0.5)


def test_an_absolute_lr_replaces_the_stage_lr():
    got = settings(net(), rules({"pattern": "1.*", "lr": 0.5}, lr=0.1, weight_decay=0.0))
    assert got["1.weight"] == got["1.bias"] == (0.5, 0.0)
    assert got["0.weight"] == (0.1, 0.0)


def test_the_first_matching_rule_wins():
    got = settings(net(), rules({"pattern": "4.bias", "lr": 0.3},
                                {"pattern": "4.*", "lr_scale": 0.1, "weight_decay": 0.0}, weight_decay=1e-4))
    assert got["4.bias"] == (0.3, 1e-4)  # the first rule gives no weight decay: the stage's applies
    assert got["4.weight"] == (pytest.approx(0.01), 0.0)


def test_a_rule_weight_decay_wins_over_weights_only_and_no_weight_decay():
    cfg = rules({"pattern": "*.clip_val", "weight_decay": 1e-3}, {"pattern": "1.bias", "weight_decay": 1e-5},
                weight_decay=1e-4, weight_decay_weights_only=True)
    got = settings(net(), cfg)
    assert got["2.clip_val"] == (0.1, 1e-3)  # no_weight_decay = True, but the rule says so
    assert got["1.bias"] == (0.1, 1e-5)  # 1-d, but the rule says so
    assert got["1.weight"] == got["0.bias"] == (0.1, 0.0)  # no rule: weights_only still exempts them
    assert got["0.weight"] == got["4.weight"] == (0.1, 1e-4)


def test_quantizer_parameters_never_decay_without_a_rule():
    model = net()
    for weights_only in (False, True):
        head_rule = rules({"pattern": "4.*", "lr_scale": 0.5}, weight_decay=1e-2, weight_decay_weights_only=weights_only)
        for cfg in (OptimizerConfig(weight_decay=1e-2, weight_decay_weights_only=weights_only), head_rule):
            assert settings(model, cfg)["2.clip_val"][1] == 0.0


def test_lsq_scales_take_an_lr_rule_and_keep_no_weight_decay():
    lsq = LsqFakeQuantize(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric)
    model = nn.Sequential(nn.Linear(4, 4), lsq)  # in a QAT graph: activation_post_process_<n>.scale
    got = settings(model, rules({"pattern": "*.scale", "lr_scale": 10.0}, weight_decay=1e-4))
    assert got == {"0.weight": (0.1, 1e-4), "0.bias": (0.1, 1e-4), "1.scale": (1.0, 0.0)}


def test_parameters_with_the_same_settings_share_one_group():
    model = net()
    cfg = rules({"pattern": "0.*", "lr_scale": 0.5}, {"pattern": "4.*", "lr_scale": 0.5},
                {"pattern": "1.*", "weight_decay": 0.0}, weight_decay=1e-4)
    groups = param_groups(model, cfg)
    # BN (by its rule) and clip_val (no_weight_decay) share (0.1, 0); conv and linear, two rules, share (0.05, 1e-4).
    # The groups at the stage's lr come first, so the LR the trainer logs is the stage's.
    assert [(g["initial_lr"], g["weight_decay"], len(g["params"])) for g in groups] == [(0.1, 0.0, 3), (0.05, 1e-4, 4)]
    assert ids(groups[0]["params"]) == ids([model[1].weight, model[1].bias, model[2].clip_val])
    assert param_groups(model, cfg)[1]["params"] == groups[1]["params"]  # the same order every time (resume)


def test_without_rules_the_groups_are_exactly_the_old_ones():
    model = net()
    exempt = frozenset({id(model[2].clip_val)})
    for options in ({}, {"weight_decay": 0.0}, {"weight_decay_weights_only": True},
                    {"weight_decay_weights_only": True, "weight_decay": 0.0}):
        cfg = OptimizerConfig(**options)
        old = _split(list(model.parameters()), cfg, exempt)
        new = param_groups(model, cfg)
        assert [list(g) for g in new] == [list(g) for g in old]  # same keys, same order
        assert [(ids(g["params"]), g["weight_decay"], g["initial_lr"]) for g in new] == [
            (ids(g["params"]), g["weight_decay"], g["initial_lr"]) for g in old]


def test_frozen_parameters_get_no_group_but_rules_may_name_them():
    model = net()
    model[0].requires_grad_(False)
    got = settings(model, rules({"pattern": "0.*", "lr": 0.5}))  # matches frozen ones only: not an error
    assert "0.weight" not in got and "0.bias" not in got and len(got) == 5


def test_a_rule_that_matches_nothing_is_a_recipe_error_naming_it_and_close_names():
    with pytest.raises(RecipeError, match=r"`qat\.optimizer\.param_rules\[1\]` \(pattern `\*\.clip_value`\) matches "
                                          r"no parameter of the model; close names: `2\.clip_val`") as info:
        build_optimizer(net(), rules({"pattern": "*.bias", "weight_decay": 0.0},
                                     {"pattern": "*.clip_value", "weight_decay": 0.0}), where="qat.optimizer")
    assert info.value.exit_code == 2
    with pytest.raises(RecipeError, match=r"pattern `fc\.\*`\) matches no parameter .*named like `0\.weight`"):
        param_groups(net(), rules({"pattern": "fc.*", "lr_scale": 0.1}))


def test_a_rule_that_earlier_rules_shadow_entirely_is_an_error():
    with pytest.raises(RecipeError, match=r"param_rules\[1\]` \(pattern `4\.bias`\) takes no parameter: .*earlier "
                                          r"rule `\*\.bias`.*put the more specific rule first"):
        param_groups(net(), rules({"pattern": "*.bias", "weight_decay": 0.0}, {"pattern": "4.bias", "lr": 1.0}))


def test_rules_need_the_model_not_a_list_of_parameters():
    with pytest.raises(ValueError, match="pass the model"):
        build_optimizer(list(net().parameters()), rules({"pattern": "*", "lr": 1.0}))


@pytest.mark.parametrize("bad", [
    {"pattern": "*.bias", "lr": 0.1, "lr_scale": 0.5},  # both
    {"pattern": "*.bias"},  # sets nothing
    {"pattern": "", "lr": 0.1},
    {"pattern": "*.bias", "weight_decay": -1.0},
    {"pattern": "*.bias", "lr_scale": 0.0},
    {"pattern": "*.bias", "lr": 0.0},
    {"pattern": "*.bias", "momentum": 0.5},  # not a rule key
])
def test_invalid_rules_are_rejected(bad):
    with pytest.raises(ValidationError):
        OptimizerConfig(param_rules=[bad])


# -- cosine with warm restarts --------------------------------------------------------------------


def sgdr(steps: int = 5, epochs: int = 14, **options) -> list[float]:
    cfg = OptimizerConfig(schedule="cosine_restarts", **options)
    schedule = LrSchedule(cfg, steps_per_epoch=steps, epochs=epochs)
    return [schedule.factor(step) for step in range(steps * epochs)]


def test_restarts_after_2_then_4_then_8_epochs_with_restart_mult_2():
    factors = sgdr(restart_epochs=2, restart_mult=2, min_lr_factor=0.1)  # 5 steps/epoch, 14 epochs
    assert [i for i, f in enumerate(factors) if f == 1.0] == [0, 10, 30]  # cycles of 10, 20, 40 iterations
    for start, length in ((0, 10), (10, 20), (30, 40)):
        cycle = factors[start:start + length]
        assert all(a > b for a, b in zip(cycle, cycle[1:]))  # falls all through the cycle
        assert cycle[length // 2] == pytest.approx(0.1 + 0.9 * 0.5)  # half way: half way down
        # the last iteration is one step short of the minimum, reached at t = T_i (the restart)
        assert cycle[-1] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * (length - 1) / length)) / 2)
        assert cycle[-1] == min(cycle) and cycle[-1] < 0.1 + 0.9 * 0.03
    assert lr_factor(OptimizerConfig(schedule="cosine_restarts", restart_epochs=2, restart_mult=2), 70, 5, 14) == 1.0


def test_equal_cycles_by_default_and_the_defaults_are_filled_in():
    cfg = OptimizerConfig(schedule="cosine_restarts")
    assert (cfg.restart_epochs, cfg.restart_mult) == (10.0, 1.0)
    factors = sgdr(steps=2, epochs=30)
    assert [i for i, f in enumerate(factors) if f == 1.0] == [0, 20, 40]
    assert factors[0:20] == factors[20:40] == factors[40:60]


def test_cycle_lengths_are_rounded_to_whole_iterations_and_at_least_one():
    assert [i for i, f in enumerate(sgdr(steps=10, epochs=1, restart_epochs=0.3)) if f == 1.0] == [0, 3, 6, 9]
    assert sgdr(steps=5, epochs=2, restart_epochs=0.01) == [1.0] * 10  # every iteration restarts
    # a growing fractional cycle: round(0.3 * 1.5 ** i * 10) = 3, 4 (4.5 rounds to even), 7, 10
    assert [i for i, f in enumerate(sgdr(steps=10, epochs=3, restart_epochs=0.3, restart_mult=1.5))
            if f == 1.0] == [0, 3, 7, 14, 24]


def test_restarts_count_from_the_end_of_warmup():
    factors = sgdr(steps=5, epochs=6, restart_epochs=1, restart_mult=2, warmup_iters=3, warmup_factor=0.1)
    assert factors[:3] == pytest.approx([0.1 + 0.9 * k / 3 for k in (1, 2, 3)])  # plain warm-up
    assert [i for i, f in enumerate(factors) if f == 1.0] == [2, 3, 8, 18]  # warm-up's last step, then 3 + 0, 5, 15


def test_by_epoch_restarts_hold_for_whole_epochs():
    per_epoch = sgdr(by_epoch=True, restart_epochs=2, restart_mult=2)
    per_iteration = sgdr(restart_epochs=2, restart_mult=2)
    for epoch in range(14):
        values = per_epoch[epoch * 5:(epoch + 1) * 5]
        assert values == [per_iteration[epoch * 5]] * 5  # the value at the epoch's first iteration
    assert [e for e in range(14) if per_epoch[e * 5] == 1.0] == [0, 2, 6]


def test_by_epoch_restarts_after_a_warmup_of_one_epoch():
    factors = sgdr(epochs=6, by_epoch=True, warmup_epochs=1, restart_epochs=1, restart_mult=2)
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # warm-up stays per iteration
    per_epoch = [factors[e * 5:(e + 1) * 5] for e in range(1, 6)]
    assert all(len(set(values)) == 1 for values in per_epoch)
    # cycles of 1, 2, 4 epochs from the end of warm-up: restarts at epochs 1, 2 and 4
    assert [values[0] for values in per_epoch] == pytest.approx([1.0, 1.0, 0.5, 1.0, 0.5 + 0.5 * math.cos(math.pi / 4)])


def test_restart_keys_with_another_schedule_are_rejected():
    with pytest.raises(ValidationError, match=r'restart_epochs is only for schedule = "cosine_restarts" '
                                              r'\(the schedule is "cosine"\)'):
        OptimizerConfig(schedule="cosine", restart_epochs=2)
    with pytest.raises(ValidationError, match="restart_epochs and restart_mult are only for"):
        OptimizerConfig(schedule="step", restart_epochs=2, restart_mult=2)
    with pytest.raises(ValidationError):
        OptimizerConfig(schedule="cosine_restarts", restart_mult=0.5)  # cycles never shrink
    with pytest.raises(ValidationError):
        OptimizerConfig(schedule="cosine_restarts", restart_epochs=0)


# -- recipes ----------------------------------------------------------------------------------------

RECIPE = '''task = "t"
[model]
name = "mobilenet_v1"

[qat.optimizer]
lr = 0.001
schedule = "cosine_restarts"
restart_epochs = 0.5
restart_mult = 2
param_rules = [
  {{ pattern = "*.bias", weight_decay = 0.0 }},
  {{ pattern = "classifier.*", lr_scale = 0.1 }},
]
{extra}'''


def test_a_recipe_with_param_rules_and_restarts_loads(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE.format(extra='[[float.optimizer.param_rules]]\npattern = "*.scale"\nlr = 0.01\n'))
    loaded = load_recipe(path)
    qat = loaded.recipe.qat.optimizer
    assert [(r.pattern, r.weight_decay, r.lr_scale, r.lr) for r in qat.param_rules] == [
        ("*.bias", 0.0, None, None), ("classifier.*", None, 0.1, None)]
    assert (qat.schedule, qat.restart_epochs, qat.restart_mult) == ("cosine_restarts", 0.5, 2.0)
    assert loaded.recipe.float_.optimizer.param_rules[0].lr == 0.01
    assert loaded.resolved["qat"]["optimizer"]["param_rules"][1] == {
        "pattern": "classifier.*", "weight_decay": None, "lr_scale": 0.1, "lr": None}
    again = tmp_path / "again.toml"
    again.write_text(loaded.to_toml())  # the resolved recipe (as runs/<task>/<stage>/recipe.toml) loads back
    assert load_recipe(again).resolved == loaded.resolved


def test_a_recipe_with_restart_epochs_and_cosine_is_an_error_with_file_and_line(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('task = "t"\n[model]\nname = "mobilenet_v1"\n\n[float.optimizer]\nschedule = "cosine"\n'
                    'restart_epochs = 5\n')
    with pytest.raises(RecipeError, match=r'r\.toml:5: `float\.optimizer`: restart_epochs is only for schedule = '
                                          r'"cosine_restarts"'):
        load_recipe(path)


def test_a_bad_rule_in_a_recipe_names_its_index(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE.format(extra="").replace("lr_scale = 0.1", "lr_scale = 0.1, lr = 0.2"))
    with pytest.raises(RecipeError, match=r"`qat\.optimizer\.param_rules\[1\]`: give either lr or lr_scale"):
        load_recipe(path)


# -- training and resume ----------------------------------------------------------------------------


def Batches() -> ReplayBatches:
    """Six fixed batches, reshuffled per epoch (the contract of the trainer's loaders)."""
    gen = torch.Generator().manual_seed(0)
    return ReplayBatches([(torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 5, (4,), generator=gen))
                          for _ in range(6)])


RULED = OptimizerConfig(lr=0.05, weight_decay=1e-3, weight_decay_weights_only=True, schedule="cosine_restarts",
                        restart_epochs=1, restart_mult=2,
                        param_rules=[{"pattern": "head.*", "lr_scale": 0.1}, {"pattern": "stem.1.*", "lr": 0.01}])


def train(out_dir: Path, cfg: OptimizerConfig = RULED, callbacks=(), resume: bool = False) -> dict:
    torch.manual_seed(0)
    spec = TrainSpec(epochs=3, optimizer=cfg, label_smoothing=0.0, val_every=3, out_dir=out_dir, stage="float")
    loader = Batches()
    return fit(TinyNet(), TinyFamily(), loader, loader, spec, resume=resume, callbacks=list(callbacks))


def test_a_run_with_several_groups_resumes_bitwise_exactly(tmp_path, one_thread):
    train(tmp_path / "whole")
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint-last.pt")
    groups = whole["optimizer"]["param_groups"]
    assert [(g["initial_lr"], g["weight_decay"]) for g in groups] == [
        (0.05, 1e-3), (0.05, 0.0), (pytest.approx(0.005), 1e-3), (0.01, 0.0), (pytest.approx(0.005), 0.0)]
    with pytest.raises(Interrupted):
        train(tmp_path / "cut", callbacks=[StopAt(8)])  # epoch 2, in the second SGDR cycle
    train(tmp_path / "cut", resume=True)
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint-last.pt")
    assert all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])
    assert [g["lr"] for g in cut["optimizer"]["param_groups"]] == [g["lr"] for g in whole["optimizer"]["param_groups"]]


def test_resuming_with_other_parameter_groups_is_refused_clearly(tmp_path, one_thread):
    with pytest.raises(Interrupted):
        train(tmp_path / "run", callbacks=[StopAt(2)])
    last = tmp_path / "run" / "checkpoint-last.pt"
    state = load_checkpoint(last)
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:2]  # as if written with other rules
    save_checkpoint(last, state)
    with pytest.raises(ArtifactError, match="optimizer state does not fit this stage's parameter groups"):
        train(tmp_path / "run", resume=True)


def test_hat_train_with_an_unmatched_rule_exits_2_naming_it(tmp_path, tiny_recipe, hat):
    path = tmp_path / "r.toml"
    path.write_text(tiny_recipe.read_text().replace(
        "[float.optimizer]\n", '[float.optimizer]\nparam_rules = [{ pattern = "fc.*", lr_scale = 0.1 }]\n'))
    result = hat("train", path, "--stage", "float")
    assert result.code == 2
    assert "`float.optimizer.param_rules[0]` (pattern `fc.*`) matches no parameter" in result.err
    assert "classifier" in result.err or "features" in result.err


def ids(params) -> set[int]:
    return {id(p) for p in params}
