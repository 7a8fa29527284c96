"""The merge command's options as one table: each field of a MergeSpec (what to merge) and of its
RunOptions (how to run it) with the flag that sets it, its help and how a value is spelled. bin/cli.py
declares its options from this table and MergeSpec.command() writes a card's command line from it, so
the two cannot disagree. A method parameter's flag is its name (`flag_of`), as bin/options.py declares
them from the method table. Imports no torch.
"""
import shlex
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Flag:
    """A field as the command line sets it: `flag` ('--keep-base', or a boolean's pair
    '--copy-tokenizer/--no-copy-tokenizer'), its help, and for click its short name, default, choices."""
    field: str
    flag: str
    help: str
    short: str | None = None
    default: object = None
    choices: tuple | None = None
    listed: bool = False        # comma-separated on the command line, a tuple in the spec
    switch: bool = False        # a flag that takes no value (--overwrite)

    def spell(self, value) -> list[str]:
        """The words that pass `value` on a command line (quoted for a shell)."""
        if isinstance(value, bool) and "/" in self.flag:
            on, off = self.flag.split("/")
            return [on if value else off]
        if self.switch:
            return [self.flag] if value else []
        return [self.flag, shlex.quote(",".join(map(str, value)) if self.listed else str(value))]


def flag_of(param_name: str) -> str:
    """A method parameter's flag: --density, --sparsify-scope."""
    return "--" + param_name.replace("_", "-")


def value_text(value) -> str:
    """A parameter value as the command line writes it: a list comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def spell_param(name: str, value) -> list[str]:
    """A method parameter on a command line: --name value, a boolean as --name / --no-name."""
    if isinstance(value, bool):
        return [flag_of(name) if value else "--no-" + flag_of(name)[2:]]
    return [flag_of(name), value_text(value)]


WHAT = {f.field: f for f in [
    Flag(field="method", flag="--method", short="-m", help="Merge method (see `mbmerge methods`)."),
    Flag(field="calibrate", flag="--calibrate", help="A post-step on each merged matrix, after any method: svc "
         "(singular value calibration: shrinks the merged delta's singular values that several experts inflated; "
         "--svc-alpha)."),
    Flag(field="weights_from", flag="--weights-from", help="Set the per-expert --weights from the inputs: nan "
         "(NAN: w_i proportional to 1 / ||x_i||, expert i's parameter norm over the merged tensors, summing to 1; a "
         "pre-pass reads the experts once more)."),
    Flag(field="protocol", flag="--protocol", help="Set a benchmark's choices at once (mergebench: model-wide ranks, "
         "embeddings kept, TIES sum, DARE 1/p)."),
    Flag(field="base", flag="--base", short="-b", help="Base model: folder or hub id. Default: the built-in family."),
    Flag(field="experts", flag="--experts", short="-e", listed=True,
         help="Comma-separated folders, hub ids or MergeBench domains."),
    Flag(field="keep_base", flag="--keep-base", help="Regex of tensor names copied from the base, e.g. "
         "'embed_tokens|lm_head' ('' merges all; default: the method's)."),
    Flag(field="dtype", flag="--dtype", help="Output dtype of float tensors (default: as stored)."),
    Flag(field="out_quant", flag="--out-quant", choices=("fp8",), help="Write the merged matrices quantized: fp8 "
         "(e4m3, a weight_scale_inv per 128x128 block, as the FP8 releases and transformers' FineGrainedFP8 store "
         "them) [default: not quantized, in --dtype]."),
    Flag(field="out_shard_size", flag="--out-shard-size", help="Bytes of tensors per output shard, as mergekit "
         "reads it (5B: 5e9 bytes; also 500MB, 2GiB) [default: the base's sharding]."),
    Flag(field="copy_tokenizer", flag="--copy-tokenizer/--no-copy-tokenizer", default=True,
         help="Copy the base's tokenizer files into the output."),
    Flag(field="tokenizer", flag="--tokenizer-source", help="Merge models whose vocabularies differ: union (every "
         "model's tokens), base, or one model's tokenizer; embedding rows follow the output's tokens (mergekit's "
         "rule)."),
    Flag(field="chat_template", flag="--chat-template", help="The output's chat template: auto (the one most inputs "
         "have), an input model as given, or a Jinja template [default: the base's]."),
    Flag(field="allow_nonfinite", flag="--allow-nonfinite", switch=True, default=False,
         help="Merge inputs holding NaN/Inf instead of refusing."),
    Flag(field="stats_folders", flag="--stats", listed=True, help="fisher, regmean, localize_stitch_trained: one "
         "statistics folder per expert, comma-separated (from `mbmerge stats`)."),
    Flag(field="overrides", flag="--override", help="For tensors matching REGEX (the first --override that does), "
         "these parameter values, e.g. --override '\\.layers\\.3\\.' 'scale=0 weights=1,0'. Repeatable."),
]}

HOW = {f.field: f for f in [
    Flag(field="memory_budget", flag="--memory-budget", default="2GB",
         help="Bound on working memory (with a GPU: device memory)."),
    Flag(field="overwrite", flag="--overwrite", switch=True, default=False,
         help="Replace an earlier mbmerge output in OUT (only the files it wrote; anything else there is refused)."),
    Flag(field="resume", flag="--resume/--no-resume", default=True,
         help="Continue an interrupted merge of the same recipe and inputs into OUT."),
    Flag(field="device", flag="--device", default="auto",
         help="Where to compute: cpu, cuda, cuda:N, or auto (CUDA when present)."),
    Flag(field="threads", flag="--threads", help="CPU cores to merge on: the first N the process may use (torch's "
         "threads and the compiled loops' follow; the card records them) [default: all it may use]."),
    Flag(field="kernels", flag="--kernels", help="What runs the methods that have fused kernels (the others always "
         "run torch). auto: Triton on a CUDA device (when installed, else torch); on the CPU the compiled C loops "
         "when they are built (`mbmerge --version` says) and --compile is on, else the torch methods. torch: the "
         "eager torch methods everywhere (on the CPU, the same as --no-compile). triton: Triton (on the CPU only "
         "under TRITON_INTERPRET=1) [default: $MBMERGE_KERNELS, else auto]."),
    Flag(field="compile", flag="--compile/--no-compile", help="With --kernels auto on the CPU: the compiled C loops "
         "(the fast path), or the torch methods (slower, the same bytes); no effect on a GPU [default: on, unless "
         "MBMERGE_COMPILE=0]."),
]}
