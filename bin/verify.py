"""`mbmerge verify DIR`: re-check a merged output folder and say what is wrong (engine/output/verify.py)."""
import sys
from pathlib import Path

import click

from ..engine.inputs.index import TensorIndex
from ..engine.output.verify import check


@click.command("verify")
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--inputs", is_flag=True, help="Also check the input files recorded in mbmerge.json: present, "
              "same size and safetensors header; one whose only change is its time passes with a note (its "
              "tensor data are not compared, and a changed byte with its time set back goes unseen).")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing when the folder verifies.")
def verify(folder, inputs, quiet):
    """Check DIR, a merged output: valid headers, sha256 as in mbmerge.json, finite tensors.

    Exit status: 0 verified, 1 problems found (one line each on stderr), 2 DIR unusable."""
    report = check(folder, inputs=inputs)
    for p in report.problems:
        click.echo(f"mbmerge: verify: {p}", err=True)
    for note in [] if quiet else report.notes:
        click.echo(f"note: {note}")
    if report.problems:
        sys.exit(1)
    if not quiet:
        index = TensorIndex.from_folder(folder, "output")
        click.echo(f"{folder}: OK ({len(index.tensors)} tensors in {len(index.shards)} shards, checksums match)")
