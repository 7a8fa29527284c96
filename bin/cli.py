"""The `mbmerge` command. `mbmerge --method ...` (no subcommand) is `mbmerge merge --method ...`.

The other commands are imported when they run, and the method table imports no torch, so --help,
`mbmerge methods` and the errors a user can make on the command line answer in a fraction of a
second; torch comes in when a merge starts."""
import contextlib
import difflib
import errno
import importlib
import sys
from pathlib import Path

import click

from .. import methods
from ..common.errors import BadParameter, MbmergeError
from ..common.names import KERNEL_BACKENDS, ZOO_SIZES, domain_names
from .options import listed as _listed, method_param_options
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
    "methods": ("method_docs", "list_methods", "List the merge methods and their parameters."),
    "stats": ("stats", "stats", "Collect one expert's statistics on its data (one model in memory at a time)."),
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
@click.option("--method", "-m", help="Merge method (see `mbmerge methods`).")
@click.option("--experts", "-e", help="Comma-separated folders, hub ids or MergeBench domains.")
@click.option("--out", "-o", required=True, type=click.Path(), help="Output folder.")
@click.option("--base", "-b", help="Base model: folder or hub id. Default: the built-in family.")
@click.option("--config", "-c", type=click.Path(dir_okay=False), help="A mergekit YAML recipe instead of "
              "--method/--base/--experts and method parameters.")
@click.option("--intermediate-dir", type=click.Path(file_okay=False), help="With a --config of several YAML "
              "documents (mergekit-multi's stages): the folder of the named stages [default: OUT.stages beside "
              "OUT; OUT itself when no document is unnamed].")
@click.option("--protocol", type=click.Choice(sorted(methods.PROTOCOLS)),
              help="Set a benchmark's choices at once (mergebench: model-wide ranks, embeddings kept, "
                   "TIES sum, DARE 1/p).")
@method_param_options
@click.option("--keep-base", help="Regex of tensor names copied from the base, e.g. 'embed_tokens|lm_head' "
              "('' merges all; default: the method's).")
@click.option("--dtype", help="Output dtype of float tensors (default: as stored).")
@click.option("--memory-budget", default="2GB", show_default=True, help="Bound on working memory (with a GPU: device memory).")
@click.option("--out-shard-size", help="Bytes of tensors per output shard, as mergekit reads it (5B: 5e9 bytes; "
              "also 500MB, 2GiB) [default: the base's sharding].")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
              help="Copy the base's tokenizer files into the output.")
@click.option("--tokenizer-source", help="Merge models whose vocabularies differ: union (every model's tokens), "
              "base, or one model's tokenizer; embedding rows follow the output's tokens (mergekit's rule).")
@click.option("--chat-template", help="The output's chat template: auto (the one most inputs have), an input "
              "model as given, or a Jinja template [default: the base's].")
@click.option("--allow-nonfinite", is_flag=True, help="Merge inputs holding NaN/Inf instead of refusing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue an interrupted merge of the same recipe and inputs into OUT.")
@click.option("--device", default="auto", show_default=True,
              help="Where to compute: cpu, cuda, cuda:N, or auto (CUDA when present).")
@click.option("--kernels", type=click.Choice(KERNEL_BACKENDS), envvar="MBMERGE_KERNELS",
              help="What runs the methods that have fused kernels (the others always run torch). auto: Triton "
                   "on a CUDA device (when installed, else torch); on the CPU the compiled C loops when they are "
                   "built (`mbmerge --version` says) and --compile is on, else the torch methods. torch: the "
                   "eager torch methods everywhere (on the CPU, the same as --no-compile). triton: Triton (on "
                   "the CPU only under TRITON_INTERPRET=1) [default: $MBMERGE_KERNELS, else auto].")
