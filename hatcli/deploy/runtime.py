"""Load a compiled artifact (or a bare .onnx file) and run it with a runtime (ONNX Runtime by default).

`load_artifact` verifies the sha256 of every file the artifact's `manifest.json` lists before it
opens the model, so a tampered or half-copied artifact is refused (ArtifactError, exit 1). The
runtime is any registered `RuntimeSpec` (`--runtime NAME`); the model it opens is the artifact
model of its form (`manifest["models"]`, see `hatcli.runtime_spec.ModelForm`). ONNX Runtime,
hat's own runtime (`ONNXRUNTIME`), reads the lowered integer graph, which the tests prove equal
to the integer program.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hatcli.errors import ArtifactError, UsageError
from hatcli.runtime_spec import RuntimeSession, RuntimeSpec, TensorInfo

MANIFEST = "manifest.json"
MODEL = "model.onnx"
QDQ_MODEL = "model_qdq.onnx"
DEFAULT_RUNTIME = "onnxruntime"
LEVEL_NAMES = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
       "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(int32)": np.int32,
       "tensor(int64)": np.int64}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def opt_level_name(opt: int) -> str:
    """Map `--opt` 0..3 to ONNX Runtime's level name; UsageError for anything else."""
    if isinstance(opt, bool) or not isinstance(opt, int) or not 0 <= opt <= 3:
        raise UsageError(f"--opt must be 0..3 (got {opt})")
    return LEVEL_NAMES[opt]


