"""Multi-document mergekit recipes (mergekit-multi's meaning): an ordered list of stages, and running them.

Each YAML document is an ordinary recipe (engine/recipe/document.py reads it) plus an optional `name`. A named
stage is merged into <intermediate dir>/<name>; the one unnamed document, if any, is the final merge,
into `out`. A later document refers to a stage by its name wherever a model goes (base_model,
models[].model, slices' sources, tokenizer sources, chat_template); other names are ordinary references.
Stages run after those they use, otherwise in document order; a cycle among them is refused.

The intermediate dir defaults to `<out>.stages` beside `out`, or to `out` itself when no document is
unnamed. Each stage's output records its fingerprint (its document, output layout and inputs' files,
as any merge does). With lazy (the default) a stage is skipped only when its folder records the
fingerprint it would have now; a changed stage is merged again, and so is every stage that uses it.
A changed intermediate stage replaces its own earlier output; a changed final merge follows the
single-merge rule: an existing output is replaced only with --overwrite (refused, before any stage
runs, otherwise). Without lazy (--overwrite) every stage is merged again. An interrupted stage
resumes through the engine's own partial folder and journal, so the same call continues where it
stopped. Every stage's recipe, output place and state is checked before any stage runs. Knows
nothing of tensors; the merge itself is the caller's `merge` function, its fingerprint the caller's
`fingerprint`.
"""
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from ...common.errors import BadParameter, MbmergeError
from ..output.place import check_location, read_record, update_record
from ..spec import spec_from
from .document import load_recipe

