"""Build the ONNX graph of every rebuilt published model (bpu_catalogue), quantized with hat's flow.

    .venv/bin/python bench/bpu_graphs.py --work-dir DIR [--march bayes-e|bernoulli2|nash-e]
        [--only NAME,...] [--limit N] [--csv PATH] [--timeout S] [--retry-float] [--in-process]

For each catalogue entry of the chosen march(es): build the network (random weights, BatchNorm
statistics from one random batch: `_quantize.realistic_statistics`), quantize it for the hat march
of the chip (`hat_march`) with hat's PT2E flow (`_quantize.quantized_onnx`, calibrated on one
random 1x3xHxW batch) and write `DIR/graphs/<march>/<safe name>_<h>x<w>.onnx`. When hat's flow
fails on a model, the failure (stage and message) goes to `DIR/graphs/failures.json` and the
float network is exported instead (torch.export + dynamo ONNX); `DIR/graphs/<march>/index.json`
says per graph whether it is `quantized` or `float`, with family, group, input size, parameters,
MACs and build seconds.

Resumable: a graph already written is skipped (`--retry-float` rebuilds the float ones, e.g.
after hat learned an op). Files are written under a temporary name and renamed. Each model runs
in its own child process (a crash, an out-of-memory kill or `--timeout` seconds end that model
only; `--in-process` runs them in this one), its output in `DIR/logs/<march>/<name>.log`.
stderr: one line per model (march, name, status, seconds, parameters, MACs); the last line of
stdout is one JSON object: built / skipped / failed / float counts per march, and seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bpu_catalogue as cat  # noqa: E402

HAT_MARCHES = {"bayes-e": "bayes_e", "bernoulli2": "bernoulli2", "nash-e": "nash_e", "bayes": "bayes"}
"""CSV march -> hat march profile."""
FALLBACK_MARCH = "bayes"
"""Used for a chip whose own profile hat does not ship yet."""
CHILD_FAILED = 3
"""Exit status of a child that recorded its own failure."""


def profile_digest(hat_march_name: str) -> str:
    """A short hash of what decides how a march's graphs are quantized: the quantization rules,
    the op table and the fusible activations. The cost section is left out, so shipping a new
    fitted cost model does not make every graph stale."""
    import hashlib

    from hatcli.quant.march import load_march

    profile = load_march(hat_march_name)
    quantizing = profile.model_dump(include={"quant", "ops", "fusible_activations"}, mode="json")
    text = json.dumps(quantizing, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def hat_march(march: str) -> str:
    """The hat march to quantize a chip's graphs for: its own profile (`bayes-e` -> `bayes_e`,
    `bernoulli2` -> `bernoulli2`, `nash-e` -> `nash_e`) where `load_march` knows it, else `bayes`."""
    from hatcli.quant.march import load_march

    name = HAT_MARCHES[march]
    try:
        load_march(name)
        return name
    except Exception:  # noqa: BLE001 - an unknown march is a UsageError; any failure means "not yet"
        return FALLBACK_MARCH


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

def graph_path(work_dir: Path, march: str, name: str, hw: tuple[int, int]) -> Path:
    """`DIR/graphs/<march>/<safe name>_<h>x<w>.onnx`."""
    return work_dir / "graphs" / march / f"{cat.safe_name(name)}_{hw[0]}x{hw[1]}.onnx"


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def _write_json(path: Path, data: Any) -> None:
    """Write atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def record_index(work_dir: Path, march: str, name: str, info: dict[str, Any]) -> None:
    """Set `name`'s entry of `DIR/graphs/<march>/index.json`."""
    path = work_dir / "graphs" / march / "index.json"
    index = _read_json(path, {})
    index[name] = info
    _write_json(path, index)


