"""Fit and cross-validate the BPU latency model on the published board figures.

    .venv/bin/python bench/bpu_graphs.py --work-dir DIR       # rebuild and quantize the models (hours, resumable)
    .venv/bin/python bench/bpu_latency.py --work-dir DIR [--write-profiles] [--march bayes-e]

Data: `../shared/data/bpu_latency_public.csv` (501 published per-model figures of RDK X5 /
Bayes-e, RDK X3 / Bernoulli2 and RDK S100 / Nash-e, measured with `hrt_model_exec perf`), and
the graphs `bench/bpu_graphs.py` rebuilt from them (`DIR/graphs/<march>/index.json`).

Per march: every rebuilt model with a single-frame latency (`hrt_perf_1thread`, and on the X3
`oe_single_core_single_frame`) is a latency sample; its multi-thread row with the highest FPS is
a throughput sample (`1000 / fps` ms per frame under load). The boards ran what D-Robotics'
toolchain compiled, which quantizes every op the chip's op table supports: a layer counts as a CPU
fallback when its op or shape is outside the table (`op_table_fallbacks`), not where hat's
quantizer left an op float. `hatcli.deploy.perf_fit.fit_march`
chooses the channel alignment, fits the coefficients and measures the error by leaving one
architecture family out at a time. `--write-profiles` writes the fit into the shipped profiles
(`hatcli/quant/marches/<march>.toml`, `[cost.fitted]`).

Chips without a table of their own: Journey 5 (`bayes`, the same Bayes BPU architecture as the
X5) takes the X5 fit times one factor fitted on the HAT model zoo's three BPU latencies
(`../shared/data/hat_modelzoo_latency.md`; its error is leave-one-model-out over those three);
Journey 6M / 6P (`nash_m`, `nash_p`), of which no per-model latency is published, carry the
S100's Nash-e fit with the MAC terms scaled by int8 TOPS and say they were never checked.

Targets (per march with at least 50 rebuilt rows, leave-one-family-out): median |error| <= 12 %,
at least 60 % within +-10 %, Spearman >= 0.95. The tables go to stderr; the last line on stdout
is one JSON object with, per march, `rows`, `median_abs_error`, `within_10`, `within_25`
(fractions), `spearman`, the same for throughput, the per-family errors and the coefficients.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bpu_catalogue import DEFAULT_CSV, HAT_ZOO_MD, load_all_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HAT_MARCH = {"bayes-e": "bayes_e", "bernoulli2": "bernoulli2", "nash-e": "nash_e"}
"""Chips of the table with a fit of their own."""
SCALED = {"bayes": ("bayes-e", "bayes")}
"""Chip -> (the chip whose fit it scales, hat march): Journey 5 (the HAT model zoo's three BPU
latencies) takes the RDK X5's fit (the same Bayes architecture) times one factor fitted on them."""
CARRIED = {"nash_m": "nash-e", "nash_p": "nash-e"}
"""hat march -> the chip whose fit it carries, MAC terms scaled by int8 TOPS: no published
per-model latency exists for Journey 6M / 6P."""
LATENCY_KINDS = {"hrt_perf_1thread", "oe_single_core_single_frame", "hat_zoo_bpu_latency"}
LOAD_KINDS = {"hrt_perf_multithread"}
TARGETS = {"median_abs_error": 0.12, "within_10": 0.60, "spearman": 0.95, "min_rows": 50}


