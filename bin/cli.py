"""The `mbmerge` command. `mbmerge --method ...` (no subcommand) is `mbmerge merge --method ...`."""
import contextlib
import difflib
import errno
import sys

import click

from .. import methods
from ..common.errors import MbmergeError
from ..engine.recipe import load_recipe
from ..kernels import BACKENDS as kernel_backends
from ..stats.prepare import ZOO_SIZES, merge as merge_models
from .bench import bench
from .bench_kernels import bench_kernels
from .method_docs import list_methods
from .options import listed as _listed, method_param_options
from .stats import data_kwargs, data_options, stats
from .tune import tune
from .demo import demo
from .evaluate import evaluate
from .verify import verify
from .zoo import zoo


class DefaultMerge(click.Group):
    """A group whose default subcommand is `merge`: arguments starting with an option are merge's.
    A first word that is neither a command nor an option is a mistyped command (merge takes no
    positional arguments), not a merge missing its --out."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            if not args[0].startswith("-"):
                raise click.UsageError(self._no_command(args[0]), ctx)
            args = ["merge", *args]
        return super().parse_args(ctx, args)

    def _no_command(self, word: str) -> str:
        """The error for a first word that names no command: the nearest command, else them all."""
        if word.endswith((".yml", ".yaml")):
            return f"no command '{word}'; for a mergekit recipe, pass --config {word}"
        close = difflib.get_close_matches(word, list(self.commands), n=1)
        if close:
            return f"no command '{word}'; did you mean '{close[0]}'?"
        return f"no command '{word}' (commands: {', '.join(sorted(self.commands))}; default: merge --method ...)"


@click.group(cls=DefaultMerge, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mbmerge")
def cli():
    """Streaming merges of fine-tuned LLMs. Default command: merge."""


@cli.command("merge")
@click.option("--method", "-m", help="Merge method (see `mbmerge methods`).")
@click.option("--experts", "-e", help="Comma-separated folders, hub ids or MergeBench domains.")
@click.option("--out", "-o", required=True, type=click.Path(), help="Output folder.")
@click.option("--base", "-b", help="Base model: folder or hub id. Default: the built-in family.")
@click.option("--config", "-c", type=click.Path(dir_okay=False), help="A mergekit YAML recipe instead of "
              "--method/--base/--experts and method parameters.")
@click.option("--protocol", type=click.Choice(sorted(methods.PROTOCOLS)),
              help="Set a benchmark's choices at once (mergebench: model-wide ranks, embeddings kept, "
                   "TIES sum, DARE 1/p).")
@method_param_options
@click.option("--keep-base", help="Regex of tensor names copied from the base, e.g. 'embed_tokens|lm_head' "
              "('' merges all; default: the method's).")
@click.option("--dtype", help="Output dtype of float tensors (default: as stored).")
@click.option("--memory-budget", default="2GB", show_default=True, help="Bound on working memory (with a GPU: device memory).")
@click.option("--allow-nonfinite", is_flag=True, help="Merge inputs holding NaN/Inf instead of refusing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue an interrupted merge of the same recipe and inputs into OUT.")
@click.option("--device", default="auto", show_default=True,
              help="Where to compute: cpu, cuda, cuda:N, or auto (CUDA when present).")
@click.option("--kernels", type=click.Choice(kernel_backends), envvar="MBMERGE_KERNELS",
              help="Kernel backend: auto (Triton on CUDA, else torch), torch or triton [default: $MBMERGE_KERNELS, "
                   "else auto].")
@click.option("--compile/--no-compile", "compiled", default=None,
              help="Compiled CPU loops [default: on, unless MBMERGE_COMPILE=0].")
@click.option("--zoo-size", type=click.Choice(ZOO_SIZES), help="With domain experts and no --base: the mini "
              "zoo's size [default: $MBMERGE_ZOO_SIZE, else full].")
@click.option("--stats", "stats_dirs", help="fisher, regmean, localize_stitch_trained: one statistics folder per "
              "expert, comma-separated (from `mbmerge stats`).")
@click.option("--data", help="... or one data source per expert to collect them from (cached); default for "
              "domain experts: each one's own domain.")
@data_options
@click.option("--override", "overrides", nargs=2, multiple=True, metavar="REGEX 'K=V ...'",
              help="For tensors matching REGEX (the first --override that does), these parameter values, "
                   "e.g. --override '\\.layers\\.3\\.' 'scale=0 weights=1,0'. Repeatable.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def merge(method, experts, out, base, config, protocol, keep_base, dtype, memory_budget, allow_nonfinite,
          overwrite, resume, device, kernels, compiled, zoo_size, stats_dirs, data, split, data_format, max_length,
          data_seed, stats_batch_size, stats_dtype, overrides, quiet, **params):
    """Merge EXPERTS (and a base) into OUT with METHOD, or as a mergekit recipe says (--config)."""
    given = {k: v for k, v in params.items() if v is not None}
    if config:
        clash = [f"--{k}" for k, v in [("method", method), ("experts", experts), ("base", base),
                                       ("protocol", protocol), ("dtype", dtype), *given.items()] if v is not None]
        if clash:
            raise click.UsageError(f"--config {config} sets the recipe; do not also pass {', '.join(clash)}")
        recipe = load_recipe(config)
        method, base, dtype, experts, given = (recipe["method"], recipe["base"], recipe["dtype"],
                                               recipe["experts"], recipe["params"])
    else:
        for name, value in [("--method", method), ("--experts", experts)]:
            if value is None:
                raise click.UsageError(f"Missing option '{name}' (or pass --config recipe.yml)")
        experts = _listed(experts) or []
    with _resumable():
        path = merge_models(method, experts=experts, out=out, base=base, keep_base=keep_base, dtype=dtype,
                            memory_budget=memory_budget, allow_nonfinite=allow_nonfinite, overwrite=overwrite,
                            progress=not quiet, protocol=protocol, resume=resume, device=device, kernels=kernels,
                            compile=compiled, zoo_size=zoo_size, stats_folders=_listed(stats_dirs),
                            data=_listed(data), overrides=[_override(*o) for o in overrides],
                            data_options=data_kwargs(split, data_format, max_length, data_seed, stats_batch_size,
                                                     stats_dtype), **given)
    if not quiet:
        click.echo(f"merged model written to {path}")


class Interrupted(Exception):
    """Ctrl-C during a merge: its partial folder and journal stay for the same command to resume."""


@contextlib.contextmanager
def _resumable():
    try:
        yield
    except KeyboardInterrupt:   # click would turn it into a plain Abort
        raise Interrupted() from None


def _override(pattern: str, values: str) -> tuple[str, dict]:
    """('REGEX', 'k=v k=v') -> (REGEX, {k: v}); values stay strings, coerced with the method's params."""
    pairs = [item.partition("=") for item in values.split()]
    if not pairs or any(not k or not sep for k, sep, _ in pairs):
        raise click.UsageError(f"--override {pattern!r} {values!r}: give the values as 'name=value name=value'")
    return pattern, {k.replace("-", "_"): v for k, _, v in pairs}


USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


def _fail(message: str, code: int = 2):
    click.echo(f"mbmerge: error: {' '.join(message.splitlines())}", err=True)
    sys.exit(code)


cli.add_command(bench)
cli.add_command(bench_kernels)
cli.add_command(list_methods)
cli.add_command(verify)
cli.add_command(evaluate)
cli.add_command(zoo)
cli.add_command(demo)
cli.add_command(stats)
cli.add_command(tune)


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
    except Interrupted:
        click.echo("mbmerge: interrupted; run the same command again to resume the merge where it stopped", err=True)
        sys.exit(130)
    except click.exceptions.Abort:
        click.echo("mbmerge: interrupted", err=True)
        sys.exit(130)
    except MbmergeError as e:
        _fail(str(e))
    except OSError as e:  # disk full, no permission: the environment, not a bug
        if e.errno not in USER_ERRNOS:
            raise
        _fail(f"{e.strerror}: {e.filename}" if e.filename else str(e))
    except KeyboardInterrupt:
        click.echo("mbmerge: interrupted", err=True)
        sys.exit(130)
