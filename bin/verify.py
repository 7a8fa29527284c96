"""`mbmerge verify DIR`: re-check a merged output folder and say what is wrong (engine/verify.py)."""
import sys
from pathlib import Path

import click

from ..engine.index import TensorIndex
from ..engine.verify import verify as verify_folder


@click.command("verify")
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--inputs", is_flag=True, help="Also check that the input files recorded in mbmerge.json "
              "still exist with the same size and mtime.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing when the folder verifies.")
def verify(folder, inputs, quiet):
    """Check DIR, a merged output: valid headers, sha256 as in mbmerge.json, finite tensors.

    Exit status: 0 verified, 1 problems found (one line each on stderr), 2 DIR unusable."""
    problems = verify_folder(folder, inputs=inputs)
    for p in problems:
        click.echo(f"mbmerge: verify: {p}", err=True)
    if problems:
        sys.exit(1)
    if not quiet:
        index = TensorIndex.from_folder(folder, "output")
        click.echo(f"{folder}: OK ({len(index.tensors)} tensors in {len(index.shards)} shards, checksums match)")
