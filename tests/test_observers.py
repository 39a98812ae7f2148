"""Calibration observers: minmax, percentile and mse (`calibration.observer`).

- On data with a few large outliers, percentile and mse clip: a smaller scale than minmax and a
  lower quantization error on the bulk of the data.
- On the unsigned grid after ReLU the zero point stays 0 and the range non-negative.
- The running threshold statistics are in the state dict: a graph rebuilt with the same observer
  (what the QAT stage does) loads the calibrated state and computes the same outputs.
- The recipe accepts the new names and rejects others; two gloo ranks fed different data end with
  identical thresholds and scales after `sync_observers`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchao.quantization.pt2e import FakeQuantize, MinMaxObserver

from hatcli.engine.distributed import sync_observers
from hatcli.errors import RecipeError
from hatcli.quant.flow import prepare_quantized, set_mode
from hatcli.quant.march import load_march
from tiny_nets import TinyFamily, rank_batches, run_two_ranks
from tiny_nets import calibrate as _calibrate
from hatcli.quant.observers import MseObserver, PercentileObserver
from hatcli.recipe import load_recipe

SIGNED = dict(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric)
UNSIGNED = dict(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine)
SIZE = (16, 16)
CLASSES = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MseObserver}


pytestmark = pytest.mark.usefixtures("one_thread")


def _with_outliers(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of N(0, 1) activations with five large outliers; returns (batch, bulk without them)."""
    x = torch.randn(8, 16, 32, 32, generator=torch.Generator().manual_seed(seed))
    flat = x.view(-1)
    flat[:5] = torch.tensor([60.0, -50.0, 45.0, 80.0, -70.0])
    return x, flat[5:].clone()


def _bulk_error(observer, bulk: torch.Tensor) -> float:
    scale, zero_point = observer.calculate_qparams()
    fq = torch.fake_quantize_per_tensor_affine(bulk, float(scale), int(zero_point),
                                               observer.quant_min, observer.quant_max)
    return float((fq - bulk).square().mean())


# -- the observers on their own --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["percentile", "mse"])
def test_clipping_observers_beat_minmax_on_data_with_outliers(name):
    x, bulk = _with_outliers()
    minmax, clipping = MinMaxObserver(**SIGNED), CLASSES[name](**SIGNED)
    minmax(x)
    clipping(x)
    # both still track the full observed range
    assert torch.equal(clipping.min_val, minmax.min_val) and torch.equal(clipping.max_val, minmax.max_val)
    mm_scale, _ = minmax.calculate_qparams()
    scale, zero_point = clipping.calculate_qparams()
    assert int(zero_point) == 0
    assert float(scale) < 0.75 * float(mm_scale)
    assert _bulk_error(clipping, bulk) < 0.9 * _bulk_error(minmax, bulk)


def test_percentile_threshold_is_the_mean_over_batches_of_the_percentile():
    observer = PercentileObserver(percentile=99.0, **SIGNED)
    batches = [torch.randn(10_000, generator=torch.Generator().manual_seed(s)) * (1 + s) for s in range(3)]
    for batch in batches:
        observer(batch)
    # nearest rank: the ceil(0.99 n)-th smallest |x|
    expected = sum(float(b.abs().sort().values[9900 - 1]) for b in batches) / 3
    assert float(observer.clip_count) == 3
    assert float(observer.threshold()) == pytest.approx(expected, rel=1e-4)
    scale, _ = observer.calculate_qparams()
    assert float(scale) == pytest.approx(expected / 127.5, rel=1e-4)


def test_mse_keeps_nearly_the_full_range_without_outliers():
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(1)) * 2 - 1  # uniform: nothing to clip
    observer = MseObserver(**SIGNED)
    observer(x)
    assert float(observer.threshold()) > 0.9 * float(x.abs().max())


@pytest.mark.parametrize("name", ["percentile", "mse"])
def test_unsigned_grid_after_relu_keeps_zero_point_0(name):
    x, _ = _with_outliers(2)
    fq = FakeQuantize(observer=CLASSES[name], **UNSIGNED)
    fq(torch.relu(x))
    observer = fq.activation_post_process
    lo, hi = observer.clipped_range()
    assert float(lo) == 0.0 and 0.0 < float(hi) < float(observer.max_val)
    assert int(fq.zero_point) == 0
    assert float(fq.scale) == pytest.approx(float(hi) / 255, rel=1e-6)
    out = fq(torch.relu(x))
    assert float(out.min()) >= 0.0


def test_before_any_batch_the_observers_behave_like_minmax():
    for cls in (PercentileObserver, MseObserver):
        with pytest.warns(UserWarning, match="must run observer"):
            scale, zero_point = cls(**SIGNED).calculate_qparams()
        assert float(scale) == 1.0 and int(zero_point) == 0


