"""The `mbmerge` command. `mbmerge --method ...` (no subcommand) is `mbmerge merge --method ...`.

The other commands are imported when they run, and the method table imports no torch, so --help,
`mbmerge methods` and the errors a user can make on the command line answer in a fraction of a
second; torch comes in when a merge starts."""
import contextlib
import difflib
import errno
import gc
import importlib
import sys
from pathlib import Path

import click

from .. import methods
from ..common.errors import MbmergeError
from ..common.names import KERNEL_BACKENDS, ZOO_SIZES
from ..engine.flags import HOW, WHAT, flag_of
from .options import listed as _listed, method_param_options, spec_option
from .stats import data_kwargs, data_options

# command: (module of bin/, its click command, the one-line help --help lists without importing it)
COMMANDS = {
    "bench": ("bench", "bench", "Time mbmerge (and mergekit) end to end on a synthetic fixture shaped like a "
              "MergeBench base."),
    "bench-kernels": ("bench_kernels", "bench_kernels", "Effective bandwidth of the merge step alone (fused "
                      "kernels: Triton on a GPU, compiled C on the CPU)."),
    "demo": ("demo", "demo", "Merge the mini zoo's experts with every method, evaluate, and report."),
    "eval": ("eval", "evaluate", "Evaluate MODEL_DIR: per-domain scores, normalised performance vs the "
             "experts, forgetting vs the base."),
    "extract-lora": ("extract_lora", "extract_lora", "Extract a LoRA adapter (a PEFT folder) from a base and a "
                     "fine-tuned model, by truncated SVD."),
    "moe": ("moe", "moe", "Build a Mixture of Experts from dense experts (a mergekit-moe recipe, or domain names)."),
    "methods": ("method_docs", "list_methods", "List the merge methods and their parameters."),
    "stats": ("stats", "stats", "Collect one expert's statistics on its data (one model in memory at a time)."),
    "tokensurgeon": ("tokensurgeon", "tokensurgeon", "Give a model another model's tokenizer: shared tokens' rows "
                     "moved, new tokens' rows approximated (mergekit-tokensurgeon's options)."),
    "tune": ("tune", "tune", "Score candidate merges on validation data and write the best."),
    "verify": ("verify", "verify", "Check DIR, a merged output: valid headers, sha256 as in mbmerge.json, "
               "finite tensors."),
    "zoo": ("zoo", "zoo", "Train the mini zoo on CPU: a base, one expert per MergeBench domain and a "
            "multi-task model."),
}