def record_failure(work_dir: Path, march: str, name: str, stage: str, error: str) -> None:
    """Append one failure of (march, name) to `DIR/graphs/failures.json` (`{"march/name": [...]}`)."""
    path = work_dir / "graphs" / "failures.json"
    failures = _read_json(path, {})
    failures.setdefault(f"{march}/{name}", []).append(
        {"stage": stage, "error": error, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    _write_json(path, failures)


def clear_failures(work_dir: Path, march: str, name: str, stages: tuple[str, ...] = ("build", "quantize")) -> None:
    """Forget the recorded failures of (march, name) at `stages` (its graph now builds / quantizes)."""
    path = work_dir / "graphs" / "failures.json"
    failures = _read_json(path, {})
    key = f"{march}/{name}"
    kept = [f for f in failures.get(key, []) if f["stage"] not in stages]
    if key in failures and len(kept) != len(failures[key]):
        if kept:
            failures[key] = kept
        else:
            del failures[key]
        _write_json(path, failures)


def _error_text(exc: BaseException) -> str:
    """`Type: message` of an exception, plus the innermost frame of its traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" [at {Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}]" if frames else ""
    message = str(exc).strip().splitlines()
    head = " | ".join(line.strip() for line in message[:6])[:1500]
    return f"{type(exc).__name__}: {head}{where}"


# --------------------------------------------------------------------------------------------
# one graph
# --------------------------------------------------------------------------------------------

class BenchFamily:
    """The part of a model family hat's quantization flow reads, for a network built here."""

    name = "bench"

    def __init__(self, output_names: list[str]) -> None:
        self.output_names = output_names

    def build_deploy_model(self, float_model: Any) -> Any:
        """The network as it is."""
        return float_model

    def example_inputs(self, input_size: tuple[int, int], batch: int = 2) -> tuple[Any]:
        """A random NCHW batch."""
        import torch

        return (torch.randn(batch, 3, *input_size),)


def _flat_outputs(out: Any) -> list[Any]:
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_outputs(o)]
    return [out]


def measure(model: Any, hw: tuple[int, int]) -> dict[str, Any]:
    """One batch-1 forward under torch's FLOP counter: MACs (G), number of outputs and their shapes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        outs = _flat_outputs(model(torch.randn(1, 3, *hw)))
    return {"macs_g": round(counter.get_total_flops() / 2e9, 4), "outputs": len(outs),
            "output_shapes": [list(o.shape) for o in outs]}


def with_statistics(model: Any, hw: tuple[int, int]) -> Any:
    """BatchNorm statistics from one random batch where the network has BatchNorm (`_quantize`)."""
    from torch import nn

    from _quantize import realistic_statistics

    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return realistic_statistics(model, hw)
    return model.eval()


def export_graph(model: Any, hw: tuple[int, int], march: str, path: Path, n_outputs: int) -> tuple[str, str, str]:
    """Write `path`: hat's quantized QDQ ONNX, or the float ONNX when hat's flow fails. Returns
    (mode, hat march, error of hat's flow or "")."""
    import torch

    from _quantize import float_onnx, quantized_onnx

    part = path.with_name(path.name + ".part")
    hm = hat_march(march)
    names = [f"out{i}" for i in range(n_outputs)]
    try:
        calibration = [torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(1))]
        quantized_onnx(model, hw, hm, part, calibration=calibration, family=BenchFamily(names))
        part.replace(path)
        return "quantized", hm, ""
    except Exception as exc:  # noqa: BLE001 - every failure of hat's flow is recorded, then float
        error = _error_text(exc)
        part.unlink(missing_ok=True)
    float_onnx(model.eval(), hw, part)
    part.replace(path)
    return "float", hm, error


def build_one(work_dir: Path, march: str, name: str, hw: tuple[int, int]) -> dict[str, Any]:
    """Build, measure, quantize and write one graph; record it in the index (and any failure of
    hat's flow in failures.json). Returns the index entry. Raises if even the float export fails."""
    import warnings

    warnings.simplefilter("ignore")
    entry = cat.CATALOGUE[(march, name)]
    path = graph_path(work_dir, march, name, hw)
    path.parent.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    model = cat.build(march, name, hw)
    info = {"params_m": cat.build_info(model)["params_m"]}
    model = with_statistics(model, hw)
    info.update(measure(model, hw))
    built_s = time.perf_counter() - tic
    mode, hm, error = export_graph(model, hw, march, path, info["outputs"])
    if error:
        clear_failures(work_dir, march, name)
        record_failure(work_dir, march, name, "quantize", error)
    else:
        clear_failures(work_dir, march, name)
    info.update({"file": path.name, "mode": mode, "hat_march": hm, "family": entry.family, "group": entry.group,
                 "library": entry.library, "constructor": entry.constructor, "input_hw": list(hw),
                 "reparameterized": entry.reparameterize, "attention": entry.attention if entry.head else None,
                 "published_params_m": entry.published_params_m, "model_s": round(built_s, 2),
                 "build_s": round(time.perf_counter() - tic, 2), "quant_error": error or None,
                 "profile_sha256": profile_digest(hm)})
    record_index(work_dir, march, name, info)
    return info


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------

def selected(march: str | None, only: list[str], limit: int | None,
             sizes: dict[tuple[str, str], tuple[int, int]]) -> list[tuple[str, str, tuple[int, int]]]:
    """Catalogue entries to build, in catalogue order: (march, name, (h, w))."""
    chosen = [(m, n, sizes[(m, n)]) for (m, n) in cat.CATALOGUE
              if (march is None or m == march) and (not only or n in only) and (m, n) in sizes]
    unknown = [n for n in only if not any(n == c[1] for c in chosen)]
    if unknown:
        raise SystemExit(f"--only: not in the catalogue{' of ' + march if march else ''}: {unknown}")
    return chosen[:limit] if limit else chosen


def split_names(text: str, known: set[str]) -> list[str]:
    """Split a comma-separated `--only` list; a published name may itself contain commas
    (`siglip-base-patch16-224 (vision, last_hidden_state)`), so pieces are joined until they
    form a known name."""
    names, current = [], ""
    for piece in text.split(","):
        current = f"{current},{piece}" if current else piece
        if current.strip() in known:
            names.append(current.strip())
            current = ""
    if current.strip():
        names.append(current.strip())  # unknown: `selected` reports it
    return names


def done(work_dir: Path, march: str, name: str, hw: tuple[int, int], retry_float: bool) -> bool:
    """Whether the graph is already written for the current march profile (and, with
    `retry_float`, quantized)."""
    if not graph_path(work_dir, march, name, hw).exists():
        return False
    info = _read_json(work_dir / "graphs" / march / "index.json", {}).get(name, {})
    built_for = info.get("profile_sha256")
    if built_for is not None and built_for != profile_digest(info.get("hat_march") or hat_march(march)):
        return False  # quantized for an older version of the march profile
    if not retry_float:
        return True
    return info.get("mode") == "quantized"


def run_child(args: argparse.Namespace, march: str, name: str) -> tuple[str, dict[str, Any] | None]:
    """Build one graph in a child process; (status, index entry). A child that dies or runs past
    `--timeout` is recorded as a failure."""
    log = args.work_dir / "logs" / march / f"{cat.safe_name(name)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--work-dir", str(args.work_dir), "--csv",
           str(args.csv), "--child", march, name]
    with open(log, "w") as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=args.timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    if code == 0:
        info = _read_json(args.work_dir / "graphs" / march / "index.json", {}).get(name)
        return (info or {}).get("mode", "failed"), info
    if code == CHILD_FAILED:  # the child recorded its failure
        return "failed", None
    reason = f"timed out after {args.timeout} s" if code is None else f"child exited with {code}"
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    record_failure(args.work_dir, march, name, "build", f"{reason}: {' | '.join(tail)[-1500:]}")
    return "failed", None


