"""The latency benchmark's list of published BPU models (bench/bpu_catalogue.py): every published
(chip, model) is either rebuilt or says why not, and the HAT model zoo's Journey 5 latencies are
read from their markdown table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bpu_catalogue as cat  # noqa: E402


def test_the_hat_model_zoo_latencies_are_read_from_their_table(tmp_path):
    md = tmp_path / "zoo.md"
    md.write_text("# figures\n\n| model | float | BPU latency ms |\n|---|---|---|\n"
                  "| MobileNetV1 | 74.1 | 0.77 |\n| ResNet50 | 77.4 | (not given) |\n| ResNet18 | 72.0 | 1.53 |\n"
                  "A sentence with | a bar | 3 |\n")
    rows = cat.load_hat_zoo_rows(md)
    assert [(r["model"], r["latency_ms"]) for r in rows] == [("MobileNetV1", 0.77), ("ResNet18", 1.53)]
    assert all(r["march"] == "bayes" and (r["input_h"], r["input_w"]) == (224, 224) for r in rows)
    assert cat.load_hat_zoo_rows(tmp_path / "absent.md") == []


def test_every_published_model_is_rebuilt_or_says_why_not():
    if not cat.DEFAULT_CSV.is_file():
        pytest.skip(f"{cat.DEFAULT_CSV} not present (the published BPU figures in ../shared/data)")
    counts = cat.coverage(cat.DEFAULT_CSV)  # raises naming any model neither rebuilt nor explained
    assert counts["rows_rebuilt"] > 100
    assert set(counts["per_march"]) >= {"bayes-e", "bernoulli2", "nash-e"}
    assert all(reason.strip() for reason in cat.NOT_REBUILT.values())