class DefaultMerge(click.Group):
    """A group whose default subcommand is `merge`: arguments starting with an option are merge's.
    A first word that is neither a command nor an option is a mistyped command (merge takes no
    positional arguments), not a merge missing its --out. Commands other than merge are imported
    when they run (COMMANDS)."""

    def list_commands(self, ctx) -> list[str]:
        return sorted({*self.commands, *COMMANDS})

    def get_command(self, ctx, name: str):
        if name in COMMANDS and name not in self.commands:
            module, attribute, _ = COMMANDS[name]
            with _imports_frozen():
                self.add_command(getattr(importlib.import_module(f".{module}", __package__), attribute), name)
        return self.commands.get(name)

    def format_commands(self, ctx, formatter) -> None:
        rows = [(name, COMMANDS[name][2] if name in COMMANDS else self.commands[name].get_short_help_str(80))
                for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def parse_args(self, ctx, args):
        if args and args[0] not in self.list_commands(ctx) and args[0] not in ("--help", "-h", "--version"):
            if not args[0].startswith("-"):
                raise click.UsageError(self._no_command(args[0], ctx), ctx)
            args = ["merge", *args]
        return super().parse_args(ctx, args)

    def _no_command(self, word: str, ctx) -> str:
        """The error for a first word that names no command: the nearest command, else them all."""
        if word.endswith((".yml", ".yaml")):
            return f"no command '{word}'; for a mergekit recipe, pass --config {word}"
        names = self.list_commands(ctx)
        close = difflib.get_close_matches(word, names, n=1)
        if close:
            return f"no command '{word}'; did you mean '{close[0]}'?"
        return f"no command '{word}' (commands: {', '.join(names)}; default: merge --method ...)"


def _version(ctx, _param, value) -> None:
    """--version: the version and which fast paths this installation has (imports torch to find out)."""
    if not value or ctx.resilient_parsing:
        return
    from ..common import VERSION
    from ..kernels import describe
    click.echo(f"mbmerge {VERSION} ({describe()})")
    ctx.exit()


@click.group(cls=DefaultMerge, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="Show the version, whether the compiled CPU loops are built and Triton is installed, and exit.")
def cli():
    """Streaming merges of fine-tuned LLMs. Default command: merge."""


@cli.command("merge")
@spec_option(WHAT["method"])
@spec_option(WHAT["experts"])
@click.option("--out", "-o", required=True, type=click.Path(), help="Output folder.")
@spec_option(WHAT["base"])
@click.option("--config", "-c", type=click.Path(dir_okay=False), help="A mergekit YAML recipe instead of "
              "--method/--base/--experts and method parameters.")
@click.option("--intermediate-dir", type=click.Path(file_okay=False), help="With a --config of several YAML "
              "documents (mergekit-multi's stages): the folder of the named stages [default: OUT.stages beside "
              "OUT; OUT itself when no document is unnamed].")
@spec_option(WHAT["protocol"], type=click.Choice(sorted(methods.PROTOCOLS)))
@spec_option(WHAT["calibrate"], type=click.Choice(sorted(methods.CALIBRATIONS)))
@spec_option(WHAT["weights_from"], type=click.Choice(methods.WEIGHTS_FROM))
@method_param_options
@spec_option(WHAT["keep_base"])
@spec_option(WHAT["dtype"])
@spec_option(WHAT["out_quant"], type=click.Choice(WHAT["out_quant"].choices))
@spec_option(HOW["memory_budget"])
@spec_option(WHAT["out_shard_size"])
@spec_option(WHAT["copy_tokenizer"])
@spec_option(WHAT["tokenizer"])
@spec_option(WHAT["chat_template"])
@spec_option(WHAT["allow_nonfinite"])
@spec_option(HOW["overwrite"])
@spec_option(HOW["resume"])
@spec_option(HOW["device"])
@spec_option(HOW["threads"], type=click.IntRange(1))
@spec_option(HOW["kernels"], type=click.Choice(KERNEL_BACKENDS), envvar="MBMERGE_KERNELS")
@spec_option(HOW["compile"], default=None)
@click.option("--zoo-size", type=click.Choice(ZOO_SIZES), help="With domain experts and no --base: the mini "
              "zoo's size [default: $MBMERGE_ZOO_SIZE, else full].")
@spec_option(WHAT["stats_folders"])
@click.option("--data", help="... or one data source per expert to collect them from (cached); default for "
              "domain experts: each one's own domain.")
@data_options
@spec_option(WHAT["overrides"], nargs=2, multiple=True, metavar="REGEX 'K=V ...'")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def merge_command(out, config, intermediate_dir, zoo_size, data, split, data_format, max_length, data_seed,
                  stats_batch_size, stats_dtype, quiet, **values):
    """Merge EXPERTS (and a base) into OUT with METHOD, or as a mergekit recipe says (--config)."""
    what = {name: values.pop(name) for name in WHAT}
    how = {k: v for k, v in {**{name: values.pop(name) for name in HOW}, "progress": not quiet}.items()
           if v is not None}
    given = {k: v for k, v in values.items() if v is not None}          # the method's parameters
    around = dict(keep_base=what.pop("keep_base"), out_shard_size=what.pop("out_shard_size"),
                  out_quant=what.pop("out_quant"),
                  copy_tokenizer=what.pop("copy_tokenizer"), allow_nonfinite=what.pop("allow_nonfinite"),
                  stats_folders=_listed(what.pop("stats_folders")),
                  overrides=[_override(*o) for o in what.pop("overrides")])   # with a recipe too
    collect = dict(zoo_size=zoo_size, data=_listed(data),
                   data_options=data_kwargs(split, data_format, max_length, data_seed, stats_batch_size, stats_dtype))
    if config:
        clash = [WHAT[k].flag if k in WHAT else flag_of(k) for k, v in [*what.items(), *given.items()] if v is not None]
        if clash:
            raise click.UsageError(f"--config {config} sets the recipe; do not also pass {', '.join(clash)}")
        from ..engine.recipe.stages import is_multi_stage
        if is_multi_stage(config):                      # several YAML documents: mergekit-multi's stages
            return _merge_stages(config, out, intermediate_dir, {**around, **how, **collect})
        from ..engine.recipe.document import load_recipe
        recipe = load_recipe(config)
        what = {**recipe["merge"], "config": Path(config).read_text(encoding="utf-8")}
    else:
        for name in ("method", "experts"):
            if what[name] is None:
                raise click.UsageError(f"Missing option '{WHAT[name].flag}' (or pass --config recipe.yml)")
        what = {**what, "experts": _listed(what["experts"]) or [], **given}
    if intermediate_dir is not None:
        raise click.UsageError("--intermediate-dir goes with a --config of several YAML documents (stages)")
    from ..engine.output.place import check_location
    from ..engine.spec import spec_from
    spec = spec_from(out=out, **what, **around, **how)     # every error of the recipe, before torch
    check_location(spec.out, spec.run.overwrite)
    spec.check_references()
    with _imports_frozen():
        from ..engine.api import run                      # torch, from here on
        from ..library import complete
    with _resumable():
        path = run(complete(spec, **collect))
    if not quiet:
        click.echo(f"merged model written to {path}")


def _merge_stages(config, out, intermediate_dir, options: dict) -> None:
    """A --config of several YAML documents, each stage merged with these options (engine/recipe/stages.py).
    Stages whose output records their current fingerprint are kept (mergekit's lazy, made exact);
    --overwrite merges them all again."""
    from ..engine.recipe.stages import run_stages

    def merge_models(**kwargs):
        with _imports_frozen():
            from ..library import merge                 # torch, once every stage is checked
        return merge(**kwargs)

    def fingerprint(**kwargs):
        with _imports_frozen():
            from ..library import fingerprint
        return fingerprint(**kwargs)
    with _resumable():
        path = run_stages(config, out, intermediate_dir=intermediate_dir, lazy=not options.get("overwrite"),
                          merge=merge_models, fingerprint=fingerprint, **options)
    if options["progress"]:
        click.echo(f"stages merged; output in {path}")


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


@contextlib.contextmanager
def _imports_frozen():
    """Imports with the cyclic garbage collector paused, and what they made frozen after (gc.freeze: no later
    collection walks it). torch and the engine make some 170k objects that live to the end: each full
    collection walked them all (a linear merge of 834M params ran 3 of them and 390 smaller ones, 0.26 s
    of the main thread, beside the threads that wait for it; then 0.01 s). Once, where torch comes in: a
    process that runs main() again (the tests) freezes nothing else."""
    first = "torch" not in sys.modules
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        if first and "torch" in sys.modules:
            gc.freeze()


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
