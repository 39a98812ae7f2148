"""The one place that knows the stages float -> calibration -> qat -> int_infer (and the export
and compiled artifact made from them): their names and which one each is built on, their folders
under `runs/<task>/`, which checkpoint a stage means, their fingerprints, their `stage.json`
records, whether each is up to date or can be resumed, and which are unfinished.

It reads recipes and files only: training a stage, converting its model and building artifacts
are the engine's, quant's and deploy's, combined in `hatcli.workflows`. Everything below is
importable from `hatcli.stages` itself.
"""

from hatcli.stages.fingerprints import (
    compile_fingerprint,
    export_fingerprint,
    file_sha256,
    float_fingerprint,
    imported_float,
    stage_fingerprint,
)
from hatcli.stages.folders import (
    checkpoint_path,
    default_compile_dir,
    default_export_dir,
    export_source,
    stage_dir,
)
from hatcli.stages.names import EVAL_STAGES, EXPORTABLE_STAGES, TRAIN_STAGES, UPSTREAM, quant_source
from hatcli.stages.records import (
    artifact_up_to_date,
    can_resume,
    export_up_to_date,
    is_up_to_date,
    read_stage_record,
    stage_record,
    write_stage_record,
)
from hatcli.stages.unfinished import unfinished, unfinished_labels, warn_unfinished

__all__ = [
    "EVAL_STAGES", "EXPORTABLE_STAGES", "TRAIN_STAGES", "UPSTREAM", "artifact_up_to_date", "can_resume",
    "checkpoint_path", "compile_fingerprint", "default_compile_dir", "default_export_dir", "export_fingerprint",
    "export_source", "export_up_to_date", "file_sha256", "float_fingerprint", "imported_float", "is_up_to_date",
    "quant_source", "read_stage_record", "stage_dir",
    "stage_fingerprint", "stage_record", "unfinished", "unfinished_labels", "warn_unfinished",
    "write_stage_record",
]