def log(text: str) -> None:
    """One progress line on stderr."""
    print(f"[bpu_latency {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def measured_graphs(work_dir: Path, march: str, rows: list[dict[str, Any]]) -> list[Any]:
    """The rebuilt models of `march` with what the table measured of them."""
    from hatcli.deploy.onnx_graph import read_graph
    from hatcli.deploy.perf_features import op_table_fallbacks
    from hatcli.deploy.perf_fit import MeasuredGraph
    from hatcli.quant.march import load_march

    march_profile = load_march(HAT_MARCH.get(march, march))

    folder = work_dir / "graphs" / march
    index_path = folder / "index.json"
    if not index_path.exists():
        return []
    index = json.loads(index_path.read_text())
    out = []
    for name, info in sorted(index.items()):
        mine = [r for r in rows if r["march"] == march and r["model"] == name]
        single = [r for r in mine if r["kind"] in LATENCY_KINDS and r.get("latency_ms")]
        load = [r for r in mine if r["kind"] in LOAD_KINDS and r.get("fps") and (r.get("threads") or 0) > 1]
        if not single and not load:
            continue
        path = folder / info["file"]
        if not path.exists():
            continue
        best = max(load, key=lambda r: r["fps"]) if load else None
        graph = read_graph(path, batch=1)
        out.append(MeasuredGraph(
            name=name, family=info["family"], group=info.get("group", ""), graph=graph,
            fallbacks=op_table_fallbacks(graph, march_profile),
            latency_ms=float(single[0]["latency_ms"]) if single else None,
            frame_ms_under_load=1e3 / float(best["fps"]) if best else None,
            threads=int(best["threads"]) if best else None))
    return out


def meets(summary: dict[str, Any]) -> bool | None:
    """Whether a march's cross-validated latency error meets the targets (None: too few rows)."""
    if summary["rows"] < TARGETS["min_rows"]:
        return None
    return (summary["median_abs_error"] <= TARGETS["median_abs_error"] and summary["within_10"] >= TARGETS["within_10"]
            and summary["spearman"] >= TARGETS["spearman"])


def table(march: str, report: Any) -> None:
    """Per-family cross-validated errors, and the worst models, on stderr."""
    log(f"{march}: alignment out {report.channel_alignment} in {report.input_alignment}; leave-one-family-out single-frame latency: "
        f"{report.latency_error}")
    log(f"{'family':<22} {'rows':>4} {'median |err|':>12} {'within 10%':>10}")
    for family, summary in sorted(report.by_family().items(), key=lambda kv: -kv[1]["median_abs_error"]):
        log(f"{family:<22} {summary['rows']:>4} {100 * summary['median_abs_error']:>11.1f}% "
            f"{100 * summary['within_10']:>9.0f}%")
    worst = sorted(zip(report.latency, report.latency_predicted), key=lambda sp: -abs(sp[1] / sp[0].measured_ms - 1))
    for sample, predicted in worst[:8]:
        log(f"  worst: {sample.name:<28} measured {sample.measured_ms:8.2f} ms  estimated {predicted:8.2f} ms "
            f"({100 * (predicted / sample.measured_ms - 1):+.0f} %)")


def coarse_group(group: str) -> str:
    """`yolo` for every Ultralytics model (detect, seg, pose, cls), `classifier` for CNN and
    transformer classifiers, else the group itself: the units of the leave-one-group-out check."""
    if group.startswith("yolo"):
        return "yolo"
    return "classifier" if group.endswith("classifier") else group or "other"


def leave_one_group_out(report: Any) -> dict[str, dict[str, float]]:
    """Fit without all YOLOs and predict them, fit without all classifiers and predict them (and
    so on per coarse group): the error of each left-out group."""
    from dataclasses import replace

    from hatcli.deploy.perf_fit import error_summary, leave_one_family_out

    samples = [replace(s, family=coarse_group(s.group)) for s in report.latency]
    if len({s.family for s in samples}) < 2:
        return {}
    predicted = leave_one_family_out(samples)
    out = {}
    for group in sorted({s.family for s in samples}):
        index = [i for i, s in enumerate(samples) if s.family == group]
        out[group] = error_summary([predicted[i] for i in index], [samples[i].measured_ms for i in index])
    return out


def markdown(march: str, chip: str, report: Any, groups: dict[str, dict[str, float]]) -> str:
    """The tables of one march for docs/perf_model.md: the summary, each left-out group, each
    family, and every model with its left-out estimate."""
    def pct(x: float) -> str:
        return f"{100 * x:.1f} %"

    e = report.latency_error
    lines = [f"### {chip} (`{march}`)", "",
             f"Single-frame latency, leave one family out: **{e['rows']} models, median |error| "
             f"{pct(e['median_abs_error'])}, {pct(e['within_10'])} within +-10 %, {pct(e['within_25'])} within "
             f"+-25 %, Spearman {e['spearman']:.3f}** (alignment: output channels {report.channel_alignment}, "
             f"input channels {report.input_alignment}).", ""]
    if report.load_error:
        t = report.load_error
        lines += [f"1000 / FPS under multi-thread load: {t['rows']} models, median |error| "
                  f"{pct(t['median_abs_error'])}, {pct(t['within_10'])} within +-10 %, Spearman {t['spearman']:.3f}.", ""]
    if groups:
        lines += ["| left out | models | median abs error | within 10 % | within 25 % |", "|---|---|---|---|---|"]
        lines += [f"| all {g}s | {v['rows']} | {pct(v['median_abs_error'])} | {pct(v['within_10'])} | "
                  f"{pct(v['within_25'])} |" for g, v in groups.items()]
        lines.append("")
    lines += ["| family | models | median abs error | within 10 % |", "|---|---|---|---|"]
    for family, v in sorted(report.by_family().items(), key=lambda kv: -kv[1]["median_abs_error"]):
        lines.append(f"| {family} | {v['rows']} | {pct(v['median_abs_error'])} | {pct(v['within_10'])} |")
    lines += ["", "<details><summary>every model (measured, estimated with its family left out)</summary>", "",
              "| model | family | measured ms | estimated ms | error |", "|---|---|---|---|---|"]
    for sample, predicted in sorted(zip(report.latency, report.latency_predicted), key=lambda sp: sp[0].name):
        lines.append(f"| {sample.name} | {sample.family} | {sample.measured_ms:.3f} | {predicted:.3f} | "
                     f"{100 * (predicted / sample.measured_ms - 1):+.1f} % |")
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def write_profile(profile: Any) -> None:
    """Write `profile`'s fitted model into hat's shipped profile of the same name: the file's text
    is kept as it is up to its `[cost.fitted]` section, which is replaced (or appended); the result
    must read back as `profile`."""
    import tomli_w

    from hatcli.atomic import atomic_write_text
    from hatcli.march_profile import read_march_file
    from hatcli.quant.march import shipped_march_file

    path = Path(str(shipped_march_file(profile.name)))
    text = path.read_text()
    cut = text.find("\n[cost.fitted")
    kept = (text if cut < 0 else text[:cut]).rstrip("\n")
    fitted = profile.cost.fitted.model_dump(mode="json", exclude_none=True)
    atomic_write_text(path, kept + "\n\n" + tomli_w.dumps({"cost": {"fitted": fitted}}))
    if read_march_file(path) != profile:
        raise SystemExit(f"{path}: the profile written does not read back as the fitted one")
    log(f"{profile.name}: wrote the fit into {path.relative_to(ROOT)}")


def main() -> int:
    """Run the fit and validation; return the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "hat-bench-bpu-graphs")
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--march", choices=sorted([*HAT_MARCH, *SCALED]), action="append")
    parser.add_argument("--markdown", type=Path, help="write the per-march tables (for docs/perf_model.md) here")
    parser.add_argument("--write-profiles", action="store_true",
                        help="write the fitted models into hatcli/quant/marches/<march>.toml")
    args = parser.parse_args()
    if not args.csv.is_file():
        print(f"error: {args.csv} not found: pass --csv (../shared/data/bpu_latency_public.csv)", file=sys.stderr)
        return 2
    from hatcli.deploy.perf_fit import carried_fit, fit_march, scaled_fit
    from hatcli.quant.march import load_march

    wall = time.perf_counter()
    rows = load_all_rows(args.csv, args.csv.parent / HAT_ZOO_MD.name)
    result: dict[str, Any] = {}
    fitted: dict[str, Any] = {}
    pages: list[str] = []
    wanted = args.march or [*HAT_MARCH, *SCALED]
    for march in sorted({m for m in wanted if m in HAT_MARCH} | {SCALED[m][0] for m in wanted if m in SCALED}):
        measured = measured_graphs(args.work_dir, march, rows)
        if len({m.family for m in measured}) < 2:
            log(f"{march}: {len(measured)} rebuilt graph(s) under {args.work_dir}; run bench/bpu_graphs.py first")
            result[march] = {"rows": len(measured), "error": "too few rebuilt graphs"}
            continue
        base = load_march(HAT_MARCH[march])
        profile, report = fit_march(base, measured, data=f"{args.csv.name}, {base.chip}")
        table(march, report)
        groups = leave_one_group_out(report)
        for group, summary in groups.items():
            log(f"{march}: fitted without all {group}s, predicting them: {summary}")
        pages.append(markdown(HAT_MARCH[march], base.chip, report, groups))
        fitted[march] = profile
        result[march] = {**report.latency_error, "targets_met": meets(report.latency_error),
                         "throughput": report.load_error, "channel_alignment": report.channel_alignment,
                         "input_alignment": report.input_alignment, "left_out_groups": groups,
                         "by_family": report.by_family(), "coefficients": profile.cost.fitted.latency_ms,
                         "throughput_coefficients": profile.cost.fitted.frame_ms_under_load}
        if args.write_profiles:
            write_profile(profile)
    for chip, (base_chip, hat_name) in SCALED.items():
        if base_chip not in fitted or chip not in wanted:
            continue
        measured = measured_graphs(args.work_dir, chip, rows)
        if len(measured) < 2:
            log(f"{chip}: {len(measured)} rebuilt graph(s); run bench/bpu_graphs.py --march {chip}")
            continue
        base = fitted[base_chip]
        profile, scaled = scaled_fit(load_march(hat_name), base, measured,
                                     data=f"{HAT_ZOO_MD.name}: {len(measured)} HAT model-zoo BPU latencies")
        for sample, predicted in zip(scaled.samples, scaled.predicted):
            log(f"  {chip} {sample.name:<18} measured {sample.measured_ms:7.3f} ms  estimated (left out) "
                f"{predicted:7.3f} ms ({100 * (predicted / sample.measured_ms - 1):+.0f} %)")
        log(f"{chip}: {base.name}'s fit x {scaled.scale:.4f}; leave-one-model-out {scaled.error}")
        result[chip] = {**scaled.error, "targets_met": meets(scaled.error), "scaled_from": base_chip,
                        "scale": scaled.scale}
        if args.write_profiles:
            write_profile(profile)
    for hat_name, base_chip in CARRIED.items():
        if base_chip not in fitted:  # carried whenever its base chip was fitted in this run
            continue
        base, target = fitted[base_chip], load_march(hat_name)
        profile = carried_fit(target, base, data=(
            f"{base.name}'s fit ({base.cost.fitted.error.rows} {base.chip} models), MAC terms x "
            f"{base.int8_tops:g}/{target.int8_tops:g} int8 TOPS, the rest as on {base.chip}"))
        result[hat_name] = {"rows": 0, "carried_from": base_chip}
        if args.write_profiles:
            write_profile(profile)
    if args.markdown:
        args.markdown.write_text("\n".join(pages))
        log(f"wrote {args.markdown}")
    result["targets"] = TARGETS
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