def test_percentile_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=0.0, **SIGNED)


# -- in the prepared graph -------------------------------------------------------------------------


def _prepared(observer: str, percentile: float = 99.99) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = TinyFamily().build_float_model(None, 5).eval()
    prepared, _ = prepare_quantized(TinyFamily(), model, SIZE, load_march("nash_e"), [],
                                    observer=observer, percentile=percentile)
    return prepared


def _batches(rank: int, count: int = 2) -> list[torch.Tensor]:
    return rank_batches(rank, SIZE, count)


def _activation_observers(prepared) -> list[nn.Module]:
    return [m for m in prepared.modules() if type(m) in (MinMaxObserver, PercentileObserver, MseObserver)]


@pytest.mark.parametrize("name", ["percentile", "mse"])
def test_graph_uses_the_observer_for_activations_only(name):
    prepared = _prepared(name, percentile=99.0)
    kinds = {type(m).__name__ for m in _activation_observers(prepared)}
    assert kinds == {CLASSES[name].__name__}
    assert len(_activation_observers(prepared)) == 4
    weights = [m for m in prepared.modules() if type(m).__name__ == "MovingAveragePerChannelMinMaxObserver"]
    assert len(weights) == 3
    if name == "percentile":
        assert all(m.percentile == 99.0 for m in _activation_observers(prepared))


@pytest.mark.parametrize("name", ["percentile", "mse"])
def test_calibrated_state_loads_into_a_rebuilt_graph(name):
    prepared = _prepared(name)
    _calibrate(prepared, _batches(0))
    state = prepared.state_dict()
    assert any(k.endswith("clip_sum") for k in state) and any(k.endswith("clip_count") for k in state)
    rebuilt = _prepared(name)  # what the QAT stage does
    rebuilt.load_state_dict(state)
    set_mode(prepared, "eval")
    set_mode(rebuilt, "eval")
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(prepared(x), rebuilt(x))
    with pytest.raises(RuntimeError, match="clip_sum"):  # a minmax graph cannot take this state
        _prepared("minmax").load_state_dict(state)


# -- the recipe ------------------------------------------------------------------------------------


RECIPE = """
task = "observers"
[data]
root = "data/x"
[model]
name = "mobilenet_v1"
alpha = 0.5
[calibration]
observer = "{observer}"
"""


def test_recipe_accepts_the_observers_and_rejects_others(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE.format(observer="mse"))
    calibration = load_recipe(path).recipe.calibration
    assert (calibration.observer, calibration.percentile) == ("mse", 99.99)
    calibration = load_recipe(path, ["calibration.observer=percentile", "calibration.percentile=99.9"]).recipe.calibration
    assert (calibration.observer, calibration.percentile) == ("percentile", 99.9)
    with pytest.raises(RecipeError, match="calibration.percentile"):
        load_recipe(path, ["calibration.percentile=0"])
    path.write_text(RECIPE.format(observer="foo"))
    with pytest.raises(RecipeError, match="calibration.observer"):
        load_recipe(path)


# -- two ranks -------------------------------------------------------------------------------------


def _snapshot(module) -> dict[str, torch.Tensor]:
    keys = ("min_val", "max_val", "scale", "zero_point", "clip_sum", "clip_count")
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k.rsplit(".", 1)[-1] in keys}


def _rank_main(rank: int, world_size: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        prepared = _prepared("percentile")
        _calibrate(prepared, _batches(rank))
        before = _snapshot(prepared)
        sync_observers(prepared)
        torch.save({"before": before, "after": _snapshot(prepared)}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[dict, dict]:
    return run_two_ranks(_rank_main, tmp_path_factory.mktemp("observer_ranks"))


def test_sync_gives_every_rank_the_same_percentile_thresholds_and_scales(two_ranks):
    r0, r1 = two_ranks
    scales = [k for k in r0["before"] if k.endswith(".scale")]
    assert any(not torch.equal(r0["before"][k], r1["before"][k]) for k in scales)
    for key in r0["after"]:
        assert torch.equal(r0["after"][key], r1["after"][key]), key
    for key in (k for k in r0["after"] if k.endswith(("clip_sum", "clip_count"))):
        assert torch.allclose(r0["after"][key], r0["before"][key] + r1["before"][key]), key


def test_synced_ranks_match_one_process_that_saw_all_the_batches(two_ranks):
    r0, _ = two_ranks
    single = _prepared("percentile")
    _calibrate(single, _batches(0) + _batches(1))
    expected = _snapshot(copy.deepcopy(single))
    for key, value in r0["after"].items():
        assert torch.allclose(value.double(), expected[key].double(), rtol=1e-5), key
