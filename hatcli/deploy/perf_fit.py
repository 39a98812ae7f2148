"""Fitting the latency model to measured latencies, and saying honestly how far off it is.

The model (hatcli/deploy/perf_features.py) is linear in non-negative coefficients, one per
feature: `ms = sum(c[f] * x[f])`. The fit minimises the squared *relative* error over the measured
models (a 1 ms classifier counts as much as a 60 ms detector) with non-negative least squares
(scipy.optimize.nnls). Its error is measured by leaving out one whole model family at a time: fit
without the family, predict it, and report the median |error|, the share of models within +-10 %
and +-25 %, and the Spearman rank correlation of predicted against measured.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hatcli.deploy.perf_features import FEATURES, fallback_flags, graph_features, model_features


@dataclass
class Sample:
    """One measured model: its per-frame features and the measured time per frame."""

    name: str
    family: str
    """Architecture family (`yolov8`, `resnet`...): the unit left out by cross-validation."""
    features: dict[str, float]
    measured_ms: float
    group: str = ""
    """A coarse kind (`yolo_detect`, `cnn_classifier`...), for reports."""
    extra: dict[str, Any] = field(default_factory=dict)


def _matrix(samples: Sequence[Sample], features: Sequence[str]) -> np.ndarray:
    return np.array([[s.features.get(f, 0.0) for f in features] for s in samples], dtype=np.float64)


MIN_FAMILIES = 2
"""A feature enters the fit only when models of at least this many families have it: a feature
one family alone has is that family's indicator, not a cost the fit can check (leaving that
family out leaves no data for it)."""


def fitted_features(samples: Sequence[Sample], features: Sequence[str] = FEATURES,
                    min_families: int = MIN_FAMILIES) -> list[str]:
    """The features of `features` that models of at least `min_families` families have (`frame`,
    the per-frame constant, always)."""
    families: dict[str, set[str]] = {f: set() for f in features}
    for s in samples:
        for f in features:
            if s.features.get(f, 0.0) > 0:
                families[f].add(s.family)
    return [f for f in features if f == "frame" or len(families[f]) >= min_families]


def fit_coefficients(samples: Sequence[Sample], features: Sequence[str] = FEATURES,
                     min_families: int = MIN_FAMILIES) -> dict[str, float]:
    """The non-negative coefficients (ms per unit) that minimise the squared relative error; a
    feature fewer than `min_families` families have gets 0 (see `MIN_FAMILIES`)."""
    from scipy.optimize import nnls

    if not samples:
        raise ValueError("no measured models to fit")
    used = set(fitted_features(samples, features, min_families))
    x = _matrix(samples, features) * np.array([f in used for f in features], dtype=np.float64)
    y = np.array([s.measured_ms for s in samples], dtype=np.float64)
    scale = x.max(axis=0)
    scale[scale == 0] = 1.0  # a feature no sample has: coefficient 0, column left as is
    weighted = (x / scale) / y[:, None]
    solution, _ = nnls(weighted, np.ones(len(samples)), maxiter=50 * len(features))
    return {f: float(c / s) for f, c, s in zip(features, solution, scale)}


def predict_ms(coefficients: dict[str, float], features: dict[str, float]) -> float:
    """The model's time for one frame with `features`."""
    return float(sum(coefficients.get(f, 0.0) * v for f, v in features.items()))


