"""Low-bit QAT schemes (docs/quant_schemes.md): the grids, each algorithm's forward and gradients,
which layers get which bits, and the property that matters for deployment: the compiled artifact
of a low-bit network computes bit for bit what its integer program (`int_infer`) computes."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from artifact_check import _Family, compare_with_artifacts
from test_plugins import install, site  # noqa: F401  (`site`: the throwaway site-packages fixture)
from hatcli.errors import RecipeError, UsageError
from hatcli.quant.flow import convert_to_integer, prepare_quantized, set_mode
from hatcli.quant.integer import integer_program
from hatcli.quant.low_bit import schemes as S
from hatcli.quant.low_bit.dorefa import DorefaActivationFakeQuantize, DorefaWeightFakeQuantize
from hatcli.quant.low_bit.grids import signed_range, symmetric_range, unsigned_range
from hatcli.quant.low_bit.lqnet import LqFakeQuantize
from hatcli.quant.low_bit.lsq import LsqActivationFakeQuantize, LsqWeightFakeQuantize
from hatcli.quant.low_bit.pact import PactFakeQuantize
from hatcli.quant.low_bit.plan import LayerRule, QuantPlan
from hatcli.quant.low_bit.xnor import SignFakeQuantize, XnorWeightFakeQuantize
from hatcli.quant.march import SHIPPED_MARCHES as MARCH_NAMES, load_march

SCHEMES = {"lsq": S.LsqScheme(), "pact": S.DorefaScheme(name="pact", learned_clip=True), "dorefa": S.DorefaScheme(),
           "xnor": S.XnorScheme(), "xnorpp": S.XnorScheme(name="xnorpp", learned_scale=True), "lqnet": S.LqScheme()}
UNIFORM = [("lsq", 2, 2), ("lsq", 4, 4), ("pact", 2, 2), ("pact", 4, 4), ("dorefa", 3, 3), ("dorefa", 2, 2),
           ("xnor", 1, 1), ("xnorpp", 1, 1)]


class ResidualNet(nn.Module):
    """conv-BN-ReLU, a basic residual block, a strided shortcut, global pooling, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv4, self.bn4 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.downsample = nn.Conv2d(8, 16, 1, stride=2)
        self.relu3, self.relu4 = nn.ReLU(), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 5)
        for bn in (self.bn1, self.bn2, self.bn3, self.bn4):  # BatchNorm that folding must carry
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.2)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(self.relu2(self.bn2(self.conv2(x)))))
        x = self.relu3(x + y)
        x = self.relu4(self.bn4(self.conv4(x)) + self.downsample(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _prepared(scheme: str, wb: int, ab: int, **plan_options):
    torch.manual_seed(0)
    net = ResidualNet().eval()
    plan = QuantPlan(scheme=scheme, weight_bits=wb, activation_bits=ab, **plan_options)
    prepared, quantizer = prepare_quantized(_Family(net), net, (8, 8), load_march("nash_e"), [], plan=plan,
                                            schemes=SCHEMES)
    set_mode(prepared, "calibrate")
    with torch.no_grad():
        for _ in range(2):
            prepared(torch.randn(8, 3, 8, 8))
    set_mode(prepared, "eval")
    return prepared, quantizer


# -- grids and plans ------------------------------------------------------------------------------

def test_b_bit_grids_are_subsets_of_int8():
    assert unsigned_range(2) == (0, 3) and signed_range(2) == (-2, 1) and symmetric_range(2) == (-1, 1)
    assert symmetric_range(1) == (-1, 1) and unsigned_range(8) == (0, 255) and signed_range(8) == (-128, 127)
    with pytest.raises(ValueError):
        unsigned_range(9)


def test_the_first_and_last_layer_stay_at_int8_unless_a_rule_names_them():
    plan = QuantPlan(scheme="lsq", weight_bits=2, activation_bits=2, real_skip=True,
                     rules=(LayerRule("layer4.*", weight_bits=4), LayerRule("fc", activation_bits=8),
                            LayerRule("layer1.0.conv1", scheme="march")))
    assert plan.layer("conv1", first=True, last=False) is None
    assert plan.layer("layer2.0.conv1", False, False).describe() == "lsq W2A2"
    assert plan.layer("layer4.1.conv2", False, False).describe() == "lsq W4A2"
    assert plan.layer("fc", False, True).describe() == "lsq W2A8"  # a rule wins over keep_first_last
    assert plan.layer("layer1.0.conv1", False, False) is None
    assert plan.layer("layer2.0.downsample.0", False, False) is None  # real_skip
    assert QuantPlan().layer("layer2.0.conv1", False, False) is None  # the march's scheme


def test_the_quantizer_records_each_low_bit_layer_and_skips_the_ends():
    _, quantizer = _prepared("lsq", 2, 3, real_skip=True)
    assert {k: v.describe() for k, v in quantizer.layer_bits.items()} == {
        "conv2": "lsq W2A3", "conv3": "lsq W2A3", "conv4": "lsq W2A3"}


# -- the algorithms ------------------------------------------------------------------------------

def test_lsq_starts_from_two_mean_abs_over_sqrt_qp():
    weight = torch.randn(4, 3, 3, 3)
    fq = LsqWeightFakeQuantize(bits=3)
    fq.disable_fake_quant()
    fq(weight)  # calibrating: observer on, fake quant off
    expected = 2 * weight.abs().reshape(4, -1).mean(1) / math.sqrt(3)
    torch.testing.assert_close(fq.grid_scale().detach(), expected)
    act = LsqActivationFakeQuantize(bits=2, signed=False)
    act.disable_fake_quant()
    a, b = torch.rand(100), 3 * torch.rand(100)
    act(a), act(b)
    torch.testing.assert_close(act.grid_scale().detach(), 2 * (a.mean() + b.mean()).reshape(1) / 2 / math.sqrt(3))


def test_lsq_weights_land_on_the_grid_and_their_step_learns():
    fq = LsqWeightFakeQuantize(bits=2, groups=2)
    weight = torch.randn(4, 2, 3, 3, requires_grad=True)
    out = fq(weight)
    codes = out.detach() / fq.grid_scale().detach().reshape(-1, 1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-5) and codes.min() >= -2 and codes.max() <= 1
    assert fq.scale.shape == (2,)  # one step per group of two channels
    out.square().sum().backward()
    assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0


def test_pact_alpha_gets_the_gradient_of_the_clipped_values_only():
    fq = PactFakeQuantize(bits=2, signed=False)
    fq.alpha.data.fill_(1.0)
    fq.initialized.fill_(1)
    x = torch.tensor([-1.0, 0.2, 0.5, 0.9, 1.5, 3.0], requires_grad=True)
    y = fq(x)
    torch.testing.assert_close(y.detach(), torch.tensor([0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]))
    y.sum().backward()
    assert fq.alpha.grad.item() == pytest.approx(2.0)  # the two values above alpha
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))