# where a stage's name may stand for its output: a model, a tokenizer's source, a model's chat template
MODEL_KEYS = {"base_model", "model", "tokenizer_source", "source", "chat_template"}


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One document: its name (None for the final merge), number in the file (from 1), output
    folder, the stages it uses, and mbmerge.merge's keyword arguments (all but out)."""
    name: str | None
    document: int
    out: Path
    needs: tuple[str, ...]
    merge: dict

    @property
    def document_sha256(self) -> str:
        """What the stage's document asks for (its recipe read, the stages it uses as their folders)."""
        asked = {k: v for k, v in self.merge.items() if k != "config"}
        return hashlib.sha256(json.dumps(asked, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def title(self) -> str:
        return f"stage {self.name}" if self.name else "final merge"


def is_multi_stage(path) -> bool:
    """Whether the recipe at `path` is several YAML documents (or names its one document); False for
    a file that cannot be read or parsed, which the one-document reader then reports."""
    try:
        with open(path) as f:
            docs = list(yaml.safe_load_all(f))
    except (OSError, yaml.YAMLError):
        return False
    return len(docs) > 1 or any(isinstance(d, dict) and "name" in d for d in docs)


def load_stages(path, out=None, intermediate_dir=None, until: int | None = None) -> list[Stage]:
    """The stages of a multi-document recipe in the order they run, each recipe read and checked;
    BadParameter in one line naming the file and document for anything wrong. `until`: only the first
    `until` documents are merges (mbmerge moe reads the last one itself).

    Example:
        >>> [s.title for s in load_stages("multi.yml", "merged/")]
        ['stage math_code', 'final merge']
    """
    docs = documents(path)[:until]
    named = [d.get("name") for _, d in docs]
    if None in named and out is None:
        raise BadParameter(f"{path}: document {docs[named.index(None)][0]} is the final merge (it has no "
                           f"name), so an output folder is needed")
    folder = _intermediate(path, out, intermediate_dir, final=None in named)
    names = {n for n in named if n is not None}
    recipes, needs = {}, {}
    for k, doc in docs:
        used, recipe = set(), {key: v for key, v in doc.items() if key != "name"}
        recipes[doc.get("name")] = (k, _patched(recipe, names, folder, used))
        needs[doc.get("name")] = tuple(sorted(used))
    order = _ordered(path, needs)                   # a cycle, before any recipe is read
    stages = {}
    for name, (k, recipe) in recipes.items():      # in file order, so is the first error
        target = Path(out).absolute() if name is None else folder / name
        where = f"{path}: document {k} ({name or 'the final merge'})"
        # the recipe beside each output: the final merge's is the whole file (it reruns every stage), a
        # named stage's its own document, with the stages it uses as their folders
        config = Path(path).read_text(encoding="utf-8") if name is None else yaml.safe_dump(recipe, sort_keys=False)
        stages[name] = Stage(name=name, document=k, out=target, needs=needs[name],
                             merge={**_read(recipe, where), "config": config})
    ordered = [stages[name] for name in order]
    _check_apart(path, ordered)
    return ordered


def run_stages(path, out=None, *, intermediate_dir=None, lazy=True, merge=None, fingerprint=None, until=None,
               **options) -> Path:
    """Merge every stage of the recipe at `path` in order (see the module docstring); returns `out`,
    or the intermediate folder when no document is unnamed.

    Args:
        merge: the function that merges one stage, called as merge(out=..., **stage.merge, **options);
            default mbmerge.engine.api.merge (mbmerge.merge adds the built-in family: pass it for that).
        fingerprint: the fingerprint such a merge would record, called like merge; default the engine's.
        until: only the first `until` documents are stages (load_stages).
        options: the run's options, the same for every stage: memory_budget, device, progress,
            overwrite, resume, out_shard_size, copy_tokenizer, kernels, compile, ...
    Example:
        >>> run_stages("multi.yml", "merged/", merge=mbmerge.merge, memory_budget="4GB")
    """
    stages = load_stages(path, out, intermediate_dir, until)
    clash = sorted(set(options) & {k for s in stages for k in s.merge})
    if clash:
        raise BadParameter(f"{path}: {', '.join(clash)} is set by each document's recipe, not for the whole run")
    for s in stages:
        _check_models(s, {str(t.out) for t in stages})
    if merge is None or fingerprint is None:
        from .. import api               # torch, from here on
        merge = merge or api.merge
        fingerprint = fingerprint or (lambda **kw: api.fingerprint(api.spec_from(**kw)))
    why = _changes(stages, lazy, lambda s: fingerprint(out=s.out, **s.merge, **options))
    overwrite = options.get("overwrite", False)
    for s in stages:                    # every output place, before anything is written
        if why[s.name] is not None:
            _check_place(s, why[s.name], overwrite)
    for i, s in enumerate(stages, 1):
        if options.get("progress", True):
            what = f"merging into {s.out} ({why[s.name]})" if why[s.name] else "already merged, unchanged, skipped"
            print(f"mbmerge: {s.title} ({i}/{len(stages)}): {what}", file=sys.stderr)
        if why[s.name] is not None:
            merge(out=s.out, **s.merge, **{**options, "overwrite": _replaces(s, why[s.name], overwrite)})
            update_record(s.out, stage={"name": s.name, "document_sha256": s.document_sha256})
    final = [s.out for s in stages if s.name is None]
    return final[0] if final else stages[-1].out.parent


# why a stage is merged again when its own recipe asked for something else: the single-merge rule applies
CHANGED = ("its document changed", "its inputs changed")


def _changes(stages: list[Stage], lazy: bool, fingerprint) -> dict:
    """{stage name: why it is merged (a phrase), or None where it is unchanged}, in run order: a stage is
    unchanged when its output records its document and the fingerprint it would have now (the same
    document, layout and input files), and every stage it uses is unchanged."""
    why = {}
    for s in stages:
        record = read_record(s.out)
        redone = [n for n in s.needs if why[n] is not None]
        if not lazy:
            why[s.name] = "--overwrite: every stage is merged again"
        elif record is None:
            why[s.name] = "new"
        elif (record.get("stage") or {}).get("document_sha256") != s.document_sha256:
            why[s.name] = CHANGED[0]
        elif redone:
            why[s.name] = f"stage {', '.join(redone)} it uses is merged again"
        elif record.get("fingerprint") != fingerprint(s):
            why[s.name] = CHANGED[1]
        else:
            why[s.name] = None
    return why


def _check_place(stage: Stage, why: str, overwrite: bool) -> None:
    """Refuse, in one line, a stage output that may not be replaced: a final merge's earlier output whose
    own recipe or inputs changed, without --overwrite (the single-merge rule), or files mbmerge did not write."""
    if not _replaces(stage, why, overwrite) and read_record(stage.out) is not None:
        raise BadParameter(f"output {stage.out} holds an earlier merge of this recipe's final document, which "
                           f"would change ({why}): pass --overwrite to replace it, or choose another --out")
    check_location(stage.out, _replaces(stage, why, overwrite))


def _replaces(stage: Stage, why: str, overwrite: bool) -> bool:
    """Whether the stage may replace its earlier output: an intermediate stage's is its own; the final
    merge's only with --overwrite, unless all that changed is a stage it uses."""
    return overwrite or stage.name is not None or why not in CHANGED


def documents(path) -> list[tuple[int, dict]]:
    """(number from 1, mapping) of each non-empty document, names checked."""
    try:
        with open(path) as f:
            docs = list(yaml.safe_load_all(f))
    except OSError as e:
        raise BadParameter(f"{path}: cannot read the recipe ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise BadParameter(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    out, seen = [], {}
    for k, doc in enumerate(docs, 1):
        if doc is None:                  # an empty document, e.g. after a trailing '---'
            continue
        if not isinstance(doc, dict):
            raise BadParameter(f"{path}: document {k} is not a mergekit recipe (expected a mapping)")
        name = doc.get("name")
        if "name" in doc and (not isinstance(name, str) or not name or name in (".", "..")
                              or "/" in name or "\\" in name):
            raise BadParameter(f"{path}: document {k}: 'name' = {name!r} must be a folder name (no '/' or '\\')")
        if name in seen:
            what = f"name {name!r} is already document {seen[name]}'s" if name else (
                f"document {seen[name]} is unnamed too; only the final merge may be unnamed")
            raise BadParameter(f"{path}: document {k}: {what}")
        seen[name] = k
        out.append((k, doc))
    if not out:
        raise BadParameter(f"{path}: no recipe in the file")
    return out


def _intermediate(path, out, intermediate_dir, final: bool) -> Path:
    """Where named stages go: as given, else `<out>.stages` beside out (with a final merge) or out."""
    if intermediate_dir is not None:
        if not final and out is not None and Path(out).absolute() != Path(intermediate_dir).absolute():
            raise BadParameter(f"{path}: no document is unnamed (the final merge), so nothing would go to "
                               f"{out}; leave out the intermediate folder to write the named stages there")
        return Path(intermediate_dir).absolute()
    if out is None:
        raise BadParameter(f"{path}: give an output or an intermediate folder for the named stages")
    out = Path(out).absolute()
    return out.parent / f"{out.name}.stages" if final else out


def _patched(value, names: set, folder: Path, used: set, key=None):
    """A document with each stage name that stands where a model goes replaced by its output folder;
    the names replaced are added to `used`."""
    if isinstance(value, dict):
        return {k: _patched(v, names, folder, used, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_patched(v, names, folder, used, key) for v in value]
    if isinstance(value, str) and value in names and key in MODEL_KEYS:
        used.add(value)
        return str(folder / value)
    return value


def _read(recipe: dict, where: str) -> dict:
    """mbmerge.merge's keyword arguments for one document, read by load_recipe (which reads files)."""
    with tempfile.TemporaryDirectory(prefix="mbmerge-stage-") as tmp:
        file = os.path.join(tmp, "recipe.yml")
        with open(file, "w") as f:
            yaml.safe_dump(recipe, f, sort_keys=False)
        try:
            return load_recipe(file)["merge"]
        except BadParameter as e:
            raise BadParameter(f"{where}: {str(e).removeprefix(f'{file}: ')}") from None


def _ordered(path, needs: dict) -> list:
    """The stage names ({name: names it uses}, in file order), each after those it uses, otherwise in
    file order; a cycle in one line."""
    order, visiting = [], []

    def visit(name):
        if name in visiting:
            cycle = visiting[visiting.index(name):] + [name]
            raise BadParameter(f"{path}: stages {' -> '.join(cycle)} use each other in a cycle; "
                               f"no order can merge them")
        if name not in order:
            visiting.append(name)
            for used in needs[name]:
                visit(used)
            visiting.pop()
            order.append(name)
    for name in needs:
        visit(name)
    return order


def _check_models(stage: Stage, outputs: set) -> None:
    """A model reference that names nothing, in one line naming the stage (outputs of stages exist only
    once they ran)."""
    try:
        spec_from(out=stage.out, **stage.merge).check_references(made=outputs)
    except MbmergeError as e:
        raise type(e)(f"{stage.title}: {e}") from None


def _check_apart(path, stages: list[Stage]) -> None:
    """Refuse two stages whose outputs are the same folder or one inside the other."""
    for i, a in enumerate(stages):
        for b in stages[i + 1:]:
            if a.out == b.out or a.out in b.out.parents or b.out in a.out.parents:
                raise BadParameter(f"{path}: the {a.title}'s output {a.out} and the {b.title}'s {b.out} "
                                   f"overlap; choose an intermediate folder apart from the output")
