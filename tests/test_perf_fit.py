"""The fitted latency model: per-block features, a non-negative fit on relative error, its error
measured by leaving whole families out, extrapolation flags, and `hat perf --fit` from a CSV of
board measurements to a profile that `hat perf --march FILE` uses."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from test_deploy import export
from hatcli.deploy.onnx_graph import read_graph
from hatcli.deploy.perf import estimate_graph
from hatcli.deploy.perf_features import FEATURES, aligned, graph_features, model_features, op_table_fallbacks
from hatcli.deploy.perf_fit import (MAC_FEATURES, MeasuredGraph, Sample, carried_fit, error_summary, extrapolation,
                                    fit_coefficients, fit_march, fitted_features, leave_one_family_out, predict_ms,
                                    scaled_fit, support)
from hatcli.march_profile import FitError, read_march_file
from hatcli.quant.march import load_march

TRUE = {"frame": 0.05, "dense_gmac": 2.0, "depthwise_gmac": 30.0, "activation_mb": 0.4, "block": 0.01}


def _sample(name: str, family: str, **features: float) -> Sample:
    values = {**dict.fromkeys(FEATURES, 0.0), "frame": 1.0, **features}
    return Sample(name, family, values, predict_ms(TRUE, values))


SAMPLES = [
    _sample("a1", "a", dense_gmac=0.5, activation_mb=2.0, block=20),
    _sample("a2", "a", dense_gmac=1.5, activation_mb=5.0, block=40),
    _sample("b1", "b", dense_gmac=0.2, depthwise_gmac=0.01, activation_mb=6.0, block=50),
    _sample("b2", "b", dense_gmac=0.3, depthwise_gmac=0.03, activation_mb=9.0, block=80),
    _sample("c1", "c", dense_gmac=4.0, activation_mb=1.0, block=10),
    _sample("c2", "c", dense_gmac=2.0, depthwise_gmac=0.02, activation_mb=3.0, block=30),
    _sample("d1", "d", dense_gmac=0.1, depthwise_gmac=0.005, activation_mb=0.5, block=5),
]


def test_a_fit_on_latencies_a_linear_model_made_recovers_its_coefficients():
    fitted = fit_coefficients(SAMPLES)
    for feature, value in TRUE.items():
        assert fitted[feature] == pytest.approx(value, rel=1e-6)
    assert all(fitted[f] == 0 for f in FEATURES if f not in TRUE)


def test_coefficients_are_never_negative_even_when_the_data_pull_that_way():
    noisy = [Sample(s.name, s.family, s.features, s.measured_ms * (0.7 if i % 2 else 1.4)) for i, s in enumerate(SAMPLES)]
    assert min(fit_coefficients(noisy).values()) >= 0


def test_leaving_a_family_out_predicts_it_from_the_others_only():
    exact = leave_one_family_out(SAMPLES)
    assert exact == pytest.approx([s.measured_ms for s in SAMPLES], rel=1e-6)
    # a family whose cost the others hardly show (depthwise in b and d only) is mispredicted
    # when it is the one left out: the error is honest, not in-sample
    without_c = [s for s in SAMPLES if s.family != "c"]
    predicted = leave_one_family_out(without_c)
    b = [i for i, s in enumerate(without_c) if s.family == "b"]
    assert all(predicted[i] < without_c[i].measured_ms for i in b)


def test_a_cost_only_one_family_has_is_left_out_of_the_fit():
    # depthwise convs only in family b: its coefficient would be b's indicator, not a checked cost
    only_b = [s for s in SAMPLES if s.family in ("a", "b")] + [
        Sample(s.name, s.family, {**s.features, "depthwise_gmac": 0.0}, s.measured_ms) for s in SAMPLES
        if s.family in ("c", "d")]
    assert "depthwise_gmac" not in fitted_features(only_b)
    assert fit_coefficients(only_b)["depthwise_gmac"] == 0
    assert support(only_b)["depthwise_gmac"] == 0  # so a model with depthwise convs is flagged


def test_the_error_summary_counts_what_the_targets_read():
    summary = error_summary([1.05, 2.4, 2.1, 5.0], [1.0, 2.0, 3.0, 4.0])  # errors +5, +20, -30, +25 %
    assert summary["rows"] == 4
    assert summary["median_abs_error"] == pytest.approx(0.225)
    assert summary["within_10"] == 0.25 and summary["within_25"] == 0.75
    assert summary["spearman"] == pytest.approx(0.8)  # the 2nd and 3rd models swap ranks


def test_work_the_fit_never_saw_is_flagged_as_extrapolated():
    seen = {"dense_gmac": 2.0, "activation_mb": 5.0}
    assert extrapolation({"frame": 1, "dense_gmac": 1.0, "activation_mb": 4.0}, seen) == []
    reasons = extrapolation({"frame": 1, "dense_gmac": 9.0, "matmul_gmac": 0.1}, seen)
    assert any(r.startswith("dense_gmac: 9 per frame, over 2x") for r in reasons)
    assert "matmul_gmac: not in the fit (models of fewer than 2 fitted families had any)" in reasons


def test_channels_are_aligned_before_macs_are_counted(tmp_path):
    assert [aligned(c, 16) for c in (3, 16, 17)] == [16, 16, 32]
    net = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1, groups=24))
    graph = read_graph(export(net, tmp_path / "m.onnx"), batch=1)
    plain = model_features(graph_features(graph, load_march("nash_e"), 1))
    by16 = model_features(graph_features(graph, load_march("nash_e"), 16))
    assert plain["dense_gmac"] == pytest.approx(32 * 32 * 24 * 3 * 9 / 1e9)
    assert by16["dense_gmac"] == pytest.approx(32 * 32 * 32 * 16 * 9 / 1e9)
    assert by16["depthwise_gmac"] == pytest.approx(plain["depthwise_gmac"] * 32 / 24)
    assert plain["block"] == 2 and plain["frame"] == 1


def _nets() -> dict[str, tuple[str, nn.Module]]:
    def plain(width: int, depth: int) -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 2, 1), nn.ReLU()]
        for _ in range(depth):
            layers += [nn.Conv2d(width, width, 3, 1, 1), nn.ReLU()]
        return nn.Sequential(*layers)

    def mobile(width: int, depth: int) -> nn.Module:
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 2, 1), nn.ReLU()]
        for _ in range(depth):
            layers += [nn.Conv2d(width, width, 3, 1, 1, groups=width), nn.ReLU(), nn.Conv2d(width, width, 1), nn.ReLU()]
        return nn.Sequential(*layers)

    # widths that are not multiples of 8, so that only alignment 1 reproduces the latencies
    return {"plain12x2": ("plain", plain(12, 2)), "plain20x3": ("plain", plain(20, 3)),
            "plain36x1": ("plain", plain(36, 1)), "mobile20x2": ("mobile", mobile(20, 2)),
            "mobile36x3": ("mobile", mobile(36, 3)), "mobile12x4": ("mobile", mobile(12, 4)),
            # a third family with depthwise convs, so that the fit can check their cost
            "mixed28x1": ("mixed", nn.Sequential(plain(28, 1), *mobile(28, 1)[2:])),
            "mixed44x2": ("mixed", nn.Sequential(plain(44, 2), *mobile(44, 2)[2:]))}


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A measurements CSV whose latencies a known fitted model made, with the ONNX models it names."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("board")
    march = load_march("nash_e")
    rows = []
    for name, (family, net) in _nets().items():
        path = export(net.eval(), folder / f"{name}.onnx")
        features = model_features(graph_features(read_graph(path, batch=1), march, 1))
        rows.append({"model": path.name, "latency_ms": f"{predict_ms(TRUE, features):.6f}", "family": family})
    with (folder / "board.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "latency_ms", "family"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "board.csv"


def test_fit_march_writes_the_fit_and_its_left_out_error_into_the_profile(board):
    march = load_march("nash_e")
    measured = [MeasuredGraph(r["model"], r["family"], read_graph(board.parent / r["model"], batch=1),
                              float(r["latency_ms"])) for r in csv.DictReader(board.open())]
    profile, report = fit_march(march, measured, alignments=(1, 8))
    fitted = profile.cost.fitted
    assert report.channel_alignment == 1  # the latencies were made at alignment 1
    assert fitted.error.rows == 8 and fitted.error.families == 3
    assert fitted.error.method == "leave one model family out"
    for sample in report.latency:
        assert predict_ms(fitted.latency_ms, sample.features) == pytest.approx(sample.measured_ms, rel=1e-4)
    assert fitted.support["depthwise_gmac"] > 0


def test_hat_perf_fit_writes_a_profile_that_hat_perf_then_uses(hat, board, tmp_path):
    out = tmp_path / "my_nash_e.toml"
    result = hat("perf", "--fit", board, "--march", "nash_e", "--out", out, "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert report["march"] == "my_nash_e" and report["latency_error"]["rows"] == 8
    profile = read_march_file(out)
    assert profile.name == "my_nash_e" and profile.cost.fitted is not None
    assert profile.ops == load_march("nash_e").ops  # only the latency model changed

    model = board.parent / "plain20x3.onnx"
    estimate = estimate_graph(read_graph(model, batch=1), profile)
    measured = next(float(r["latency_ms"]) for r in csv.DictReader(board.open()) if r["model"] == model.name)
    assert estimate.cost_model == "fitted" and estimate.latency_ms == pytest.approx(measured, rel=1e-3)
    assert estimate.error["rows"] == 8 and not estimate.extrapolated
    shown = hat("perf", model, "--march", out, "--no-measure")
    assert shown.code == 0, shown.err
    assert "estimated: median error" in shown.out and "8 measured" in " ".join(shown.out.split())


def test_a_model_with_work_the_fit_never_saw_says_it_is_extrapolated(hat, board, tmp_path):
    out = tmp_path / "fitted.toml"
    assert hat("perf", "--fit", board, "--march", "nash_e", "--out", out).code == 0
    wide = export(nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, 1, 1)).eval(),
                  tmp_path / "wide.onnx")
    estimate = estimate_graph(read_graph(wide, batch=1), read_march_file(out))
    assert estimate.extrapolated and any("dense_gmac" in r for r in estimate.extrapolation)
    shown = hat("perf", wide, "--march", out, "--no-measure")
    assert "EXTRAPOLATED" in shown.out and "extrapolated: dense_gmac" in " ".join(shown.out.split())


def test_what_ran_on_the_cpu_when_a_model_was_measured_can_be_given_instead_of_hat_checks_verdict(board, tmp_path):
    softmax = export(nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.Softmax(dim=1)).eval(), tmp_path / "softmax.onnx")
    graph = read_graph(softmax, batch=1)
    x5 = load_march("bayes_e")  # Softmax is not in the X5 table (BPU only with run_on_bpu)
    assert op_table_fallbacks(graph, x5) == [False, True]
    measured = _measured(board)
    for m in measured:  # as if every layer had run on the CPU of the board
        m.fallbacks = [True] * len(m.graph.layers)
    profile, report = fit_march(load_march("nash_e"), measured, alignments=(1,))
    assert all(s.features["block"] == 0 and s.features["cpu_block"] > 0 for s in report.latency)
    assert profile.cost.fitted.bpu_ops == [] and "Conv" in profile.cost.fitted.cpu_ops


def test_an_op_the_fitted_models_never_ran_makes_the_estimate_an_extrapolation(board, tmp_path):
    profile, _ = fit_march(load_march("nash_e"), _measured(board), alignments=(1,))
    assert "Conv" in profile.cost.fitted.bpu_ops and "MaxPool" not in profile.cost.fitted.bpu_ops
    pooled = export(nn.Sequential(nn.Conv2d(3, 12, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2)).eval(), tmp_path / "pool.onnx")
    estimate = estimate_graph(read_graph(pooled, batch=1), profile)
    assert estimate.extrapolated
    assert "MaxPool on the accelerator (1 layer(s)): no fitted model ran one there" in estimate.extrapolation


@pytest.mark.parametrize(("text", "message"), [
    ("name,latency_ms\nx.onnx,1\n", "missing column(s) model"),
    ("model,latency_ms\nplain12x2.onnx,fast\n", "bad.csv:2: `latency_ms` must be a number, not 'fast'"),
    ("model,latency_ms\nnope.onnx,1.0\n", "bad.csv:2: no such model file"),
    ("model,latency_ms\nplain12x2.onnx,-1\n", "bad.csv:2: `latency_ms` must be positive"),
    ("model,latency_ms\nplain12x2.onnx,1\nplain20x3.onnx,2\n", "2 measured model(s); fitting needs at least 3"),
    ("model,latency_ms,family\nplain12x2.onnx,1,p\nplain20x3.onnx,2,p\nplain36x1.onnx,3,p\n", "at least two families"),
])
def test_bad_measurements_are_a_usage_error_naming_the_line(hat, board, tmp_path, text, message):
    bad = board.parent / "bad.csv"
    bad.write_text(text)
    result = hat("perf", "--fit", bad, "--march", "nash_e", "--out", tmp_path / "x.toml")
    assert result.code == 2, result.err
    assert message in " ".join(result.err.split())
    assert not (tmp_path / "x.toml").exists()


def test_perf_fit_needs_a_march_and_a_toml_out(hat, board, tmp_path):
    assert "--fit needs --march" in hat("perf", "--fit", board, "--out", tmp_path / "x.toml").err
    assert "a march profile is a .toml file" in hat("perf", "--fit", board, "--march", "nash_e",
                                                    "--out", tmp_path / "x.json").err


def test_an_artifact_compiled_for_a_fitted_profile_reports_its_error_in_perf_html(hat, board, tmp_path):
    profile = tmp_path / "fitted.toml"
    assert hat("perf", "--fit", board, "--march", "nash_e", "--out", profile).code == 0
    out = tmp_path / "artifact"
    compiled = hat("compile", "--model", board.parent / "mobile20x2.onnx", "--march", profile, "--out", out)
    assert compiled.code == 0, compiled.err
    page = (out / "perf.html").read_text()
    assert "estimated: median error" in page and "8 measured models" in page
    assert "leave one model family out" in page


def _measured(board: Path, scale: float = 1.0) -> list[MeasuredGraph]:
    return [MeasuredGraph(r["model"], r["family"], read_graph(board.parent / r["model"], batch=1),
                          scale * float(r["latency_ms"])) for r in csv.DictReader(board.open())]


def test_a_fit_carried_to_a_chip_without_measurements_scales_its_mac_terms_and_says_it_is_unchecked(board):
    base, _ = fit_march(load_march("nash_e"), _measured(board), alignments=(1,))
    carried = carried_fit(load_march("nash_m"), base, data="nash_e's fit, MAC terms x 80/128")
    fitted, source = carried.cost.fitted, base.cost.fitted
    for feature, value in source.latency_ms.items():
        ratio = 80 / 128 if feature in MAC_FEATURES else 1.0
        assert fitted.latency_ms[feature] == pytest.approx(value * ratio)
    assert carried.name == "nash_m" and carried.ops == load_march("nash_m").ops
    assert fitted.error.rows == 0 and fitted.error.median_abs_error is None
    estimate = estimate_graph(read_graph(board.parent / "plain20x3.onnx", batch=1), carried)
    assert estimate.error_text().startswith("estimated: not checked against any measured Journey 6M model "
                                            "(nash_e's fit, MAC terms x 80/128)")
    with pytest.raises(ValueError, match="takes no error figures"):
        FitError.model_validate({**fitted.error.model_dump(), "median_abs_error": 0.1})


def test_a_fit_scaled_to_a_few_measurements_reports_its_leave_one_out_error(board):
    base, _ = fit_march(load_march("nash_e"), _measured(board), alignments=(1,))
    # the other chip runs every one of these models 2.5x slower: one factor explains all of them
    profile, report = scaled_fit(load_march("nash_m"), base, _measured(board, 2.5)[:3], data="three boards")
    assert report.scale == pytest.approx(2.5, rel=1e-4)
    assert report.error["median_abs_error"] == pytest.approx(0.0, abs=1e-4)
    fitted = profile.cost.fitted
    assert fitted.error.method == "leave one model out" and fitted.error.rows == 3
    assert fitted.latency_ms["dense_gmac"] == pytest.approx(2.5 * base.cost.fitted.latency_ms["dense_gmac"])
    # with a model the factor does not fit, its own estimate comes from the other two only
    uneven = _measured(board, 2.5)[:3]
    uneven[0].latency_ms *= 2
    _, off = scaled_fit(load_march("nash_m"), base, uneven, data="")
    assert off.predicted[0] == pytest.approx(uneven[0].latency_ms / 2, rel=1e-3)


# -- the shipped profiles ---------------------------------------------------------------------

def test_every_shipped_bpu_march_carries_a_fitted_model_and_its_measured_error():
    for name in ("bayes_e", "bernoulli2", "nash_e"):  # fitted on the published board figures
        error = load_march(name).cost.fitted.error
        assert error.method == "leave one model family out" and error.rows >= 20 and error.families >= 5
        assert error.median_abs_error is not None and error.spearman is not None
    journey5 = load_march("bayes").cost.fitted.error  # the X5 fit scaled on the HAT zoo's latencies
    assert journey5.method == "leave one model out" and journey5.rows == 3 and "bayes_e" in journey5.data
    for name in ("nash_m", "nash_p"):  # no published per-model latency: carried over, never checked
        error = load_march(name).cost.fitted.error
        assert error.rows == 0 and error.median_abs_error is None and "nash_e" in error.data


class _TinyViT(nn.Module):
    """A patch-embedding conv (16x16, stride 16), one attention block with LayerNorm, softmax
    and GELU: the shape of the SigLIP towers."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 16, 16)
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        normed = self.norm(tokens)
        tokens = tokens + self.attention(normed, normed, normed, need_weights=False)[0]
        return tokens + self.mlp(self.norm(tokens))


def test_a_transformer_with_cpu_fallbacks_is_flagged_as_extrapolated_on_a_shipped_march(hat, tmp_path):
    torch.manual_seed(0)
    model = export(_TinyViT().eval(), tmp_path / "vit.onnx")  # 32x32: 4 tokens
    estimate = estimate_graph(read_graph(model, batch=1), load_march("nash_e"))
    assert estimate.cost_model == "fitted" and estimate.extrapolated
    assert any("CPU" in reason or reason.startswith("cpu_") for reason in estimate.extrapolation)
    shown = hat("perf", model, "--march", "nash_e", "--no-measure")
    assert shown.code == 0, shown.err
    assert "EXTRAPOLATED" in shown.out and "measured Journey 6E models" in " ".join(shown.out.split())
