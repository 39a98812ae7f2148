"""Learned activation scales in QAT (`qat.activation_scales = "learned"`, `hatcli.quant.lsq`).

- The learned-scale graph calibrates exactly like the frozen one, and either graph loads the
  other's calibration state: the learned scales start at the calibrated ones.
- The scale gradient is LSQ's (straight-through rounding, gradient scale 1/sqrt(N_F * qmax));
  one optimizer step moves the learned scales and leaves the frozen ones alone; the scales get no
  weight decay and stay positive.
- Conversion writes the learned scales into the integer program, which matches the fake-quant
  graph; the state dict round-trips through a checkpoint into a rebuilt graph; a QAT run that was
  stopped and resumed ends with bitwise the weights and scales of an uninterrupted one.
- The recipe key validates; a bad value is a RecipeError naming the key.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchao.quantization.pt2e import FakeQuantize

from hatcli.engine.checkpoint import load_checkpoint, save_checkpoint
from hatcli.engine.schedule import build_optimizer, param_groups
from hatcli.engine.trainer import TrainSpec, fit
from hatcli.errors import Interrupted, RecipeError
from hatcli.quant.flow import convert_to_integer, prepare_quantized, set_mode
from hatcli.quant.lsq import EPS, LsqFakeQuantize, learned_scale_modules, lsq_grad_scale
from hatcli.quant.march import load_march
from hatcli.recipe import load_recipe
from hatcli.recipe_schema import OptimizerConfig
from tiny_nets import TinyFamily, calibrate, rank_batches
from replay import ReplayBatches, StopAt

Q = torch.ops.quantized_decomposed
SIZE = (16, 16)
SIGNED = dict(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric)


pytestmark = pytest.mark.usefixtures("one_thread")


_BUILT: dict[str, torch.fx.GraphModule] = {}


def _prepared(scales: str) -> torch.fx.GraphModule:
    """A fresh prepared TinyNet graph (exported once per mode, then copied: export is the slow part)."""
    if scales not in _BUILT:
        torch.manual_seed(0)
        model = TinyFamily().build_float_model(None, 5).eval()
        _BUILT[scales], _ = prepare_quantized(TinyFamily(), model, SIZE, load_march("nash_e"), [],
                                              activation_scales=scales)
    return copy.deepcopy(_BUILT[scales])


def _activation_fqs(prepared) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in prepared.named_modules()
            if isinstance(m, FakeQuantize) and m.qscheme in (torch.per_tensor_symmetric, torch.per_tensor_affine)}


def _scales(prepared) -> dict[str, torch.Tensor]:
    return {n: m.calculate_qparams()[0].detach().clone() for n, m in _activation_fqs(prepared).items()}


def _calibrated(scales: str) -> torch.fx.GraphModule:
    prepared = _prepared(scales)
    calibrate(prepared, rank_batches(0, SIZE))
    set_mode(prepared, "eval")
    return prepared


def _step(prepared, lr: float = 0.05, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """One SGD step of QAT on a fixed batch."""
    set_mode(prepared, "train")
    optimizer = build_optimizer(prepared, OptimizerConfig(lr=lr, momentum=0.9, weight_decay=weight_decay))
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, 3, *SIZE, generator=gen), torch.randint(0, 5, (8,), generator=gen)
    F.cross_entropy(prepared(x), y).backward()
    optimizer.step()
    return optimizer


# -- the graph and calibration ---------------------------------------------------------------------


def test_learned_mode_puts_lsq_on_the_activations_only():
    prepared = _prepared("learned")
    kinds = [type(m) for m in _activation_fqs(prepared).values()]
    assert kinds and all(k is LsqFakeQuantize for k in kinds)
    assert len(learned_scale_modules(prepared)) == len(kinds) == 4
    weights = [m for m in prepared.modules() if isinstance(m, FakeQuantize) and m.is_per_channel]
    assert len(weights) == 3 and not any(isinstance(m, LsqFakeQuantize) for m in weights)
    assert {type(m) for m in _activation_fqs(_prepared("frozen")).values()} == {FakeQuantize}
    with pytest.raises(RecipeError, match="qat.activation_scales"):
        _prepared("sometimes")


def test_learned_scales_start_at_the_calibrated_scales():
    frozen, learned = _calibrated("frozen"), _calibrated("learned")
    assert frozen.state_dict().keys() == learned.state_dict().keys()
    calibrated = _scales(frozen)
    assert _scales(learned).keys() == calibrated.keys()
    for name, scale in _scales(learned).items():
        assert torch.equal(scale, calibrated[name]), name
        assert torch.equal(learned.get_submodule(name).scale.detach(), calibrated[name]), name
    # the QAT stage's path: a frozen recipe's calibration checkpoint, loaded into a learned graph
    rebuilt = _prepared("learned")
    rebuilt.load_state_dict(frozen.state_dict())
    set_mode(rebuilt, "eval")
    for name, scale in _scales(rebuilt).items():
        assert torch.equal(scale, calibrated[name]), name
    x = torch.randn(4, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), frozen(x))  # same scales, same forward


# -- gradients and training ------------------------------------------------------------------------


def test_the_scale_gradient_is_lsq():
    fq = LsqFakeQuantize(**SIGNED)
    fq.disable_observer()
    with torch.no_grad():
        fq.scale.fill_(0.02)
    x = (torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1)) * 2).requires_grad_()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (fq(x) * upstream).sum().backward()
    v = x.detach() / 0.02
    q = torch.round(v)  # PyTorch's kernel: "inside" is where the rounded value lies on the grid
    inside = (q >= -128) & (q <= 127)
    per_element = torch.where(inside, q - v, torch.where(q < -128, -128.0, 127.0))
    g = 1.0 / math.sqrt(3 * 5 * 5 * 127)  # N_F: the features of one sample
    assert lsq_grad_scale(x, 127) == pytest.approx(g)
    assert fq.scale.grad is not None
    assert float(fq.scale.grad) == pytest.approx(float((per_element * upstream).sum()) * g, rel=1e-4)
    # straight-through rounding: the gradient passes inside the grid and stops where values saturate
    assert torch.equal(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))
    assert not inside.all()  # both cases were exercised


def test_one_step_moves_the_learned_scales_and_not_the_frozen_ones():
    frozen, learned = _calibrated("frozen"), _calibrated("learned")
    before = _scales(frozen)
    _step(frozen)
    _step(learned)
    for name, scale in _scales(frozen).items():
        assert torch.equal(scale, before[name]), name
    for name, module in learned_scale_modules(learned):
        assert module.scale.grad is not None and torch.isfinite(module.scale.grad).all(), name
        assert float(module.scale.grad.abs()) > 0, name
        assert not torch.equal(module.calculate_qparams()[0], before[name]), name
        assert float(module.scale.detach()) > 0


def test_learned_scales_get_no_weight_decay():
    learned = _prepared("learned")
    scales = {id(m.scale) for _, m in learned_scale_modules(learned)}
    for weights_only in (False, True):
        groups = param_groups(learned, OptimizerConfig(weight_decay=1e-2, weight_decay_weights_only=weights_only))
        for group in groups:
            ids = {id(p) for p in group["params"]}
            if ids & scales:
                assert group["weight_decay"] == 0.0 and scales <= ids
        assert sum(len(g["params"]) for g in groups) == len(list(learned.parameters()))
    # with zero gradient and weight decay on, a decayed parameter would shrink; the scales do not
    fq = LsqFakeQuantize(**SIGNED)
    fq.disable_observer()
    optimizer = build_optimizer(fq, OptimizerConfig(lr=0.1, momentum=0.0, weight_decay=0.5))
    fq.scale.grad = torch.zeros_like(fq.scale)
    optimizer.step()
    assert float(fq.scale.detach()) == 1.0


def test_the_scale_stays_positive():
    fq = LsqFakeQuantize(**SIGNED)
    fq.disable_observer()
    with torch.no_grad():
        fq.scale.fill_(-0.5)
    x = torch.randn(2, 4)
    y = fq(x)
    assert float(fq.calculate_qparams()[0]) == pytest.approx(EPS)
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, EPS, 0, -128, 127))
    y.sum().backward()
    assert fq.scale.grad is not None  # straight through the clamp: it can come back


# -- conversion and checkpoints --------------------------------------------------------------------


def test_conversion_uses_the_learned_scales():
    learned = _calibrated("learned")
    calibrated = _scales(learned)
    _step(learned)
    _step(learned)
    set_mode(learned, "eval")
    trained = {float(m.calculate_qparams()[0]) for _, m in learned_scale_modules(learned)}
    assert trained.isdisjoint(float(s) for s in calibrated.values())
    x = torch.randn(8, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fake = learned(x)
        integer = convert_to_integer(copy.deepcopy(learned))
        out = integer(x)
    quantize_scales = {float(n.args[1]) for n in integer.graph.nodes
                       if n.op == "call_function" and n.target == Q.quantize_per_tensor.default}
    # the input's and every requantized output's scale: the learned ones, no calibrated one left
    assert trained <= quantize_scales
    assert quantize_scales.isdisjoint(float(s) for s in calibrated.values())
    assert torch.allclose(fake, out, atol=1e-4)


def test_the_state_round_trips_through_a_checkpoint_into_a_rebuilt_graph(tmp_path: Path):
    learned = _calibrated("learned")
    _step(learned)
    set_mode(learned, "eval")
    state = learned.state_dict()
    assert not any(isinstance(v, torch.nn.Parameter) for v in state.values())
    save_checkpoint(tmp_path / "qat.pt", {"model": state})
    loaded = load_checkpoint(tmp_path / "qat.pt")["model"]  # weights_only=True
    rebuilt = _prepared("learned")
    rebuilt.load_state_dict(loaded)
    set_mode(rebuilt, "eval")
    x = torch.randn(4, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), learned(x))
    for name, module in learned_scale_modules(rebuilt):
        assert torch.equal(module.scale, learned.get_submodule(name).scale), name
        assert module.scale.requires_grad
    # a frozen graph takes the same state too (same keys); it then uses the learned scales as frozen ones
    frozen = _prepared("frozen")
    frozen.load_state_dict(loaded)
    set_mode(frozen, "eval")
    with torch.no_grad():
        assert torch.equal(frozen(x), learned(x))


# -- QAT resume ------------------------------------------------------------------------------------


def _Batches(count: int = 4) -> ReplayBatches:
    """Fixed batches whose order depends on the epoch (like the real loader)."""
    gen = torch.Generator().manual_seed(11)
    return ReplayBatches([(torch.randn(8, 3, *SIZE, generator=gen), torch.randint(0, 5, (8,), generator=gen))
                          for _ in range(count)])


def _qat(out_dir: Path, calibration_state: dict, callbacks=(), resume: bool = False) -> dict:
    prepared = _prepared("learned")
    prepared.load_state_dict(calibration_state)
    spec = TrainSpec(epochs=2, optimizer=OptimizerConfig(lr=0.05, momentum=0.9, schedule="cosine"),
                     label_smoothing=0.0, val_every=1, out_dir=out_dir, stage="qat")
    loader = _Batches()
    return fit(prepared, TinyFamily(), loader, loader, spec, set_mode=set_mode, resume=resume,
               callbacks=list(callbacks))


def test_learned_scale_qat_resumes_exactly(tmp_path: Path):
    calibration = _calibrated("frozen").state_dict()  # a frozen recipe's calibration checkpoint
    _qat(tmp_path / "whole", calibration)
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint-last.pt")
    with pytest.raises(Interrupted):
        _qat(tmp_path / "cut", calibration, callbacks=[StopAt(5)])  # epoch 2, 1 step in
    _qat(tmp_path / "cut", calibration, resume=True)
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint-last.pt")
    assert whole["model"].keys() == cut["model"].keys()
    for key in whole["model"]:
        assert torch.equal(whole["model"][key], cut["model"][key]), key
    keys = [f"{name}.scale" for name, _ in learned_scale_modules(_prepared("learned"))]
    assert len(keys) == 4
    for key in keys:  # QAT trained every activation scale
        assert not torch.equal(whole["model"][key], calibration[key]), key
    # the optimizer state (momentum of the scales included) was saved and restored
    assert len(cut["optimizer"]["state"]) == len(whole["optimizer"]["state"])


# -- the recipe ------------------------------------------------------------------------------------


RECIPE = """
task = "lsq"
[data]
root = "data/x"
[model]
name = "mobilenet_v1"
alpha = 0.5
"""


def test_recipe_key_validates(tmp_path: Path):
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE)
    assert load_recipe(path).recipe.qat.activation_scales == "frozen"
    assert load_recipe(path, ['qat.activation_scales="learned"']).recipe.qat.activation_scales == "learned"
    path.write_text(RECIPE + '[qat]\nactivation_scales = "learned"\n')
    assert load_recipe(path).recipe.qat.activation_scales == "learned"
    path.write_text(RECIPE + '[qat]\nactivation_scales = "lsq"\n')
    with pytest.raises(RecipeError, match="qat.activation_scales"):
        load_recipe(path)


# -- set_mode --------------------------------------------------------------------------------------


class _WithDropout(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.relu(self.conv(x)))


class _DropoutFamily(TinyFamily):
    def build_float_model(self, config, num_classes):
        return _WithDropout()


def test_set_mode_still_switches_dropout_and_only_flags_graphs_without_it():
    torch.manual_seed(0)
    with_dropout, _ = prepare_quantized(_DropoutFamily(), _WithDropout().eval(), SIZE, load_march("nash_e"), [])
    calibrate(with_dropout, rank_batches(0, SIZE, 1))
    x = torch.randn(2, 3, *SIZE)
    set_mode(with_dropout, "train")
    with torch.no_grad():
        assert not torch.equal(with_dropout(x), with_dropout(x))  # dropout is active
    set_mode(with_dropout, "eval")
    with torch.no_grad():
        assert torch.equal(with_dropout(x), with_dropout(x))
    plain = _prepared("learned")
    code = plain.code
    for mode in ("train", "eval", "calibrate", "train"):
        set_mode(plain, mode)
        assert plain._exported_training is (mode == "train")
    assert plain.code == code


# -- two ranks -------------------------------------------------------------------------------------


def _rank_main(rank: int, world_size: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from hatcli.engine.distributed import sync_observers

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        prepared = _prepared("learned")
        calibrate(prepared, rank_batches(rank, SIZE))
        before = _scales(prepared)
        sync_observers(prepared)
        synced = {n: m.scale.detach().clone() for n, m in learned_scale_modules(prepared)}
        set_mode(prepared, "train")
        ddp = torch.nn.parallel.DistributedDataParallel(prepared)
        optimizer = build_optimizer(prepared, OptimizerConfig(lr=0.05, momentum=0.9, weight_decay=0.0))
        x = rank_batches(rank, SIZE, 1)[0]
        F.cross_entropy(ddp(x), torch.full((len(x),), rank)).backward()
        optimizer.step()
        stepped = {n: m.scale.detach().clone() for n, m in learned_scale_modules(prepared)}
        torch.save({"before": before, "synced": synced, "stepped": stepped}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_on_the_calibrated_and_the_learned_scales(tmp_path: Path):
    from tiny_nets import run_two_ranks

    r0, r1 = run_two_ranks(_rank_main, tmp_path)
    assert any(not torch.equal(r0["before"][k], r1["before"][k]) for k in r0["before"])  # ranks saw different data
    single = _prepared("learned")
    calibrate(single, rank_batches(0, SIZE) + rank_batches(1, SIZE))
    for name, scale in _scales(single).items():  # the scale parameters hold the merged calibration
        assert torch.allclose(r0["synced"][name], scale, rtol=1e-6), name
        assert torch.equal(r0["synced"][name], r1["synced"][name]), name
    for name in r0["stepped"]:  # DDP averaged the scale gradients: every rank took the same step
        assert torch.equal(r0["stepped"][name], r1["stepped"][name]), name
        assert not torch.equal(r0["stepped"][name], r0["synced"][name]), name
