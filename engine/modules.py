"""A `modules:` recipe's merge (MergeSpec.module and .modules): one output model, the reference (the first
module's base, else its first model), each of whose modules the spec names (common/roles.py: module_of) is
merged by a MergeSpec of its own: its method, models, parameters, slices and gradients. The tensors of the
modules it does not name are copied from the reference.

Why parts of one run, and neither a method per tensor nor one merge per module: the executor keeps one
method's invariants (which inputs it reads, its span, its statistics passes, its fused kernels), so a method
per tensor would thread through every one of them; merges per module into one folder would each lay out,
journal and verify the output again. Here the output is planned once (the reference's layout); each part is
that plan cut to its module's tensors, with its method's chunks, run by a Merger of its own over its own
readers, all writing through the one ShardWriter and journal, so the merge streams, resumes (by tensor
names) and verifies as any other.

A module's models are read through a view (read_models' `view`): its tensors only, named as the reference
names them: a text-only sibling's `model.*` read as a multimodal model's language model
(`model.language_model.*`, or its checkpoints' `language_model.model.*`), and back; each renaming is a note
for the card. Knows nothing of the methods' maths or of YAML.
"""
from dataclasses import dataclass, field, replace

from .. import methods
from ..common import roles
from ..common.errors import BadParameter
from ..methods import Method
from .inputs.index import TensorIndex
from .inputs.resolve import Source
from .models import Model, Models, read_models, sources
from .plan import Plan
from .spec import MergeSpec, spec_from


@dataclass(kw_only=True)
class Part:
    """One method's share of a merge: its spec (the recipe's per-tensor values made overrides, once planned),
    models and the plan of its tensors (a module's; or those of no module named, copied)."""
    spec: MergeSpec
    method: Method
    models: Models
    plan: Plan | None = None
    module: str | None = None       # None: the whole merge, or the tensors of no module named (copied)
    renamed: list = field(default_factory=list)   # one note per model read under other names (ModuleView)


@dataclass
class ModuleView:
    """A model as one module's merge reads it: the module's tensors under the reference's names."""
    module: str
    reference: TensorIndex
    notes: list = field(default_factory=list)       # one per model renamed

    def __call__(self, model: Model) -> Model:
        target = {roles.text_name(n): n for n in self.reference.tensors if roles.module_of(n) == self.module}
        tensors, renamed = {}, []
        for name, e in model.index.tensors.items():
            if roles.module_of(name) == self.module:
                out = target.get(roles.text_name(name), name)
                tensors[out] = replace(e, name=out)
                renamed += [(name, out)] * (out != name)
        if renamed and (model.adapter or model.stored is not model.index):
            raise BadParameter(f"{model.role}: its tensors of module {self.module} are named otherwise than the "
                               f"reference's ({renamed[0][0]} for {renamed[0][1]}); merge its adapter in first")
        if renamed:
            self.notes.append(f"{model.role} ({model.ref}): {len(renamed)} tensors of module {self.module} read under "
                              f"the output's names, e.g. {renamed[0][0]} as {renamed[0][1]}")
        index = replace(model.index, tensors=tensors)
        return replace(model, index=index, stored=index if model.stored is model.index else model.stored)


def read_parts(spec: MergeSpec, base: Source | None, experts: list[Source]) -> tuple[Models, list[Part]]:
    """The output's reference model alone (whose layout, side files and config the output takes) and one
    Part per module the spec names, its models read through the module's view; BadParameter in one line for
    a module that no tensor of the reference belongs to."""
    ref = base or experts[0]
    whole = read_models(spec_from("passthrough", [ref.ref], spec.out, dtype=spec.dtype, chat_template=spec.chat_template,
                                  copy_tokenizer=spec.copy_tokenizer), None, [ref])
    have = sorted({roles.module_of(n) for n in whole.reference.tensors})
    parts = []
    for s in (spec, *spec.modules):
        if s.module not in have:
            raise BadParameter(f"modules.{s.module}: no tensor of the reference model {ref.ref} ({ref.path}) belongs "
                               f"to this module; it has {', '.join(have)}")
        view = ModuleView(s.module, whole.reference)
        models = read_models(s, *((base, experts) if s is spec else sources(s)), view=view)
        wanted = {n for n in whole.reference.tensors if roles.module_of(n) == s.module}
        differ = sorted(wanted ^ set(models.reference.tensors))
        if differ:
            raise BadParameter(f"modules.{s.module}: its models make {len(models.reference.tensors)} tensors of this "
                               f"module ({roles.layer_count(models.reference.tensors)} layers), the reference {ref.ref} "
                               f"has {len(wanted)} ({roles.layer_count(wanted)} layers), e.g. {differ[0]} is in one "
                               f"only; slices of a module must keep the reference's layers")
        parts.append(Part(spec=s, method=s.row(), models=models, module=s.module, renamed=view.notes))
    inputs = list({s.ref: s for p in parts for s in p.models.given[1]}.values())
    whole = replace(whole, given=(base, inputs), tied=[note for p in parts for note in p.models.tied])
    return whole, parts + [Part(spec=spec, method=methods.get("passthrough"), models=whole)]


def cut(parts: list[Part]) -> tuple[Plan, list[Part]]:
    """Each part's plan (each the output's whole plan, chunked for its method) cut to its module's tensors (the
    last part: those of no module named, copied), and the output's plan of them all, in the reference's read
    order; a part with no tensor left is dropped."""
    whole = parts[-1].plan
    named = {p.module for p in parts if p.module}
    out = []
    for p in parts:
        mine = [t if p.module else replace(t, merge=False) for t in p.plan.tensors
                if roles.module_of(t.name) == p.module or (p.module is None and roles.module_of(t.name) not in named)]
        if mine:
            out.append(replace(p, plan=replace(p.plan, tensors=tuple(mine))))
    by_name = {t.name: t for p in out for t in p.plan.tensors}
    return replace(whole, tensors=tuple(by_name[t.name] for t in whole.tensors)), out


def card(parts: list[Part]) -> list[dict]:
    """The card's record of each part: its module, method, parameters and models (or that it was copied)."""
    def entry(p: Part) -> dict:
        if p.module is None:
            return {"modules": sorted({roles.module_of(t.name) for t in p.plan.tensors}),
                    "copied_from": p.models.experts[0].ref}
        return {"module": p.module, "method": p.spec.method, "params": p.spec.resolved, "base": p.spec.base,
                "experts": list(p.spec.experts), **({"renamed": p.renamed} if p.renamed else {}),
                **({"overrides": p.spec.recipe()["overrides"]} if p.spec.overrides else {})}
    return [entry(p) for p in parts]