def leave_one_family_out(samples: Sequence[Sample], features: Sequence[str] = FEATURES) -> list[float]:
    """Each sample's prediction from a fit that did not see its family (one fit per family)."""
    predictions = [0.0] * len(samples)
    for family in sorted({s.family for s in samples}):
        held = [i for i, s in enumerate(samples) if s.family == family]
        rest = [s for s in samples if s.family != family]
        if not rest:
            raise ValueError("leave-one-family-out needs at least two families")
        coefficients = fit_coefficients(rest, features)
        for i in held:
            predictions[i] = predict_ms(coefficients, samples[i].features)
    return predictions


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of `a` and `b` (average ranks for ties)."""
    from scipy.stats import spearmanr

    if len(a) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def error_summary(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """rows, median_abs_error, within_10, within_25 (fractions) and spearman of predictions."""
    errors = [p / m - 1.0 for p, m in zip(predicted, measured)]
    absolute = [abs(e) for e in errors]
    n = len(errors)
    return {
        "rows": n,
        "median_abs_error": round(statistics.median(absolute), 4) if n else float("nan"),
        "within_10": round(sum(e <= 0.10 for e in absolute) / n, 4) if n else float("nan"),
        "within_25": round(sum(e <= 0.25 for e in absolute) / n, 4) if n else float("nan"),
        "spearman": round(spearman(predicted, measured), 4),
    }


def support(samples: Sequence[Sample], features: Sequence[str] = FEATURES) -> dict[str, float]:
    """The largest per-frame value of each fitted feature among the fitted models (0: not in the
    fit, because no model or models of fewer than `MIN_FAMILIES` families had it)."""
    if not samples:
        return dict.fromkeys(features, 0.0)
    used = set(fitted_features(samples, features))
    x = _matrix(samples, features)
    return {f: float(v) if f in used else 0.0 for f, v in zip(features, x.max(axis=0))}


def extrapolation(features: dict[str, float], seen: dict[str, float], factor: float = 2.0) -> list[str]:
    """Why a model's estimate is an extrapolation: features the fit never saw, or saw far less of."""
    reasons = []
    for name, value in features.items():
        if value <= 0 or name == "frame":
            continue
        limit = seen.get(name, 0.0)
        if limit <= 0:
            reasons.append(f"{name}: not in the fit (models of fewer than {MIN_FAMILIES} fitted families had any)")
        elif value > factor * limit:
            reasons.append(f"{name}: {value:.3g} per frame, over {factor:g}x the most a fitted model had ({limit:.3g})")
    return reasons


@dataclass
class MeasuredGraph:
    """A model read as a graph, with what was measured of it on the board."""

    name: str
    family: str
    graph: Any
    """The `hatcli.deploy.onnx_graph.Graph` of the model."""
    latency_ms: float | None = None
    """Single-frame latency, one thread."""
    frame_ms_under_load: float | None = None
    """1000 / FPS with several threads feeding the accelerator."""
    threads: int | None = None
    """The thread count `frame_ms_under_load` was measured with."""
    group: str = ""
    fallbacks: list[bool] | None = None
    """Per layer of `graph`, whether it ran on the CPU when it was measured; None: what `hat check`
    says of the graph (`fallback_flags`)."""


@dataclass
class FitReport:
    """What `fit_march` found: the chosen alignment, the cross-validated predictions and errors."""

    channel_alignment: int
    input_alignment: int
    latency: list[Sample]
    latency_predicted: list[float]
    latency_error: dict[str, float]
    load: list[Sample] = field(default_factory=list)
    load_predicted: list[float] = field(default_factory=list)
    load_error: dict[str, float] | None = None

    def by_family(self) -> dict[str, dict[str, float]]:
        """The cross-validated latency error of each family on its own."""
        out: dict[str, dict[str, float]] = {}
        for family in sorted({s.family for s in self.latency}):
            index = [i for i, s in enumerate(self.latency) if s.family == family]
            out[family] = error_summary([self.latency_predicted[i] for i in index],
                                        [self.latency[i].measured_ms for i in index])
        return out


def _samples(measured: Sequence[MeasuredGraph], features: Sequence[dict[str, float]], what: str) -> list[Sample]:
    """The measured models that have `what` (`latency_ms`, `frame_ms_under_load`), as samples."""
    return [Sample(m.name, m.family, f, float(getattr(m, what)), group=m.group)
            for m, f in zip(measured, features) if (getattr(m, what) or 0) > 0]


def _rms_relative_error(samples: Sequence[Sample], coefficients: dict[str, float]) -> float:
    errors = [(predict_ms(coefficients, s.features) / s.measured_ms - 1) ** 2 for s in samples]
    return float(np.sqrt(np.mean(errors)))


def _usual_threads(measured: Sequence[MeasuredGraph]) -> int | None:
    """The most common thread count of the throughput measurements (None: none says)."""
    threads = [m.threads for m in measured if m.threads and m.frame_ms_under_load]
    return statistics.mode(threads) if threads else None


