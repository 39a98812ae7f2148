"""Orchestration: the work that combines the layers below it into what a command does.

Training a stage (`training`: engine loops over quant's prepared graphs), loading the model a
stage means (`stage_models`), exporting a stage (`exporting`: quant's conversion, deploy's
files), comparing stages (`compare`) and `hat run`'s whole chain (`pipeline`). Only commands (and
notebooks) import it; engine, quant and deploy never do, and `hatcli.stages` says what the stages
are.
"""
