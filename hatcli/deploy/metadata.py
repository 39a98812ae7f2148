"""JSON records hat keeps in an ONNX model's metadata (`metadata_props`), by key: what the export
knew and the artifact alone cannot show (saturated biases, low-bit layers)."""

from __future__ import annotations

import json
from typing import Any

import onnx


def write_records(path: str, key: str, records: list[Any]) -> None:
    """Store `records` (objects with `to_dict()`) under `key` in the ONNX model at `path`; nothing
    when there are none."""
    if not records:
        return
    model = onnx.load(path)
    entry = model.metadata_props.add()
    entry.key, entry.value = key, json.dumps([r.to_dict() for r in records])
    onnx.save(model, path)


def read_records(model: onnx.ModelProto, key: str) -> list[dict[str, Any]] | None:
    """The records stored under `key` as dicts; None when the model has none."""
    value = next((p.value for p in model.metadata_props if p.key == key), None)
    return None if value is None else json.loads(value)
