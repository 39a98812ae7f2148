"""`compile_model`: turn an exported ONNX QDQ model into a deployable artifact directory.

We cannot run Horizon's compiler, so "compiling" here means what we can do for real: ONNX
Runtime's graph optimizations at the requested level (`--opt 0..3`), the optimized graph saved as
`model.onnx`, plus a static perf report for the march and a manifest that pins every file by
sha256. The artifact is built in a temp dir next to `out_dir` and renamed into place at the end,
so an interrupted compile never leaves a half artifact.

Artifact layout:
    out_dir/model.onnx     optimized graph (loads with plain onnxruntime)
    out_dir/model_qdq.onnx the exported QDQ model, written when a registered runtime reads that form
                           (OpenVINO does its own int8 lowering); manifest `models` and `runtimes`
    out_dir/perf.json      estimate on the march (+ measured latency when the march is `host`)
    out_dir/perf.html      the same as a self-contained page: figures, slowest layers, per-layer table
    out_dir/march.toml     the march profile it was compiled for (rules, op table, cost model), so
                           `hat perf` can estimate it where that march is not installed
    out_dir/manifest.json  march, opt, input spec, outputs, sha256 of every file, versions,
                           session options to load it with
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import onnx

from hatcli import __version__
from hatcli.atomic import atomic_write_json, atomic_write_text
from hatcli.deploy.accumulator_lowering import lower_exact_weighted, lower_weighted_matmul
from hatcli.deploy.attention_lowering import lower_attention_ops
from hatcli.deploy.check import check_graph
from hatcli.deploy.folders import building
from hatcli.deploy.graph_edit import static_shapes
from hatcli.deploy.cpu import exact_u8s8
from hatcli.deploy.kernel_fusion import lower_quantized_conv, lower_quantized_gemm
from hatcli.deploy.lowering import (
    fuse_global_average_pool,
    lower_int8_to_uint8,
    lower_linear_resize,
    lower_quantized_binary,
)
from hatcli.deploy.table_lowering import lower_lookup_tables, lower_requantize
from hatcli.deploy.onnx_graph import load_onnx, read_graph, resolve_model_path
from hatcli.deploy.perf import estimate_graph, measure_latency, random_feed
from hatcli.deploy.perf_html import render_perf_html
from hatcli.deploy.pool_lowering import lower_average_pool
from hatcli.deploy.runtime import (
    MANIFEST,
    MODEL,
    QDQ_MODEL,
    create_session,
    opt_level_name,
    runtime_names,
    sha256_file,
)
from hatcli.errors import ArtifactError, HatError, UsageError
from hatcli.march_profile import march_toml
from hatcli.quant.march import MarchProfile

PERF = "perf.json"
PERF_HTML = "perf.html"
MARCH_PROFILE = "march.toml"
SIGNED_WEIGHTS_NOTE = ("weights are int8 (zero point 0) for ONNX Runtime's symmetric U8S8 kernels, exact on CPUs "
                       "that add u8 x s8 products in 32 bits (x86 VNNI, Arm dot product); compile on a CPU "
                       "without them for an artifact that is exact everywhere")
INLINE_LIMIT = 1_800_000_000
"""Models below this many bytes are written as one self-contained model.onnx."""
SHAPED_OPS = ("AveragePool", "Resize", "ReduceMean", "GlobalAveragePool")
"""Ops whose compile-time lowering needs the static shapes of their tensors."""
RUNTIME_FUSING_LEVELS = ("ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
"""Graph optimization levels at which ONNX Runtime fuses QDQ patterns into its integer kernels."""
ARTIFACT_FORMAT = "hat-artifact"
ARTIFACT_VERSION = 1
OPT_3_NOTE = ("ONNX Runtime's ORT_ENABLE_ALL adds layout optimizations (NCHWc) that are specific to "
              "the CPU they run on, so the file holds the ORT_ENABLE_EXTENDED graph and "
              "ORT_ENABLE_ALL is applied when the session is created (session_options)")


def _batch_and_shape(input_spec: dict[str, Any]) -> tuple[int, list[int] | None]:
    shape = input_spec.get("shape") if isinstance(input_spec, dict) else None
    if not isinstance(shape, (list, tuple)) or not shape:
        return 1, None
    batch = int(shape[0]) if isinstance(shape[0], int) and shape[0] > 0 else 1
    if all(isinstance(d, int) for d in shape[1:]):
        return batch, [batch, *[int(d) for d in shape[1:]]]
    return batch, None


def _io(session: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    def spec(value: Any) -> dict[str, Any]:
        dims = [d if isinstance(d, int) else "N" for d in value.shape]
        return {"name": value.name, "shape": dims, "dtype": value.type}

    return [spec(i) for i in session.get_inputs()], [spec(o) for o in session.get_outputs()]


def lower_graph(proto: onnx.ModelProto, runtime_fuses: bool = True, accumulator_bits: int = 32) -> onnx.ModelProto:
    """Every compile-time lowering pass, in order (see hatcli/deploy/lowering.py,
    accumulator_lowering.py, pool_lowering.py, table_lowering.py and kernel_fusion.py): what ONNX
    Runtime is then given to optimize (attention_lowering.py: matmul of two activations, softmax,
    LayerNorm, the add of a float constant). Convs and Gemms with a float or int16 result, or an int16
    input, get the exact accumulator held in `accumulator_bits` (the march's). Int8
    weights stay int8 where this CPU's U8S8 kernels are exact (`hatcli.deploy.cpu.exact_u8s8`),
    else they move to uint8 with the activations. Without `runtime_fuses` (the graph is saved
    at a level where ONNX Runtime fuses no QDQ pattern: `--opt 0`, `1`) convs and Gemms are
    fused here into the QLinearConv / QGemm it would build and no table is left to it; with it,
    only the convs and Gemms whose fused clamp ONNX Runtime cannot fold (a Clip, a Relu above the
    output's minimum) are fused here. So every level computes the same integers."""
    proto, _ = lower_int8_to_uint8(proto, weights=not exact_u8s8())
    # the pool and resize passes read static shapes: inferred once, before any contrib op (which
    # ONNX shape inference cannot see through); the passes keep the names of the tensors they read
    shapes = static_shapes(proto) if any(n.op_type in SHAPED_OPS for n in proto.graph.node) else {}
    proto, _ = lower_exact_weighted(proto, accumulator_bits)
    proto, _ = lower_weighted_matmul(proto, accumulator_bits)
    proto, _ = lower_average_pool(proto, shapes)
    proto, _ = lower_linear_resize(proto, shapes)
    proto, _ = fuse_global_average_pool(proto, shapes)
    proto, _ = lower_quantized_binary(proto)
    proto, _ = lower_attention_ops(proto)
    proto, _ = lower_lookup_tables(proto, runtime_tables=runtime_fuses)
    proto, _ = lower_requantize(proto)
    proto, _ = lower_quantized_conv(proto, clamped_only=runtime_fuses)
    proto, _ = lower_quantized_gemm(proto, clamped_only=runtime_fuses)
    return proto


def _write_optimized(src: Path, level: str, tmp_dir: Path, accumulator_bits: int) -> None:
    """Lower the graph (`lower_graph`), then have ONNX Runtime write it optimized at `level` as
    tmp_dir/model.onnx.

    External data (the dynamo exporter writes `model.onnx.data`) is read in and saved inline
    below 2 GB; larger models keep their weights in `model.onnx.data` next to the graph.
    """
    model_tmp = tmp_dir / f".{MODEL}.tmp"
    proto = lower_graph(load_onnx(src), runtime_fuses=level in RUNTIME_FUSING_LEVELS, accumulator_bits=accumulator_bits)
    if proto.ByteSize() < INLINE_LIMIT:
        create_session(proto.SerializeToString(), level, optimized_path=model_tmp, source=str(src))
    else:
        lowered = tmp_dir / f".lowered.{MODEL}"
        onnx.save(proto, str(lowered), save_as_external_data=True, location=f".lowered.{MODEL}.data")
        create_session(lowered, level, optimized_path=model_tmp, source=str(src), config={
            "session.optimized_model_external_initializers_file_name": f"{MODEL}.data",
            "session.optimized_model_external_initializers_min_size_in_bytes": "1024"})
        lowered.unlink()
        (tmp_dir / f".lowered.{MODEL}.data").unlink()
    if not model_tmp.is_file():
        raise ArtifactError(f"{src}: ONNX Runtime wrote no optimized model")
    os.replace(model_tmp, tmp_dir / MODEL)


def relative_source(src: Path, out_dir: Path) -> str:
    """The source model's path relative to the artifact folder (no absolute path goes into an
    artifact), or just its file name where no relative path exists (another drive)."""
    try:
        return Path(os.path.relpath(src.resolve(), out_dir.resolve())).as_posix()
    except ValueError:
        return src.name


def _versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime

    return {"hatcli": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def _perf_report(onnx_path: Path, model_path: Path, march: MarchProfile, opt: int, batch: int,
                 input_shape: list[int] | None, measure: bool, source_ref: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (perf.json content, check summary) for the source model on `march`. The models are
    named as the artifact sees them (`source_ref` for the source, the file name for the compiled
    one), never by absolute path: the artifact is portable."""
    perf: dict[str, Any] = {"march": march.name, "chip": march.chip, "estimated": march.estimated}
    summary: dict[str, Any] = {}
    try:
        graph = read_graph(onnx_path, batch=batch, input_shape=input_shape)
        perf["estimate"] = {**estimate_graph(graph, march).to_dict(), "model": source_ref}
        report = check_graph(graph, march)
        summary = {"supported": report.supported, "fallbacks": report.fallbacks,
                   "fallback_ops": report.fallback_ops()}
    except HatError:
        raise
    except Exception as exc:  # noqa: BLE001 - the artifact is still valid without an estimate
        perf["estimate"] = None
        perf["estimate_error"] = f"{type(exc).__name__}: {exc}"
    perf["measured"] = ({**measure_latency(model_path, batch=batch, opt_level=opt, warmup=3, runs=20,
                                           input_shape=input_shape).to_dict(), "model": model_path.name}
                        if measure else None)
    return perf, summary


def _portable(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` without the exporter's per-node stack traces and doc strings, which hold absolute
    paths of the machine that exported it (the module paths, `name_scopes`, stay)."""
    for node in model.graph.node:
        node.doc_string = ""
        kept = [prop for prop in node.metadata_props if "stack_trace" not in prop.key]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    return model


def _runtime_models(tmp_dir: Path, src: Path, batch: int, input_shape: list[int] | None
                    ) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """The artifact's model per form and, per registered runtime, what it reads and whether it ran.

    The lowered model is already in `tmp_dir` (ONNX Runtime ran it); the QDQ model is copied in
    when a registered runtime reads it, and every installed runtime of another form runs it once on
    a random batch: `status` is "ok", "not installed here: ..." or "cannot run it: ..."."""
    from hatcli.plugins import runtimes

    specs = [runtimes().get(name) for name in runtime_names()]
    models = {"lowered": MODEL}
    if any(spec.form == "qdq" for spec in specs):
        qdq = _portable(onnx.load(str(src)))  # with its external data: the copy is one self-contained file
        big = qdq.ByteSize() > INLINE_LIMIT
        onnx.save_model(qdq, str(tmp_dir / QDQ_MODEL), save_as_external_data=big, location=f"{QDQ_MODEL}.data")
        models["qdq"] = QDQ_MODEL
    record: dict[str, dict[str, Any]] = {}
    for spec in specs:
        entry: dict[str, Any] = {"model": models[spec.form], "exact": spec.exact, "status": "ok"}
        missing = spec.missing()
        if missing:
            entry["status"] = f"not installed here: {missing}"
        elif spec.form != "lowered":
            try:
                session = spec.load(tmp_dir / models[spec.form], 1, {})
                session.run(random_feed(session, batch, input_shape))
            except Exception as exc:  # noqa: BLE001 - a runtime plugin's own errors; ONNX Runtime still runs it
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                entry["status"] = f"cannot run it: {first}"
        record[spec.name] = entry
    return models, record


def compile_model(onnx_path: str | Path, march: MarchProfile, opt: int, out_dir: str | Path,
                  input_spec: dict[str, Any], extra_manifest: dict[str, Any] | None = None,
                  measure: bool | None = None, name: str | None = None,
                  consumer: dict[str, Any] | None = None) -> Path:
    """Compile `onnx_path` for `march` at optimization level `opt` (0..3) into `out_dir`.

    opt 0..3 map to ONNX Runtime's DISABLE_ALL / BASIC / EXTENDED / ALL (opt 3 saves the
    EXTENDED graph and applies ALL at load time, recorded in the manifest). `input_spec` is
    recorded as given; an int batch in `input_spec["shape"][0]` sets the estimate's batch.
    `measure` times the compiled model on this host (default: when the march is not estimated,
    i.e. `host`). `extra_manifest` is stored under the manifest's "extra" key; `consumer` (what a
    user without hat needs to feed the model: preprocess, classes, output meanings) is merged
    into the manifest's top level. `name` (the task; default the file's stem) titles perf.html.
    Returns out_dir.
    Raises UsageError for a bad `opt`, a missing / non-ONNX input or an out_dir that is not an
    artifact; ArtifactError when ONNX Runtime cannot load or run the model.
    """
    level = opt_level_name(opt)
    src = resolve_model_path(onnx_path)
    load_onnx(src, external_data=False)
    out = Path(out_dir)
    saved_level = "ORT_ENABLE_EXTENDED" if level == "ORT_ENABLE_ALL" else level
    batch, input_shape = _batch_and_shape(input_spec)
    with building(out, MANIFEST) as tmp_dir:
        _write_optimized(src, saved_level, tmp_dir, march.quant.accumulator_bits)
        session = create_session(tmp_dir / MODEL, level, source=f"compiled {src}")
        try:
            session.run(None, random_feed(session, batch, input_shape))
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
            raise ArtifactError(f"{src}: the compiled model does not run ({exc})") from None
        inputs, outputs = _io(session)
        do_measure = (not march.estimated) if measure is None else measure
        source_ref = relative_source(src, out)
        perf, check = _perf_report(src, tmp_dir / MODEL, march, opt, batch, input_shape, do_measure, source_ref)
        atomic_write_json(tmp_dir / PERF, perf)
        atomic_write_text(tmp_dir / MARCH_PROFILE, march_toml(
            march, header=f"The march profile {src.name} was compiled for (hat {__version__})."))
        atomic_write_text(tmp_dir / PERF_HTML, render_perf_html(
            {**perf, "opt": opt}, title=f"{name or src.stem} on {march.name} ({march.chip}), opt {opt}"))
        notes = [OPT_3_NOTE] if level == "ORT_ENABLE_ALL" else []
        if march.estimated:
            notes.append(f"{march.name} cannot run here: the artifact runs on ONNX Runtime (CPU) and "
                         "its perf.json latency for the march is an estimate")
        models, runtime_record = _runtime_models(tmp_dir, src, batch, input_shape)
        signed_weights = exact_u8s8()
        if signed_weights:
            notes.append(SIGNED_WEIGHTS_NOTE)
        manifest = {
            "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION,
            "march": march.name, "chip": march.chip, "estimated": march.estimated, "opt": opt,
            "model": MODEL, "models": models, "runtimes": runtime_record, "march_profile": MARCH_PROFILE,
            "source": {"path": source_ref, "sha256": sha256_file(src)},
            "input_spec": input_spec, "inputs": inputs, "outputs": outputs,
            "session_options": {"graph_optimization_level": level,
                                "providers": ["CPUExecutionProvider"]},
            "session_graph_optimization_level": level,
            "saved_graph_optimization_level": saved_level,
            "check": check,
            "versions": _versions(),
            "notes": notes,
            "weights": "int8" if signed_weights else "uint8",
            **(consumer or {}),
            "extra": extra_manifest or {},
            "files": {p.name: sha256_file(p) for p in sorted(tmp_dir.iterdir()) if p.is_file()},
        }
        atomic_write_json(tmp_dir / MANIFEST, manifest)
    return out