@click.option("--compile/--no-compile", "compiled", default=None,
              help="With --kernels auto on the CPU: the compiled C loops (the fast path), or the torch methods "
                   "(slower, the same bytes); no effect on a GPU [default: on, unless MBMERGE_COMPILE=0].")
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
def merge_command(method, experts, out, base, config, protocol, keep_base, dtype, memory_budget, out_shard_size,
                  copy_tokenizer, tokenizer_source, chat_template, allow_nonfinite, overwrite, resume, device,
                  kernels, compiled, zoo_size, stats_dirs, data, split, data_format, max_length, data_seed,
                  stats_batch_size, stats_dtype, overrides, quiet, intermediate_dir, **params):
    """Merge EXPERTS (and a base) into OUT with METHOD, or as a mergekit recipe says (--config)."""
    given = {k: v for k, v in params.items() if v is not None}
    if out_shard_size is not None:
        from ..engine.plan import parse_shard_size
        parse_shard_size(out_shard_size)                # a bad size: one line, before torch
    options = dict(keep_base=keep_base, memory_budget=memory_budget, out_shard_size=out_shard_size,
                   copy_tokenizer=copy_tokenizer, allow_nonfinite=allow_nonfinite, overwrite=overwrite,
                   progress=not quiet, protocol=protocol, resume=resume, device=device, kernels=kernels,
                   compile=compiled, zoo_size=zoo_size, stats_folders=_listed(stats_dirs), data=_listed(data),
                   overrides=[_override(*o) for o in overrides],
                   data_options=data_kwargs(split, data_format, max_length, data_seed, stats_batch_size, stats_dtype))
    if config:
        clash = [f"--{k}" for k, v in [("method", method), ("experts", experts), ("base", base),
                                       ("protocol", protocol), ("dtype", dtype), ("chat-template", chat_template),
                                       ("tokenizer-source", tokenizer_source),
                                       *given.items()] if v is not None]
        if clash:
            raise click.UsageError(f"--config {config} sets the recipe; do not also pass {', '.join(clash)}")
        from ..engine.recipe.stages import is_multi_stage
        if is_multi_stage(config):                      # several YAML documents: mergekit-multi's stages
            return _merge_stages(config, out, intermediate_dir, options)
        from ..engine.recipe.document import load_recipe
        recipe = load_recipe(config)
        merged, given = {**recipe["merge"], "config": Path(config).read_text(encoding="utf-8")}, recipe["params"]
    else:
        for name, value in [("--method", method), ("--experts", experts)]:
            if value is None:
                raise click.UsageError(f"Missing option '{name}' (or pass --config recipe.yml)")
        merged = dict(method=method, experts=_listed(experts) or [], base=base, dtype=dtype,
                      chat_template=chat_template, tokenizer=tokenizer_source, **given)
    if intermediate_dir is not None:
        raise click.UsageError("--intermediate-dir goes with a --config of several YAML documents (stages)")
    _check(merged["method"], merged["experts"], merged["base"], given, protocol, out, overwrite,
           merged.get("slices"))
    from ..library import merge as merge_models          # torch, from here on
    with _resumable():
        path = merge_models(out=out, **merged, **options)
    if not quiet:
        click.echo(f"merged model written to {path}")


def _merge_stages(config, out, intermediate_dir, options: dict) -> None:
    """A --config of several YAML documents, each stage merged with these options (engine/recipe/stages.py).
    Stages whose output records their current fingerprint are kept (mergekit's lazy, made exact);
    --overwrite merges them all again."""
    from ..engine.recipe.stages import run_stages

    def merge_models(**kwargs):
        from ..library import merge                     # torch, once every stage is checked
        return merge(**kwargs)

    def fingerprint(**kwargs):
        from ..library import fingerprint
        return fingerprint(**kwargs)
    with _resumable():
        path = run_stages(config, out, intermediate_dir=intermediate_dir, lazy=not options["overwrite"],
                          merge=merge_models, fingerprint=fingerprint, **options)
    if options["progress"]:
        click.echo(f"stages merged; output in {path}")


def _check(method: str, experts: list, base: str | None, given: dict, protocol: str | None, out,
           overwrite: bool, slices: list | None = None) -> None:
    """The errors a user can make in the command itself, before torch is imported: the method, its
    parameters and expert count, where the output goes, and model references that name nothing (the
    engine checks them again)."""
    from ..engine.output.place import check_location
    from ..engine.inputs.resolve import hub_repo, parts
    row = methods.get(method)
    n = len(slices[0]) - row.needs_base if slices else len(experts)      # a slice's models besides the base
    methods.check_experts(row, n)
    chosen = {k: v for k, v in methods.protocol_defaults(row, protocol).items() if k != "keep_base"}
    methods.resolve_params(row, n, {**chosen, **given})
    check_location(out, overwrite)
    if base is None and domain_names(experts) is not None:
        return                                      # the built-in family's models
    if base is None and row.needs_base:
        raise BadParameter(f"method {method} needs a base model (--base)")
    for ref, role in [(base, "base")] * (base is not None) + [(e, f"expert {e}") for e in experts]:
        for part in parts(ref):                     # a model, or mergekit's model+adapter
            hub_repo(part, role, base)


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