def ops_by_place(graphs: Sequence[Any], flags: Sequence[list[bool]]) -> tuple[list[str], list[str]]:
    """(op types run on the accelerator, op types that fell back to the CPU) over `graphs`, views
    left out; `flags` is `fallback_flags` per graph."""
    bpu: set[str] = set()
    cpu: set[str] = set()
    for graph, graph_flags in zip(graphs, flags):
        for layer, fallback in zip(graph.layers, graph_flags):
            if not layer.is_view:
                (cpu if fallback else bpu).add(layer.op_type)
    return sorted(bpu), sorted(cpu)


def measured_error(summary: dict[str, float], families: int, data: str,
                   method: str = "leave one model family out") -> Any:
    """The `FitError` a profile stores, from an `error_summary` of left-out estimates."""
    from hatcli.march_profile import FitError

    return FitError(method=method, rows=int(summary["rows"]), families=families,
                    median_abs_error=summary["median_abs_error"], within_10=summary["within_10"],
                    within_25=summary["within_25"],
                    spearman=None if np.isnan(summary["spearman"]) else summary["spearman"], data=data)


def with_fitted(profile: Any, fitted: Any) -> Any:
    """`profile` with its `[cost.fitted]` model replaced by `fitted`."""
    return profile.model_copy(update={"cost": profile.cost.model_copy(update={"fitted": fitted})})


def fit_march(march: Any, measured: Sequence[MeasuredGraph], alignments: Sequence[int] = (1, 4, 8, 16, 32, 64),
              data: str = "", load_threads: int | None = None) -> tuple[Any, FitReport]:
    """Fit `march`'s latency model to `measured` models; return (the profile with `[cost.fitted]`
    replaced, the report).

    The output and input channel alignments are the pair (each of `alignments`) whose fit has the
    lowest in-sample RMS relative error; the error written into the profile is the
    leave-one-family-out one, so it never comes from models the coefficients saw. Needs models of
    at least two families. `load_threads` defaults to the most common thread count of the
    throughput measurements.
    """
    from hatcli.march_profile import FittedCost

    if not any((m.latency_ms or 0) > 0 for m in measured):
        raise ValueError("no measured single-frame latency to fit")
    flags = [fallback_flags(m.graph, march) if m.fallbacks is None else m.fallbacks
             for m in measured]  # the same at every alignment
    candidates = {}
    for pair in [(out, inp) for out in alignments for inp in alignments if inp <= out]:
        features = [model_features(graph_features(m.graph, march, *pair, fallbacks=f), m.graph.batch)
                    for m, f in zip(measured, flags)]
        samples = _samples(measured, features, "latency_ms")
        coefficients = fit_coefficients(samples)
        candidates[pair] = (round(_rms_relative_error(samples, coefficients), 6), features, samples, coefficients)
    alignment = min(candidates, key=lambda pair: (candidates[pair][0], pair))
    _, features, latency, latency_coefficients = candidates[alignment]
    if len({s.family for s in latency}) < 2:
        raise ValueError("the measured models must come from at least two families "
                         "(the error is measured by leaving one family out)")
    predicted = leave_one_family_out(latency)
    report = FitReport(alignment[0], alignment[1], latency, predicted, error_summary(predicted, [s.measured_ms for s in latency]))
    families = len({s.family for s in latency})

    def fit_error(summary: dict[str, float], n_families: int, what: str) -> Any:
        return measured_error(summary, n_families, data=f"{data}: {what}" if data else what)

    load = _samples(measured, features, "frame_ms_under_load")
    load_coefficients: dict[str, float] = {}
    load_error = None
    if load and len({s.family for s in load}) >= 2:
        report.load = load
        report.load_predicted = leave_one_family_out(load)
        report.load_error = error_summary(report.load_predicted, [s.measured_ms for s in load])
        load_coefficients = fit_coefficients(load)
        load_error = fit_error(report.load_error, len({s.family for s in load}), "1000 / FPS under load")
    bpu_ops, cpu_ops = ops_by_place([m.graph for m in measured], flags)
    fitted = FittedCost(
        bpu_ops=bpu_ops, cpu_ops=cpu_ops,
        channel_alignment=alignment[0],
        input_alignment=alignment[1],
        latency_ms={k: v for k, v in latency_coefficients.items() if v > 0},
        frame_ms_under_load={k: v for k, v in load_coefficients.items() if v > 0},
        load_threads=(load_threads or _usual_threads(measured)) if load_coefficients else None,
        error=fit_error(report.latency_error, families, "single-frame latency"),
        throughput_error=load_error,
        support={k: v for k, v in support(latency).items() if v > 0},
    )
    return with_fitted(march, fitted), report


