"""`hat march list|show NAME`: the march profiles, and one march's quantization rules and op limits."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from hatcli.commands._options import JsonOpt, print_json
from hatcli.progress import stdout
from hatcli.quant.march import MarchProfile, list_marches, load_march

EXAMPLES = """
Examples:

  hat march list

  hat march list --json

  hat march show nash_e      # rules, ops and their limits

  hat march show bayes --json
"""

app = typer.Typer(help="Show the march profiles: every march, or one march's rules and op limits.",
                  no_args_is_help=True, epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})


@app.command("list", epilog=EXAMPLES)
def list_command(json_out: JsonOpt = False) -> None:
    """Show every march profile: chip, int8 TOPS, activation dtypes, float output, latency source."""
    print_march_list(json_out)


@app.command("show", epilog=EXAMPLES)
def show_command(name: Annotated[str, typer.Argument(help="A march from `hat march list`, or a profile .toml.",
                                                     metavar="NAME", show_default=False)],
                 json_out: JsonOpt = False) -> None:
    """Show one march's quantization rules and its supported ops with their limits."""
    print_march(load_march(name), json_out)


def print_march_list(json_out: bool) -> None:
    """Print the table of every march profile (or, with `json_out`, the list of profiles as JSON)."""
    profiles = list_marches()
    if json_out:
        print_json([p.model_dump() for p in profiles])
        return
    table = Table("march", "chip", "int8 TOPS", "activations", "float output", "latency")
    for column in table.columns:  # names and headers stay whole; the chip names wrap
        column.no_wrap = column.header != "chip"
        column.min_width = len(str(column.header))
    for p in profiles:
        table.add_row(p.name, p.chip, f"{p.int8_tops:g}", "/".join(p.quant.activation_dtypes),
                      "yes" if p.quant.float_output else "no: int32",
                      "estimated" if p.estimated else "measured")
    stdout.print(table)


def print_march(profile: MarchProfile, json_out: bool) -> None:
    """Print one march's quantization rules and its supported ops with their limits (or the profile as JSON)."""
    if json_out:
        print_json(profile.model_dump())
        return
    rules = profile.quant
    stdout.print(f"[bold]{profile.name}[/] ({profile.chip}): {profile.int8_tops:g} int8 TOPS, latency "
                 f"{'estimated' if profile.estimated else 'measured'}")
    stdout.print(f"  activations {'/'.join(rules.activation_dtypes)} per tensor, zero point 0; weights "
                 f"{rules.weight_dtype} symmetric per output channel; float output: "
                 f"{'yes' if rules.float_output else 'no (the last conv gives int32, then dequantized)'}; "
                 f"unsigned grid after ReLU: {'yes' if rules.unsigned_after_relu else 'no'}")
    table = Table("op", "max kernel", "max stride", "group channels multiple of", "note")
    for name, rule in sorted(profile.ops.items()):
        table.add_row(name, *(str(v) if v is not None else "-" for v in
                              (rule.max_kernel, rule.max_stride, rule.group_channel_multiple)), rule.note)
    stdout.print(table)
    stdout.print(f"  fused after conv / matmul / add: {', '.join(profile.fusible_activations)}")
