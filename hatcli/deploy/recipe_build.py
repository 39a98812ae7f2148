"""Compile and perf for a recipe: the deploy steps that `hat compile`, `hat perf` and `hat run` share.

Whether a compiled artifact is up to date (its fingerprint) is `hatcli.stages`' to say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatcli.deploy.compile import compile_model
from hatcli.deploy.perf import estimate_latency, measure_latency
from hatcli.deploy.runtime import MANIFEST, manifest_model, read_manifest, sha256_file
from hatcli.errors import ArtifactError
from hatcli.quant.march import load_march
from hatcli.recipe import LoadedRecipe
from hatcli.stages import compile_fingerprint, default_export_dir, quant_source, warn_unfinished


CONSUMER_KEYS = ("task", "kind", "classes", "preprocess", "output_meaning")
"""Export manifest keys that tell a consumer without hat how to feed the model; the compiled
artifact's manifest repeats them (docs/formats.md)."""


def compile_recipe(lr: LoadedRecipe, march: str, opt: int, out_dir: Path) -> Path:
    """Compile the recipe's exported model for `march` at `opt` into `out_dir`."""
    export_dir = default_export_dir(lr)
    onnx_path = export_dir / "model.onnx"
    if not onnx_path.exists():
        raise ArtifactError(f"no exported model at {onnx_path}; run `hat export {lr.path}` first")
    manifest = read_manifest(export_dir / "manifest.json")
    missing = [k for k in ("input", "classes", "fingerprint") if k not in manifest]
    if missing:
        raise ArtifactError(f"{export_dir / 'manifest.json'}: no {', '.join(f'`{k}`' for k in missing)}; "
                            f"export again with `hat export {lr.path}`")
    warn_unfinished(lr, manifest.get("source_stage") or quant_source(lr), "the compiled artifact")
    spec = dict(manifest["input"])
    spec["shape"] = [1, *spec["shape"][1:]]
    extra = {"task": lr.recipe.task, "family": lr.family.name, "classes": manifest["classes"],
             "source_stage": manifest.get("source_stage"),
             "fingerprint": compile_fingerprint(manifest["fingerprint"], march, opt),
             "export_fingerprint": manifest["fingerprint"]}
    consumer = {k: manifest[k] for k in CONSUMER_KEYS if k in manifest}
    return compile_model(onnx_path, load_march(march), opt, out_dir, spec, extra_manifest=extra,
                         name=lr.recipe.task, consumer=consumer)


def estimation_source(artifact_dir: Path) -> Path:
    """The model a compiled artifact was made from (its QDQ graph is what the cost model reads:
    the runtime-fused ops of the compiled file are not BPU ops), found through the path the
    manifest records relative to the artifact folder when the file there still has the recorded
    sha256; else (a copied or moved artifact) the artifact's own model."""
    manifest = read_manifest(artifact_dir / MANIFEST)
    source = manifest.get("source") or {}
    rel = source.get("path")
    if isinstance(rel, str) and rel and not Path(rel).is_absolute():
        candidate = artifact_dir / rel
        if candidate.is_file() and sha256_file(candidate) == source.get("sha256"):
            return candidate
    return manifest_model(artifact_dir, manifest)


def perf_report(model_path: Path, march: str, measure: bool, batch: int = 1, threads: int | None = None,
                runs: int = 50, estimate_from: Path | None = None, runtime: str | None = None) -> dict[str, Any]:
    """Estimated latency on `march` (from `estimate_from`, default the model itself) and, when
    `measure`, latency of `model_path` measured on this host with `runtime` (default ONNX Runtime)."""
    profile = load_march(march)
    estimate = estimate_latency(estimate_from or model_path, profile, batch=batch).to_dict()
    report: dict[str, Any] = {"model": str(model_path), "march": march, "estimate": estimate}
    if measure:
        report["measured"] = measure_latency(model_path, batch=batch, threads=threads, runs=runs,
                                             progress=True, runtime=runtime).to_dict()
    return report