def create_session(model: str | Path | bytes, level: str | int = "ORT_ENABLE_ALL",
                   threads: int | None = None, optimized_path: Path | None = None,
                   source: str | None = None, config: dict[str, str] | None = None) -> Any:
    """Create a CPU `onnxruntime.InferenceSession` at optimization `level` (name or 0..3).

    `optimized_path` makes ONNX Runtime write the optimized graph there; `config` adds session
    config entries (`SessionOptions.add_session_config_entry`). Raises ArtifactError
    naming `source` (or the model path) when ONNX Runtime cannot load the model.
    """
    import onnxruntime as ort

    name = level if isinstance(level, str) else LEVEL_NAMES[level]
    if name not in LEVEL_NAMES:
        raise ArtifactError(f"unknown graph optimization level `{name}` (expected one of "
                            f"{', '.join(LEVEL_NAMES)})")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, name)
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    target = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(target, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / ... types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{source or model}: ONNX Runtime cannot load it ({first})") from None


class OrtSession:
    """An ONNX Runtime session as a `RuntimeSession`; `ort` is the InferenceSession itself."""

    def __init__(self, session: Any) -> None:
        self.ort = session
        self.inputs = [TensorInfo(i.name, tuple(d if isinstance(d, int) else str(d) for d in i.shape),
                                  np.dtype(NP_DTYPES.get(i.type, np.float32)).name) for i in session.get_inputs()]
        self.outputs = [o.name for o in session.get_outputs()]

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; the outputs in `outputs` order."""
        return list(self.ort.run(None, dict(feed)))


def load_onnxruntime(model_path: Path, threads: int | None, options: Mapping[str, Any]) -> OrtSession:
    """Open `model_path` with ONNX Runtime on the CPU at the graph optimization level the manifest's
    session options name (default ORT_ENABLE_ALL)."""
    level = options.get("graph_optimization_level", "ORT_ENABLE_ALL")
    return OrtSession(create_session(model_path, level, threads=threads, source=str(model_path)))


def _onnxruntime_missing() -> str:
    import importlib.util

    return "" if importlib.util.find_spec("onnxruntime") else "pip install onnxruntime"


ONNXRUNTIME = RuntimeSpec(
    name=DEFAULT_RUNTIME, form="lowered", load=load_onnxruntime, missing=_onnxruntime_missing, exact=True,
    description="ONNX Runtime, CPU execution provider: runs hat's lowered integer graph (QLinearConv, "
                "ConvInteger, MatMulInteger, table look-ups), equal to int_infer by hat's tests")
"""hat's own runtime, registered by the built-in plugin."""


def runtime_spec(name: str | None) -> RuntimeSpec:
    """The registered runtime `name` (default ONNX Runtime), usable here: UsageError naming the
    registered ones for an unknown name, and saying what to install for one that is missing."""
    from hatcli.plugins import runtimes

    spec = runtimes().get(name or DEFAULT_RUNTIME)
    missing = spec.missing()
    if missing:
        raise UsageError(f"runtime `{spec.name}` is not installed here: {missing}")
    return spec


def runtime_names() -> list[str]:
    """The registered runtimes' names, ONNX Runtime (the default) first, then by name."""
    from hatcli.plugins import runtimes

    return sorted(runtimes().names(), key=lambda name: (name != DEFAULT_RUNTIME, name))


def runtime_exactness() -> list[dict[str, Any]]:
    """Per registered runtime: whether it is installed here and whether its int8 arithmetic is
    int_infer's (`exact`), with one line that says what that means for the artifact."""
    from hatcli.plugins import runtimes

    rows = []
    for name in runtime_names():
        spec = runtimes().get(name)
        missing = spec.missing()
        note = ("computes the integer program's integers (artifact == int_infer, proven by hat's tests)" if spec.exact
                else f"its own int8 lowering: not bit-exact with int_infer; `hat eval RECIPE --stage deploy --runtime "
                     f"{name} --compare int_infer` measures how far")
        rows.append({"name": name, "exact": spec.exact, "installed": not missing, "note": note,
                     **({"install": missing} if missing else {})})
    return rows


def _inside(root: Path, path: Path) -> bool:
    """Whether `path`, symlinks followed, lies inside the folder `root`."""
    return path.resolve().is_relative_to(root.resolve())


def verify_files(root: Path, files: Mapping[str, str]) -> None:
    """Check the sha256 of every `files` entry (relative to `root`); ArtifactError on mismatch
    or on an entry that leads outside `root` (`..`, an absolute path, a symlink out)."""
    for rel, expected in files.items():
        path = root / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not _inside(root, path):
            raise ArtifactError(f"{root / MANIFEST}: file entry `{rel}` points outside the artifact")
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in {root / MANIFEST} but missing")
        if sha256_file(path) != expected:
            raise ArtifactError(f"{path}: sha256 does not match {root / MANIFEST} "
                                "(the artifact was modified or is incomplete)")


def manifest_model(root: Path, manifest: Mapping[str, Any], form: str = "lowered") -> Path:
    """The model file of `form` the manifest names (`models[form]`, for the lowered form also
    `model`, default model.onnx): it must be the plain name of one of the checksummed `files`,
    inside `root`; else ArtifactError naming the key. An artifact from before forms were recorded
    has no `models`: only its lowered `model`."""
    if form == "lowered":
        name, key = manifest.get("model", MODEL), f"{root / MANIFEST}: key `model`"
    else:
        models = manifest.get("models")
        name = models.get(form) if isinstance(models, Mapping) else None
        key = f"{root / MANIFEST}: key `models.{form}`"
    if name is None:
        raise ArtifactError(f"{root}: the artifact has no `{form}` model (it was compiled before a runtime that "
                            "reads it was installed, or by an older hat); compile it again")
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name \
            or "\\" in name:
        raise ArtifactError(f"{key} is {name!r}, not the plain file name of a model in the artifact "
                            f"folder {root}; recompile the artifact")
    if name not in manifest.get("files", {}):
        raise ArtifactError(f"{key} names `{name}`, which is not one of the checksummed files listed "
                            f"under `files` in the artifact folder {root}; recompile the artifact")
    return root / name


@dataclass
class Artifact:
    """A loaded model ready to run: the runtime's session plus the artifact's manifest (if any)."""

    path: Path
    """The artifact directory, or the .onnx file when there is no manifest."""
    model_path: Path
    manifest: dict[str, Any] | None
    session: RuntimeSession
    input_spec: dict[str, Any] = field(default_factory=dict)
    """The input spec recorded at compile/export time, or one derived from the model."""
    runtime: str = DEFAULT_RUNTIME
    """The registered runtime that runs it."""

    @property
    def input_names(self) -> list[str]:
        """Names of the model inputs."""
        return [i.name for i in self.session.inputs]

    @property
    def output_names(self) -> list[str]:
        """Names of the model outputs."""
        return list(self.session.outputs)

    def _prepare(self, name: str, array: np.ndarray) -> np.ndarray:
        info = next(i for i in self.session.inputs if i.name == name)
        array = np.asarray(array)
        if array.ndim != len(info.shape):
            raise UsageError(f"input `{name}` needs {len(info.shape)} dims {list(info.shape)}, "
                             f"got shape {list(array.shape)}")
        for want, got in zip(info.shape, array.shape):
            if isinstance(want, int) and want != got:
                raise UsageError(f"input `{name}` needs shape {list(info.shape)}, got {list(array.shape)}")
        return np.ascontiguousarray(array, dtype=np.dtype(info.dtype))

    def run(self, batch: np.ndarray | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; `batch` is an array for single-input models, else a name -> array map."""
        if isinstance(batch, Mapping):
            feed = {k: self._prepare(k, v) for k, v in batch.items()}
        else:
            if len(self.input_names) != 1:
                raise UsageError(f"model has inputs {self.input_names}: pass a dict of arrays")
            feed = {self.input_names[0]: self._prepare(self.input_names[0], batch)}
        return self.session.run(feed)


def _derived_spec(session: RuntimeSession) -> dict[str, Any]:
    inp = session.inputs[0]
    dims = [d if isinstance(d, int) else "N" for d in inp.shape]
    return {"name": inp.name, "shape": dims, "dtype": "float" if inp.dtype == "float32" else inp.dtype}


def read_manifest(path: Path) -> dict[str, Any]:
    """The JSON object in a manifest file; ArtifactError naming it when unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: manifest is not a JSON object")
    return data


def load_artifact(artifact: str | Path, threads: int | None = None, runtime: str | None = None) -> Artifact:
    """Load a compiled artifact directory, an exported model dir, or a bare .onnx file, to run on
    the registered runtime `runtime` (default ONNX Runtime).

    With a `manifest.json` (in the directory, or next to the .onnx file and listing it) every
    listed file's sha256 is verified first; a directory's model is the one of the runtime's form,
    opened with the manifest's `session_options`. Raises ArtifactError for a missing, corrupt or
    tampered artifact or one without a model of that form, UsageError for a runtime that is not
    registered or not installed.
    """
    spec = runtime_spec(runtime)
    path = Path(artifact)
    if path.is_dir():
        root, manifest_path = path, path / MANIFEST
        if not manifest_path.is_file():
            raise ArtifactError(f"{path}: no {MANIFEST} (not a compiled artifact)")
    elif path.is_file():
        root, manifest_path = path.parent, path.parent / MANIFEST
    else:
        raise ArtifactError(f"{path}: no such artifact or ONNX file")
    manifest: dict[str, Any] | None = None
    if manifest_path.is_file():
        candidate = read_manifest(manifest_path)
        files = candidate.get("files") or {}
        if path.is_dir() or path.name in files:
            manifest = candidate
            if not isinstance(files, dict) or not files:
                raise ArtifactError(f"{manifest_path}: lists no files to verify")
            verify_files(root, files)
    if path.is_file():
        model_path = path
    elif manifest is not None:
        model_path = manifest_model(root, manifest, spec.form)
    else:
        model_path = root / MODEL
    if not model_path.is_file():
        raise ArtifactError(f"{model_path}: model file missing")
    options = ((manifest or {}).get("session_options") or {}) if spec.form == "lowered" else {}
    if (manifest or {}).get("weights") == "int8" and spec.form == "lowered":
        from hatcli.deploy.cpu import exact_u8s8

        if not exact_u8s8():
            warnings.warn(f"{path}: compiled with int8 weights for CPUs with VNNI; this CPU's U8S8 kernels can "
                          "saturate, so its outputs may differ from int_infer in rare cases (compile it here "
                          "for an exact artifact)", stacklevel=2)
    session = spec.load(model_path, threads, options)
    input_spec = (manifest or {}).get("input_spec") or (manifest or {}).get("input") or _derived_spec(session)
    return Artifact(path=path, model_path=model_path, manifest=manifest, session=session, input_spec=input_spec,
                    runtime=spec.name)
