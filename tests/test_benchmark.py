"""`hat benchmark RECIPE`: one row per runtime and precision (torch eager fp32, then each registered
runtime's fp32 and int8), each with its status, file size, accuracy, agreement with int_infer and
latency, timed in turns; a runtime that is not installed or cannot run keeps its row and says why;
`--json` prints the same and runs/<task>/benchmark/benchmark.json keeps it.

Also the timing helpers it stands on: sides timed in interleaved turns, and the share of the CPU
other processes used meanwhile (what flags a busy machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hatcli.deploy.timing import OtherLoad, time_in_turns
from hatcli.errors import ArtifactError
from hatcli.plugins import runtimes
from hatcli.runtime_spec import RuntimeSpec

FAST = ("--rounds", "1", "--runs", "2", "--warmup", "1", "--images", "32")


@pytest.fixture
def extra_runtime():
    """`add(spec)` registers a runtime for one test."""
    registry, added = runtimes(), []

    def add(spec: RuntimeSpec) -> None:
        registry.register(spec.name, spec, owner="test")
        added.append(spec.name)

    yield add
    for name in added:
        registry.unregister(name)


def _refuse(path: Path, threads: object, options: object) -> None:
    raise ArtifactError(f"{path}: this runtime cannot load it (test)")


def test_every_runtime_and_precision_gets_a_row_with_what_was_measured(hat, tiny_recipe: Path, extra_runtime) -> None:
    extra_runtime(RuntimeSpec(name="zz_absent", description="not here", form="qdq", load=_refuse,
                              missing=lambda: "pip install zz-runtime"))
    extra_runtime(RuntimeSpec(name="zz_broken", description="cannot load", form="lowered", load=_refuse))
    result = hat("benchmark", tiny_recipe, *FAST, "--json")
    assert result.code == 0, result.err
    report = result.json()
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows)[:3] == ["torch fp32", "onnxruntime fp32", "onnxruntime int8"]
    for name in ("torch fp32", "onnxruntime fp32", "onnxruntime int8"):
        row = rows[name]
        assert row["status"] == "ok" and row["size_mb"] > 0 and 0 <= row["metrics"]["top1"] <= 100
        assert row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"] and row["fps"] > 0
        assert row["agreement"]["images"] == 32 == report["images"]
    # the default runtime computes exactly what the integer program computes
    assert rows["onnxruntime int8"]["agreement"]["top1_agreement"] == 100
    assert rows["onnxruntime int8"]["agreement"]["max_diff_steps"] == 0
    assert rows["onnxruntime int8"]["file"].endswith("model.onnx")
    assert rows["zz_absent int8"]["status"] == "not installed: pip install zz-runtime"
    assert rows["zz_absent fp32"]["median_ms"] is None
    assert rows["zz_broken int8"]["status"].startswith("failed: ") and "cannot load it" in rows["zz_broken int8"]["status"]
    assert isinstance(report["machine_busy"], bool) and report["threads"] >= 1 and report["cpu"]
    kept = json.loads((tiny_recipe.parent / "runs" / "tiny" / "benchmark" / "benchmark.json").read_text())
    assert [row["name"] for row in kept["rows"]] == [row["name"] for row in report["rows"]]


def test_the_table_names_each_row_and_what_is_missing(hat, tiny_recipe: Path, extra_runtime) -> None:
    extra_runtime(RuntimeSpec(name="zz_absent", description="not here", form="qdq", load=_refuse,
                              missing=lambda: "pip install zz-runtime"))
    result = hat("benchmark", tiny_recipe, *FAST, "--threads", "1", "--batch", "2")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    header = next(line for line in lines if line.startswith("format"))
    assert header.split() == ["format", "status", "MB", "top1", "%", "same", "top-1", "%", "max", "steps",
                              "median", "ms", "p90", "ms", "FPS"]
    assert any(line.startswith("onnxruntime int8") and " ok " in line and "100.00" in line for line in lines)
    assert any(line.startswith("zz_absent int8") and "not installed" in line for line in lines)
    for text in ("zz_absent int8: not installed: pip install zz-runtime", "batch 2, 1 threads",
                 "32 validation images"):
        assert text in result.out


def test_bad_options_are_usage_errors(hat, tiny_recipe: Path) -> None:
    assert hat("benchmark", tiny_recipe, "--batch", "0").code == 2
    assert hat("benchmark", tiny_recipe / "nope.toml").code == 2


def test_sides_are_timed_in_interleaved_turns_after_their_warm_up() -> None:
    calls: list[str] = []
    seconds, cpu_use = time_in_turns({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                     rounds=2, runs=3, warmup=1, threads=1)
    assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert len(seconds["a"]) == len(seconds["b"]) == 6 and set(cpu_use) == {"a", "b"}


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs /proc/stat (Linux)")
def test_another_process_using_the_cpu_is_seen_as_such() -> None:
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.2)
        with OtherLoad() as load:
            time.sleep(1.0)  # this process does nothing: what is used is the spinner's
    finally:
        spinner.wait()
    # one spinning process is one CPU of the machine's: most of that is seen
    assert load.share is not None and load.share > 0.6 / (os.cpu_count() or 1)