MAC_FEATURES = ("dense_gmac", "depthwise_gmac", "grouped_gmac", "matmul_gmac")
"""The features whose cost scales with a chip's int8 MAC rate."""


def carried_fit(target: Any, base: Any, data: str) -> Any:
    """`target` with `base`'s fitted model carried over, for a chip no measured model exists of:
    the MAC terms scaled by `base.int8_tops / target.int8_tops`, every other term (memory, fixed
    and CPU costs) as on `base`. Its error says it was never checked on `target` (rows = 0,
    `data` says where the fit comes from)."""
    from hatcli.march_profile import FitError

    fitted = base.cost.fitted
    if fitted is None:
        raise ValueError(f"{base.name} has no fitted model to carry over")
    ratio = base.int8_tops / target.int8_tops

    def scaled(coefficients: dict[str, float]) -> dict[str, float]:
        return {k: v * ratio if k in MAC_FEATURES else v for k, v in coefficients.items()}

    unchecked = FitError(method="not measured", rows=0, data=data)
    carried = fitted.model_copy(update={
        "latency_ms": scaled(fitted.latency_ms), "frame_ms_under_load": scaled(fitted.frame_ms_under_load),
        "error": unchecked, "throughput_error": unchecked if fitted.frame_ms_under_load else None})
    return with_fitted(target, carried)


@dataclass
class ScaleReport:
    """A fit carried to another chip by one factor fitted on a few of its measured models."""

    scale: float
    samples: list[Sample]
    predicted: list[float]
    """Leave-one-model-out estimates, in `samples` order."""
    error: dict[str, float]


def _best_scale(ratios: Sequence[float]) -> float:
    """The factor s minimising sum((s * r - 1)^2) over estimate / measured ratios r."""
    r = np.asarray(ratios, dtype=float)
    return float(r.sum() / (r * r).sum())


def scaled_fit(target: Any, base: Any, measured: Sequence[MeasuredGraph], data: str) -> tuple[Any, ScaleReport]:
    """`target` with `base`'s fitted model times one factor, the factor fitted on `measured`
    models of `target` (least squares on relative error; the error's `data` is `data` and the
    factor); the error written is the
    leave-one-model-out one (each model estimated with the factor of the others). For a chip of
    `base`'s architecture with too few measurements for a fit of its own. Needs 2+ models."""
    fitted = base.cost.fitted
    if fitted is None:
        raise ValueError(f"{base.name} has no fitted model to scale")
    samples = _samples(measured, [model_features(graph_features(m.graph, target, fitted.channel_alignment,
                                                                fitted.input_alignment, fallbacks=m.fallbacks),
                                                 m.graph.batch)
                                  for m in measured], "latency_ms")
    if len(samples) < 2:
        raise ValueError("a scaled fit needs at least two measured models (one is left out at a time)")
    ratios = [predict_ms(fitted.latency_ms, s.features) / s.measured_ms for s in samples]
    scale = _best_scale(ratios)
    predicted = [_best_scale(ratios[:i] + ratios[i + 1:]) * ratios[i] * s.measured_ms
                 for i, s in enumerate(samples)]
    summary = error_summary(predicted, [s.measured_ms for s in samples])
    factor = f"{base.name}'s fit x {scale:.4f}, the factor fitted on them"
    error = measured_error(summary, len({s.family for s in samples}), f"{data}; {factor}" if data else factor,
                           method="leave one model out")
    carried = fitted.model_copy(update={
        "latency_ms": {k: v * scale for k, v in fitted.latency_ms.items()},
        "frame_ms_under_load": {}, "load_threads": None, "throughput_error": None, "error": error})
    return with_fitted(target, carried), ScaleReport(scale, samples, predicted, summary)
