"""Stages stopped before their last epoch (Ctrl-C, `kill -9`), and the stages built on them.

A training stage keeps `stage.json` at ``"finished": false`` with its epoch count while it runs;
a stage or command that goes on from it warns, naming it and how to finish it, and the new
stage's record lists it under `built_on_unfinished`.
"""

from __future__ import annotations

from typing import Any

from hatcli.errors import warn
from hatcli.recipe import LoadedRecipe
from hatcli.stages.names import UPSTREAM
from hatcli.stages.records import can_resume, read_stage_record


def _unfinished_chain(lr: LoadedRecipe, stage: str) -> list[tuple[str, dict[str, Any]]]:
    """`stage` and the stages it is built on whose record says unfinished or built on unfinished."""
    found = []
    current: str | None = stage
    while current is not None:
        record = read_stage_record(lr, current) or {}
        if record.get("finished") is False or record.get("built_on_unfinished"):
            found.append((current, record))
        current = UPSTREAM.get(current)
    return found


def unfinished(lr: LoadedRecipe, stage: str) -> list[str]:
    """What is unfinished in `stage` and the stages it is built on, one sentence each, naming the
    stage, how far it got and the command that finishes it; empty when all finished."""
    sentences = []
    for name, record in _unfinished_chain(lr, stage):
        command = f"hat train {lr.path} --stage {name}"
        if record.get("finished") is False:
            how = (f"finish it with `{command} --resume`" if can_resume(lr, name)
                   else f"train it again with `{command}`")
            sentences.append(f"the {name} stage is unfinished (epoch {record.get('epochs')}/"
                             f"{record.get('epochs_planned')}); {how}")
        else:
            sentences.append(f"the {name} stage was built on an unfinished stage "
                             f"({', '.join(record['built_on_unfinished'])}); build it again with `{command}`")
    return sentences


def unfinished_labels(lr: LoadedRecipe, stage: str) -> list[str]:
    """Short names of the unfinished stages under `stage`, e.g. ``float at epoch 2/14``, for a record."""
    labels: list[str] = []
    for name, record in _unfinished_chain(lr, stage):
        if record.get("finished") is False:
            labels.append(f"{name} at epoch {record.get('epochs')}/{record.get('epochs_planned')}")
        labels += [label for label in record.get("built_on_unfinished") or [] if label not in labels]
    return labels


def warn_unfinished(lr: LoadedRecipe, stage: str, use: str) -> list[str]:
    """Warn (`hatcli.errors.warn`) that `use` goes on from `stage` though it or a stage it is
    built on is unfinished; returns their short names, for the new stage's record."""
    for sentence in unfinished(lr, stage):
        warn(f"{use} uses an unfinished stage: {sentence}")
    return unfinished_labels(lr, stage)
