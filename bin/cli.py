"""The `mbmerge` command. `mbmerge --method ...` (no subcommand) is `mbmerge merge --method ...`."""
import errno
import sys

import click

from .. import methods
from ..engine import MbmergeError, merge as merge_models
from .bench import bench


class DefaultMerge(click.Group):
    """A group whose default subcommand is `merge`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["merge", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultMerge, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mbmerge")
def cli():
    """Streaming merges of fine-tuned LLMs. Default command: merge."""


@cli.command("merge")
@click.option("--method", "-m", required=True, help="Merge method (see `mbmerge methods`).")
@click.option("--experts", "-e", required=True, help="Comma-separated folders, hub ids or MergeBench domains.")
@click.option("--out", "-o", required=True, type=click.Path(), help="Output folder.")
@click.option("--base", "-b", help="Base model: folder or hub id. Default: the built-in family.")
@click.option("--weights", help="Per-expert weights w_i, e.g. 0.3,0.7.")
@click.option("--density", help="Fraction kept rho_i, one value or one per expert.")
@click.option("--scale", "--lambda", "scale", help="lambda, the scale on the merged delta.")
@click.option("--normalize/--no-normalize", default=None, help="Divide by the sum of weights.")
@click.option("--consensus", type=click.Choice(["sum", "count"]), help="TIES sign election.")
@click.option("--aggregate", type=click.Choice(["mean", "sum"]), help="TIES: mean or sum of agreeing deltas.")
@click.option("--rescale", type=click.Choice(["inverse", "l1", "none"]), help="DARE rescale of kept deltas.")
@click.option("--seed", help="Seed of DARE's keep masks.")
@click.option("--keep-base", help="Regex of tensor names copied from the base, e.g. 'embed_tokens|lm_head'.")
@click.option("--dtype", help="Output dtype of float tensors (default: as stored).")
@click.option("--memory-budget", default="2GB", show_default=True, help="Bound on working memory.")
@click.option("--allow-nonfinite", is_flag=True, help="Merge inputs holding NaN/Inf instead of refusing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def merge(method, experts, out, base, keep_base, dtype, memory_budget, allow_nonfinite, overwrite, quiet,
          **params):
    """Merge EXPERTS (and a base) into OUT with METHOD."""
    given = {k: v for k, v in params.items() if v is not None}
    path = merge_models(method, experts=[e.strip() for e in experts.split(",") if e.strip()], out=out,
                        base=base, keep_base=keep_base, dtype=dtype, memory_budget=memory_budget,
                        allow_nonfinite=allow_nonfinite, overwrite=overwrite, progress=not quiet, **given)
    if not quiet:
        click.echo(f"merged model written to {path}")


@cli.command("methods")
def list_methods():
    """List the merge methods and their parameters."""
    for m in methods.REGISTRY.values():
        click.echo(f"{m.name:16} {m.summary}  [trim: {m.trim}, elect: {m.elect}, "
                   f"base: {'required' if m.needs_base else 'not needed'}]  {m.paper}")
        for p in m.params:
            click.echo(f"    --{p.name:12} default {p.default!s:8} {p.help}")


USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def _fail(message: str, code: int = 2):
    click.echo(f"mbmerge: error: {' '.join(message.splitlines())}", err=True)
    sys.exit(code)


cli.add_command(bench)


def main():
    """Entry point: user errors become one line on stderr and a non-zero exit; bugs keep their traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as e:  # bare `mbmerge`: the help text
        e.show()
        sys.exit(e.exit_code)
    except click.ClickException as e:
        ctx = getattr(e, "ctx", None)
        _fail(e.format_message() + (f" (see '{ctx.command_path} --help')" if ctx else ""), e.exit_code)
    except click.exceptions.Abort:
        click.echo("mbmerge: aborted", err=True)
        sys.exit(130)
    except MbmergeError as e:
        _fail(str(e))
    except OSError as e:  # disk full, no permission: the environment, not a bug
        if e.errno not in USER_ERRNOS:
            raise
        _fail(f"{e.strerror}: {e.filename}" if e.filename else str(e))
    except KeyboardInterrupt:
        click.echo("mbmerge: interrupted; nothing was written", err=True)
        sys.exit(130)
