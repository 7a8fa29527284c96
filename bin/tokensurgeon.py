"""`mbmerge tokensurgeon`: a model given another model's tokenizer (engine/transplant/), with
mergekit-tokensurgeon's options and defaults."""
import json
from pathlib import Path

import click

MATCH = click.Choice(["no", "embed", "lm_head", "yes"])


@click.command("tokensurgeon")
@click.argument("model")
@click.argument("donor")
@click.argument("out_path", required=False, type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), help="The folder to write (or give it as OUT_PATH).")
@click.option("--approximation-method", "-a", "method", default="omp", show_default=True,
              help="How new tokens' rows are made: omp, common_interpolation, subword, mean, zero, randn.")
@click.option("-k", "--k", "k", default=64, show_default=True, type=int,
              help="Shared tokens combined per new token (omp, common_interpolation).")
@click.option("--weight-scheme", "-w", default="distance_proportional", show_default=True,
              type=click.Choice(["distance_proportional", "barycentric", "least_squares"]),
              help="common_interpolation's weights of the k nearest shared tokens.")
@click.option("--cosine-similarity/--no-cosine-similarity", "-c/-nc", default=False, show_default=True,
              help="common_interpolation: nearest by cosine instead of Euclidean distance.")
@click.option("--subword-method", "-s", default="mean", show_default=True,
              type=click.Choice(["mean", "sum", "weighted_mean", "first_last"]),
              help="subword: how the rows of a new token's pieces in the model's tokenizer combine.")
@click.option("--prefix-match", "-pm", default="no", show_default=True, type=MATCH,
              help="Give a new token its longest known prefix's row, in the embedding, the head, both or neither.")
@click.option("--byte-match", "-bm", default="no", show_default=True, type=MATCH,
              help="Match byte tokens and characters (<0x41> and A), in the embedding, the head, both or neither.")
@click.option("--new-vocab-noise", "-nvn", type=float, help="Add gaussian noise of this std to new tokens' rows.")
@click.option("--new-vocab-scale", "-nvs", type=float, help="Scale new tokens' rows by this factor.")
@click.option("--batch-size", type=int, help="New tokens approximated at once (default: from a 256 MiB bound).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the noise and of -a randn.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]),
              help="Output dtype of float tensors [default: as stored].")
@click.option("--overwrite", is_flag=True, help="Replace an earlier mbmerge output.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def tokensurgeon(model, donor, out_path, out, method, k, weight_scheme, cosine_similarity, subword_method,
                 prefix_match, byte_match, new_vocab_noise, new_vocab_scale, batch_size, seed, dtype, overwrite, quiet):
    """Give MODEL the tokenizer of DONOR: rows of shared tokens moved to their new ids, new tokens' rows
    approximated, every other tensor copied through."""
    if (out_path or out) is None or (out_path and out and out_path != out):
        raise click.UsageError("give the output folder once: --out DIR (or as the third argument)")
    from ..engine.transplant.options import Options            # checks the options; torch from the next import
    options = Options(method=method, k=k, weight_scheme=weight_scheme, cosine_similarity=cosine_similarity,
                      subword_method=subword_method, prefix_match=prefix_match, byte_match=byte_match,
                      new_vocab_noise=new_vocab_noise, new_vocab_scale=new_vocab_scale, batch_size=batch_size,
                      seed=seed, dtype=dtype, progress=not quiet)
    from ..engine.transplant.surgery import tokensurgeon as run
    path = run(model, donor, out_path or out, options, overwrite)
    if not quiet:
        record = json.loads((path / "mbmerge.json").read_text())
        counts = next(iter(record["vocabulary"]["tensors"].values()))
        click.echo(f"{path}: {record['vocabulary']['rows']} rows for the donor's tokens: {counts['exact']} shared, "
                   f"{counts['byte'] + counts['prefix']} matched by byte or prefix, {counts['approximated']} "
                   f"approximated ({record['approximation']}), {counts['empty']} left zero; see {path / 'README.md'}")