@pytest.mark.parametrize("fq_class", [PactFakeQuantize, DorefaActivationFakeQuantize])
def test_pact_and_dorefa_clips_start_at_the_least_error_clip_below_the_largest_value(fq_class):
    torch.manual_seed(0)
    fq = fq_class(bits=2, signed=False)
    fq.disable_fake_quant()
    fq.enable_observer()
    batches = [torch.randn(4096).abs() for _ in range(3)]
    for batch in batches:
        fq(batch)
    clip = (fq.alpha if fq_class is PactFakeQuantize else fq.clip).item()
    largest = sum(b.max().item() for b in batches) / 3
    assert 0.2 * largest < clip < 0.7 * largest  # 2 bits on half-normal values: about 1.7 sigma of ~4

    def error(c: float) -> float:
        x = batches[0]
        step = c / 3
        return (torch.clamp(torch.round(x.clamp(max=c) / step), 0, 3) * step - x).square().mean().item()

    assert error(clip) < min(error(largest), error(0.5 * clip))
    if fq_class is PactFakeQuantize:  # an int8 quantizer in front clipping at 0.9 x the largest
        fq.enable_fake_quant()
        fq.disable_observer()
        fq(batches[0].clamp(max=0.9 * largest)).sum().backward()
        assert fq.alpha.grad.item() > 0  # some inputs are above alpha: PACT learns from the start

