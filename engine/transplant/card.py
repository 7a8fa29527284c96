"""Everything beside a transplanted model's tensors: the model's side files without its tokenizer, the donor's
tokenizer files as they are (its chat template with them, where it has one), the config's vocab_size and
special token ids made the donor's, the weight index, the card (README.md) and the record (mbmerge.json:
the options, each vocabulary tensor's rows by how they were made, the digests `mbmerge verify` checks).
Knows nothing of tensors' values.
"""
import json
import shlex
import shutil
from pathlib import Path

from ...common import VERSION
from ...common.errors import BadModel
from ...common.roles import ties_head
from ..inputs import chat_template, side_files
from ..inputs.index import INDEX_FILE
from ..output.verify import sha256_files
from ..output.write import write_index
from .options import Options

ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "mask_token_id")
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
HOW = {"exact": "the model's row of the same token", "byte": "the model's row of its byte (or character) twin",
       "prefix": "the model's row of its longest prefix", "approximated": "approximated",
       "empty": "zero (no donor token, or past the donor's rows)"}


def check_side_files(model: Path, donor: Path) -> None:
    """BadModel naming the first side file of the model, or tokenizer file of the donor, that does not parse."""
    side_files.check(model, "model")
    taken = [f"{f}:" for f in side_files.side_files(donor) if is_donor_file(f.name)]
    broken = [p for p in side_files.problems(donor) if p.startswith(tuple(taken))]
    if broken:
        raise BadModel(f"donor: {broken[0]}; fix or remove it before the transplant")


def is_donor_file(name: str) -> bool:
    """A file the output takes from the donor: its tokenizer's (and chat template)."""
    return side_files.is_tokenizer_file(name)


def donor_ties(folder: Path) -> bool:
    """Whether the donor's config ties its head to its embedding (no config: transformers' default, tied)."""
    return ties_head(_json(Path(folder) / "config.json"))


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def finish(job, tmp: Path, writer, seconds: float) -> None:
    """The side files, the index, the card and the record of a transplant written into `tmp`."""
    write_index(tmp, job.plan)
    copied = side_files.copy(job.model.path, tmp, job.options.out_dtype, tokenizer=False)
    for f in side_files.side_files(job.donor.path):
        if is_donor_file(f.name):
            shutil.copyfile(f, tmp / f.name)
            copied.append(f.name)
    side_files.set_config(tmp, "vocab_size", job.vocab[0].alignment.rows)
    ids = _special_ids(job)
    for key, value in ids.items():
        side_files.set_config(tmp, key, value)
    _generation_ids(tmp, job.donor.path, ids)
    template = chat_template.template_of(job.donor.path)
    record = _record(job, ids, seconds, "the donor's" if template else None)
    digests = {s.name: writer.sha256(s.name) for s in job.plan.shards}
    record["sha256"] = {**digests, **sha256_files(tmp, [INDEX_FILE] * job.plan.sharded + sorted(set(copied)))}
    (tmp / "mbmerge.json").write_text(json.dumps(record, indent=2) + "\n")
    (tmp / "README.md").write_text(_card(record))


def _special_ids(job) -> dict:
    """bos/eos/pad/unk/mask token ids of the output: the donor config's where it has the key, else its
    tokenizer's; a key the model's config has that the donor has no token for becomes null."""
    donor, model = _json(job.donor.path / "config.json"), _json(job.model.path / "config.json")
    ids = {}
    for key in ID_KEYS:
        if key in donor:
            ids[key] = donor[key]
        elif (found := getattr(job.donor_tokenizer, key, None)) is not None:
            ids[key] = found
        elif key in model:
            ids[key] = None
    if "padding_side" in donor:
        ids["padding_side"] = donor["padding_side"]
    return ids


def _generation_ids(tmp: Path, donor: Path, ids: dict) -> None:
    """The model's generation config with the donor's token ids: its generation config's, else the output's."""
    path = tmp / "generation_config.json"
    config = _json(path)
    if not config:
        return
    theirs = _json(donor / "generation_config.json")
    for key in GENERATION_KEYS:
        if key in theirs:
            config[key] = theirs[key]
        elif key in config:
            config[key] = ids.get(key)
    path.write_text(json.dumps(config, indent=2) + "\n")


def _record(job, ids: dict, seconds: float, template: str | None) -> dict:
    def source(s) -> dict:
        return {"ref": s.ref, "path": str(s.path.resolve()), "revision": s.revision}
    return {
        "mbmerge_version": VERSION, "method": "tokensurgeon", "model": source(job.model), "donor": source(job.donor),
        "approximation": job.options.method, "options": job.options.as_dict(),
        "vocabulary": {"donor_tokens": len(job.donor_tokenizer.get_vocab()), "rows": job.vocab[0].alignment.rows,
                       "tensors": {v.name: v.alignment.counts for v in job.vocab}},
        "special_token_ids": ids, "chat_template": template, "shards": len(job.plan.shards),
        "wall_seconds": round(seconds, 3), "command": command(job.model.ref, job.donor.ref, job.out, job.options),
        "inputs": job.identity,
    }


def command(model: str, donor: str, out: Path, options: Options) -> str:
    """The command line that reruns a transplant (its options that differ from the defaults)."""
    words = ["mbmerge", "tokensurgeon", model, donor, "--out", str(out)]
    defaults = Options()
    for key, value in options.as_dict().items():
        if value == getattr(defaults, key):
            continue
        flag = {"method": "-a", "k": "-k"}.get(key, "--" + key.replace("_", "-"))
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


def _card(record: dict) -> str:
    counts = record["vocabulary"]["tensors"]
    names = list(counts)
    rows = "\n".join(f"| {HOW[how]} | " + " | ".join(str(counts[n][how]) for n in names) + " |" for how in HOW)
    options = "\n".join(f"- `{k}`: {v}" for k, v in record["options"].items() if v is not None)
    template = "the donor's" if record["chat_template"] else "none (the donor has none)"
    return (f"---\nlibrary_name: transformers\ntags:\n- mbmerge\n- tokensurgeon\n---\n\n"
            f"# Tokenizer transplant\n\n`{record['model']['ref']}` with the tokenizer of `{record['donor']['ref']}`, "
            f"made by mbmerge {record['mbmerge_version']} tokensurgeon in {record['wall_seconds']:.1f} s. New tokens' "
            f"rows: **{record['approximation']}**.\n\n## Rows\n\n{record['vocabulary']['rows']} rows, one per id of "
            f"the donor's {record['vocabulary']['donor_tokens']} tokens:\n\n"
            f"| row | " + " | ".join(f"`{n}`" for n in names) + " |\n|---|" + "---|" * len(names) + f"\n{rows}\n\n"
            f"## Options\n\n{options}\n\nChat template: {template}. Special token ids: "
            f"{json.dumps(record['special_token_ids'])}.\n\nReproduce with:\n\n```\n{record['command']}\n```\n")