def run_here(args: argparse.Namespace, march: str, name: str, hw: tuple[int, int]) -> tuple[str, dict | None]:
    """Build one graph in this process; (status, index entry)."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            info = build_one(args.work_dir, march, name, hw)
        return info["mode"], info
    except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
        record_failure(args.work_dir, march, name, "build", _error_text(exc))
        return "failed", None


def progress(march: str, name: str, status: str, seconds: float, info: dict[str, Any] | None) -> None:
    """One plain line on stderr."""
    extra = ""
    if info:
        extra = f" params={info.get('params_m')}M macs={info.get('macs_g')}G ({info.get('hat_march')})"
    print(f"{march} {name}: {status} {seconds:.1f}s{extra}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and build the graphs (or, with `--child`, one graph)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--march", choices=cat.MARCHES)
    p.add_argument("--only", default="", help="comma-separated published model names")
    p.add_argument("--limit", type=int)
    p.add_argument("--csv", type=Path, default=cat.DEFAULT_CSV)
    p.add_argument("--timeout", type=float, default=1800, help="seconds one model may take (child process)")
    p.add_argument("--retry-float", action="store_true", help="rebuild graphs written as float")
    p.add_argument("--in-process", action="store_true", help="no child processes")
    p.add_argument("--child", nargs=2, metavar=("MARCH", "NAME"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.work_dir = args.work_dir.resolve()
    sizes = cat.published_models(cat.load_all_rows(args.csv, args.csv.parent / cat.HAT_ZOO_MD.name))
    if args.child:
        march, name = args.child
        status, _ = run_here(args, march, name, sizes[(march, name)])
        return CHILD_FAILED if status == "failed" else 0
    only = split_names(args.only, {n for _, n in cat.CATALOGUE})
    todo = selected(args.march, only, args.limit, sizes)
    counts = {m: {"built": 0, "quantized": 0, "float": 0, "skipped": 0, "failed": 0}
              for m in sorted({t[0] for t in todo})}
    slow: list[dict[str, Any]] = []
    start = time.perf_counter()
    for march, name, hw in todo:
        if done(args.work_dir, march, name, hw, args.retry_float):
            counts[march]["skipped"] += 1
            continue
        tic = time.perf_counter()
        status, info = run_here(args, march, name, hw) if args.in_process else run_child(args, march, name)
        seconds = time.perf_counter() - tic
        progress(march, name, status, seconds, info)
        if status == "failed":
            counts[march]["failed"] += 1
        else:
            counts[march]["built"] += 1
            counts[march][status] += 1
        if seconds > 180:
            slow.append({"march": march, "model": name, "seconds": round(seconds, 1)})
    print(json.dumps({"per_march": counts, "slow_over_180s": slow,
                      "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