def test_dorefa_weights_are_odd_codes_per_channel():
    fq = DorefaWeightFakeQuantize(bits=3)
    weight = torch.randn(6, 4, 3, 3) * torch.linspace(0.1, 10, 6).reshape(6, 1, 1, 1)
    out = fq(weight)
    codes = out / fq.grid_scale().reshape(-1, 1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert set(codes.round().unique().int().tolist()) <= {-7, -5, -3, -1, 1, 3, 5, 7}
    # each channel keeps its own magnitude (what the folded BatchNorm put there)
    torch.testing.assert_close(out.abs().reshape(6, -1).amax(1), weight.abs().reshape(6, -1).amax(1))


def test_xnor_weights_are_the_channel_mean_times_the_sign():
    fq = XnorWeightFakeQuantize()
    weight = torch.randn(3, 2, 3, 3)
    out = fq(weight)
    alpha = weight.abs().reshape(3, -1).mean(1).reshape(3, 1, 1, 1)
    torch.testing.assert_close(out, alpha * torch.where(weight >= 0, 1.0, -1.0))


def test_sign_activations_use_the_clipped_straight_through_gradient():
    fq = SignFakeQuantize()
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    y = fq(x)
    assert y.tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]  # torch.sign, as the integer table computes it
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert fq.explicit_op is torch.ops.aten.sign.default


def test_lqnet_fits_its_basis_and_lowers_the_quantization_error():
    torch.manual_seed(0)
    fq = LqFakeQuantize(bits=2, signed=True, per_channel=True)
    weight = torch.randn(4, 64) ** 3  # heavy tails: a uniform grid fits them badly
    fq.disable_fake_quant()
    fq(weight)
    fq.enable_fake_quant()
    with torch.no_grad():
        before = (fq(weight) - weight).square().mean()
    for _ in range(20):
        fq(weight.clone().requires_grad_())  # training steps refit the basis (QEM)
    with torch.no_grad():
        after = (fq(weight) - weight).square().mean()
    assert after < 0.8 * before
    assert fq.levels().shape == (4, 4)


def test_lqnet_is_refused_at_conversion_with_the_reason():
    prepared, _ = _prepared("lqnet", 2, 2)
    with pytest.raises(UsageError, match="not a uniform grid.*--stage qat"):
        convert_to_integer(prepared)


def test_a_calibration_checkpoint_loads_into_a_fresh_graph():
    prepared, _ = _prepared("lsq", 2, 2, weight_groups=2)
    fresh, _ = prepare_quantized(_Family(ResidualNet()), ResidualNet().eval(), (8, 8), load_march("nash_e"), [],
                                 plan=QuantPlan(scheme="lsq", weight_bits=2, activation_bits=2, weight_groups=2),
                                 schemes=SCHEMES)
    fresh.load_state_dict(prepared.state_dict())
    set_mode(fresh, "eval")
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), prepared(x))


@pytest.mark.parametrize("scheme,wb,ab", UNIFORM)
def test_the_integer_program_follows_the_fake_quant_graph(scheme, wb, ab):
    prepared, _ = _prepared(scheme, wb, ab)
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        fake = prepared(x)
        integer = integer_program(convert_to_integer(copy.deepcopy(prepared)))(x)
    # they differ where the fake-quant graph's float arithmetic rounds an int8 value the other way,
    # which now and then moves a low-bit code by one step
    assert (fake.argmax(1) == integer.argmax(1)).float().mean() >= 0.95
    assert (fake - integer).abs().mean() < 0.05 * fake.abs().mean()


# -- the artifact computes what int_infer computes ---------------------------------------------------

def _assert_exact(scheme, wb, ab, march, opts, weights=("uint8",), **plan_options):
    plan = QuantPlan(scheme=scheme, weight_bits=wb, activation_bits=ab, **plan_options)
    result = compare_with_artifacts(ResidualNet(), march, size=(8, 8), opts=opts, weights=weights, plan=plan,
                                    schemes=SCHEMES, qat_steps=2)
    assert not result.disagreements, [str(d) for d in result.disagreements]
    return result


@pytest.mark.parametrize("scheme,wb,ab", UNIFORM)
def test_low_bit_artifacts_equal_int_infer(scheme, wb, ab):
    result = _assert_exact(scheme, wb, ab, "nash_e", (0, 3), keep_first_last=False)
    if scheme.startswith("xnor"):
        assert any(op.startswith("table sign") for op in result.integer_ops)
        assert "Sign" not in result.compiled_ops[(3, "uint8")][1:]  # inner signs are tables, not float ops


@pytest.mark.parametrize("march", MARCH_NAMES)
def test_lsq_w2a2_artifacts_equal_int_infer_on_every_march(march):
    _assert_exact("lsq", 2, 2, march, (0, 1, 2, 3))


@pytest.mark.slow
@pytest.mark.parametrize("march", MARCH_NAMES)
@pytest.mark.parametrize("scheme,wb,ab", UNIFORM)
def test_every_uniform_scheme_is_exact_on_every_march_and_level(scheme, wb, ab, march):
    _assert_exact(scheme, wb, ab, march, (0, 1, 2, 3), weights=("uint8", "int8"))


# -- recipes ---------------------------------------------------------------------------------------

def _recipe(tmp_path, tiny_recipe, quant: str) -> Path:
    text = tiny_recipe.read_text().replace('[quant]\nmarch = "nash_e"', f'[quant]\nmarch = "nash_e"\n{quant}')
    path = tmp_path / "low_bit.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("quant,message", [
    ('scheme = "lsqq"', r"unknown quantization scheme `lsqq`; did you mean `lsq`\?"),
    ('scheme = "xnor"\nweight_bits = 2\nactivation_bits = 1', r"`quant.weight_bits`: scheme `xnor` trains weights at 1 bits, not 2"),
    ('scheme = "dorefa"\nweight_bits = 8', r"scheme `dorefa` trains weights at 1 to 7 bits, not 8"),
    ('scheme = "lsq"\nweight_bits = 9', r"weight_bits"),
    ('scheme = "lsq"\nweight_bits = 2\n[[quant.layers]]\npattern = "fc"\nscheme = "nope"', r"quant.layers\[0\].scheme"),
])
def test_a_scheme_or_bits_it_cannot_train_stops_at_recipe_load(hat, tmp_path, tiny_recipe, quant, message):
    result = hat("recipe", "validate", _recipe(tmp_path, tiny_recipe, quant))
    assert result.code == 2 and re.search(message, result.err), result.err


def test_hat_run_trains_lsq_w2a2_to_an_artifact_that_equals_int_infer(hat, tmp_path, tiny_recipe):
    recipe = _recipe(tmp_path, tiny_recipe, 'scheme = "lsq"\nweight_bits = 2\nactivation_bits = 2')
    result = hat("run", recipe, "--json")
    assert result.code == 0, result.err
    rows = {row["stage"]: row for row in result.json()}
    assert rows["deploy"]["values"]["top1"] == rows["int_infer"]["values"]["top1"]
    compared = hat("eval", recipe, "--stage", "deploy", "--compare", "int_infer", "--json")
    assert compared.code == 0, compared.err
    pair = compared.json()["agreement"][0]
    assert pair["top1_agreement"] == 100 and pair["max_diff_steps"] == 0


# -- a scheme from the documentation alone ---------------------------------------------------------

DOC = (Path(__file__).parents[1] / "docs" / "quant_schemes.md").read_text()


def _documented_plugin() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC, flags=re.S)
    return next(block for block in blocks if "register_quant_schemes" in block)


def test_a_third_party_scheme_written_from_the_docs_registers_and_trains(hat, site, fresh_plugins, tmp_path,
                                                                        tiny_recipe):
    info = install(site, fresh_plugins, "hat_test_ternary", _documented_plugin())
    assert info.status == "ok", info.error
    assert info.quant_schemes == ["ternary"]
    recipe = _recipe(tmp_path, tiny_recipe, 'scheme = "ternary"\nweight_bits = 2\nactivation_bits = 4')
    assert hat("recipe", "validate", recipe).code == 0
    for stage in ("float", "calibration", "qat"):
        trained = hat("train", recipe, "--stage", stage)
        assert trained.code == 0, trained.err
    int_infer = hat("eval", recipe, "--stage", "int_infer", "--json")
    assert int_infer.code == 0, int_infer.err
    # and its artifact is exact, like the built-in schemes'
    module = __import__("hat_test_ternary")
    result = compare_with_artifacts(ResidualNet(), "nash_e", size=(8, 8), opts=(0, 3), weights=("uint8",),
                                    plan=QuantPlan(scheme="ternary", weight_bits=2, activation_bits=4),
                                    schemes={"ternary": module.Ternary()}, qat_steps=2)
    assert not result.disagreements, [str(d) for d in result.disagreements]


# -- QAT resumes exactly ---------------------------------------------------------------------------

def _low_bit_qat(out_dir: Path, scheme: str, wb: int, ab: int, calibration: dict, callbacks=(), resume=False):
    from hatcli.engine.trainer import TrainSpec, fit
    from hatcli.recipe_schema import OptimizerConfig
    from replay import ReplayBatches

    prepared, _ = _prepared(scheme, wb, ab)
    prepared.load_state_dict(calibration)
    gen = torch.Generator().manual_seed(5)
    loader = ReplayBatches([(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 5, (8,), generator=gen))
                            for _ in range(3)])
    spec = TrainSpec(epochs=2, optimizer=OptimizerConfig(lr=0.05, momentum=0.9, schedule="cosine", weight_decay=0.0),
                     label_smoothing=0.0, val_every=1, out_dir=out_dir, stage="qat")
    return fit(prepared, _Family(ResidualNet()), loader, loader, spec, set_mode=set_mode, resume=resume,
               callbacks=list(callbacks))


@pytest.mark.parametrize("scheme,wb,ab", [("lsq", 2, 2), ("pact", 3, 3), ("xnorpp", 1, 1), ("lqnet", 2, 2)])
def test_low_bit_qat_resumes_bitwise_exactly(tmp_path, scheme, wb, ab):
    from hatcli.engine.checkpoint import load_checkpoint
    from hatcli.errors import Interrupted
    from replay import StopAt

    calibration = _prepared(scheme, wb, ab)[0].state_dict()
    _low_bit_qat(tmp_path / "whole", scheme, wb, ab, calibration)
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint-last.pt")
    with pytest.raises(Interrupted):
        _low_bit_qat(tmp_path / "cut", scheme, wb, ab, calibration, callbacks=[StopAt(4)])  # epoch 2, 1 step in
    _low_bit_qat(tmp_path / "cut", scheme, wb, ab, calibration, resume=True)
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint-last.pt")
    assert whole["model"].keys() == cut["model"].keys()
    for key in whole["model"]:
        assert torch.equal(whole["model"][key], cut["model"][key]), key
    moved = [k for k in whole["model"] if not torch.equal(whole["model"][k], calibration[k])]
    assert any(k.endswith((".scale", ".alpha", ".basis")) for k in moved)  # the scheme's parameters trained


def test_hat_run_of_lqnet_stops_after_qat_and_says_why(hat, tmp_path, tiny_recipe):
    recipe = _recipe(tmp_path, tiny_recipe, 'scheme = "lqnet"\nweight_bits = 2\nactivation_bits = 2')
    result = hat("run", recipe, "--json")
    assert result.code == 0, result.err
    rows = result.json()
    assert [r["stage"] for r in rows] == ["pack", "float", "calibration", "qat", "int_infer"]
    assert rows[-1]["values"]["deployable"] is False and "not a uniform grid" in rows[-1]["values"]["reasons"]["lqnet"]
    evaluated = hat("eval", recipe, "--stage", "qat", "--json")
    assert evaluated.code == 0 and 0 <= evaluated.json()["metrics"]["top1"] <= 100
    refused = hat("eval", recipe, "--stage", "int_infer")
    assert refused.code == 2 and "not a uniform grid" in refused.err


class StandaloneNorm(nn.Module):
    """A BatchNorm after a ReLU (pre-activation style): it becomes a depthwise 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.conv2(self.norm(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_a_batchnorm_written_as_a_conv_stays_at_int8():
    net = StandaloneNorm().eval()
    _, quantizer = prepare_quantized(_Family(net), net, (8, 8), load_march("nash_e"), [], schemes=SCHEMES,
                                     plan=QuantPlan(scheme="xnor", weight_bits=1, activation_bits=1,
                                                    keep_first_last=False))
    assert sorted(quantizer.layer_bits) == ["conv1", "conv2", "fc"]


class DropoutHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.dropout, self.fc = nn.Conv2d(3, 8, 3), nn.Dropout(0.2), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1), 1)
        return self.fc(self.dropout(x))


def test_dropout_keeps_its_inputs_grid_and_the_artifact_stays_exact():
    result = compare_with_artifacts(DropoutHead(), "nash_e", size=(8, 8), opts=(0, 3), weights=("uint8",))
    assert not result.disagreements, [str(d) for d in result.disagreements]
    requantized = [op for op in result.integer_ops if op.startswith("requantize")]
    assert not requantized  # no second grid after the dropout
