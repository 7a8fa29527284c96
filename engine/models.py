"""The models a merge reads, one record each, built by `read_models` from a spec: each model's source,
role, index as stored and as the merge reads it (its LoRA adapter folded in, a slice's virtual model,
tied heads reconciled, rows in the output vocabulary), and its reader once opened. Also what the models
decide together: the output vocabulary, the chat template, the reference layout the output follows and
the folder its config and tokenizer come from. Knows nothing of the plan, the methods' maths or the output.
"""
from dataclasses import dataclass, replace
from pathlib import Path

from .. import methods
from ..common.errors import BadParameter
from ..common.names import domain_names
from .adapters import lora
from .inputs import chat_template, side_files, vocabulary
from .inputs.index import TensorIndex, check_agreement, float_width_notes
from .inputs.quantized import Quantization, QuantizedModel, read_quantization
from .inputs.read import MappedModel, Readers
from .inputs.resolve import Source, resolve
from .inputs.slices import virtual_inputs
from .inputs.tied import reconcile
from .inputs.vocab_rows import VocabularyModel, reshaped, vocab_tensors
from .spec import MergeSpec


@dataclass(kw_only=True)
class Model:
    """One model as the merge reads it: named `ref` by the user (a slice's virtual model: its place),
    `stored` as its files are (None for a virtual model), `index` as merged, with its adapter if any."""
    ref: str
    role: str
    stored: TensorIndex | None
    index: TensorIndex
    adapter: lora.Adapter | None = None
    quantization: Quantization | None = None      # its quantized tensors, read dequantized

    def reader(self, vocab: vocabulary.Vocabulary | None) -> MappedModel:
        """Its chunks: mapped from its files, its LoRA folded in, dequantized, its rows in the output vocabulary."""
        inner = lora.AdaptedModel(self.stored, self.adapter) if self.adapter else \
            QuantizedModel(self.stored, self.quantization, self.index) if self.quantization else MappedModel(self.index)
        return VocabularyModel(inner, self.ref, vocab) if vocab else inner


@dataclass(kw_only=True)
class Models:
    """Every model of one merge, read and checked against each other."""
    base: Model | None
    experts: list[Model]
    given: tuple[Source | None, list[Source]]   # the base and experts as the user named them (the card's)
    side: Path                  # the folder config and tokenizer files come from
    reference: TensorIndex      # the layout the output follows: the base's (else the first expert's)
    files: list[TensorIndex]    # the inputs' own files, adapters included (the merge's identity)
    tied: list[str]             # what was merged as a head, or left out, and why
    vocab: vocabulary.Vocabulary | None
    template: tuple | None      # (the output's chat template or None, where it came from)

    def readers(self, merges_base: bool, statistics: list[TensorIndex]) -> Readers:
        """Every model's reader, and the statistics folders' (one per expert), opened; `merges_base`: the
        method merges the base (else it is only copied from, where the merge keeps tensors at the base)."""
        base = self.base.reader(self.vocab) if self.base else None
        experts = [m.reader(self.vocab) for m in self.experts]
        if self.vocab:            # rows a model lacks are made from the merge inputs' rows
            inputs = {r.ref: r for r in ([base] if base and merges_base else []) + experts}
            for r in [base, *experts]:
                if r is not None:
                    r.attach([inputs[ref] for ref in self.vocab.inputs])
        return Readers(base=base, experts=experts, roles=[m.role for m in self.experts],
                       statistics=[MappedModel(ix) for ix in statistics])

    def float_width_notes(self) -> list[str]:
        """One line per expert stored in another float width than the reference (the base)."""
        label = "the base" if self.base else f"expert {self.experts[0].ref!r}"
        if (self.base or self.experts[0]).quantization:      # read as float32: quantized_notes says how
            return []
        return float_width_notes(self.reference, {m.ref: m.index for m in self.experts if not m.quantization}, label)

    def quantized_notes(self) -> list[str]:
        """One line per model read dequantized, saying how (for the notice and the card)."""
        return [m.quantization.note(m.role) for m in [self.base, *self.experts] if m is not None and m.quantization]

    def out_dtypes(self) -> dict[str, str] | None:
        """Output dtypes where --dtype gives none: the reference's dequantized tensors in bf16 (the dtype a
        quantized release keeps its other tensors in), the rest as stored; None when it is not quantized."""
        ref = self.base or self.experts[0]
        if ref.quantization is None:
            return None
        return {n: "BF16" for n in ref.quantization.tensors if n in self.reference.tensors}


def sources(spec: MergeSpec) -> tuple[Source | None, list[Source]]:
    """The base and the experts as local folders: domain names with no base refer to spec.family."""
    names = domain_names(spec.experts)
    if spec.base is None and names is not None:
        if spec.family is None:
            raise BadParameter("domain experts with no --base: pass --base (a hub base such as "
                               "google/gemma-2-2b, or a folder)")
        family = Path(spec.family)
        return (Source(ref="built-in", path=family / "base", revision=None, role="base"),
                [Source(ref=e, path=family / d, revision=None, role=f"expert {e}")
                 for e, d in zip(spec.experts, names)])
    base = resolve(spec.base, "base") if spec.base else None     # a method that needs one: MergeSpec says so
    return base, [on_base(resolve(e, f"expert {e}", spec.base), base) for e in spec.experts]


def on_base(s: Source, base: Source | None) -> Source:
    """An expert given as a LoRA adapter folder alone adapts the base."""
    if s.adapter is not None or not lora.is_adapter(s.path):
        return s
    if base is None:
        raise BadParameter(f"{s.role} is a LoRA adapter ({s.path}): pass --base, the model it adapts, or name "
                           f"both as MODEL+ADAPTER")
    return replace(base, ref=s.ref, role=s.role, adapter=s.path)


def read_models(spec: MergeSpec, base: Source | None, experts: list[Source], view=None) -> Models:
    """Every model of the merge, indexed and checked: its adapter folded in, the slices' virtual models,
    tied heads reconciled, the output vocabulary and chat template chosen, the experts' tensors agreeing
    with the reference's (in one line, naming the first disagreements, otherwise). `view`: a function of
    each Model as stored to the Model merged (one module's tensors: engine/modules.py)."""
    stored = [stored_model(s) for s in ([base] if base else []) + experts]
    side = stored[0].stored.folder
    side_files.check(side, "base" if base else experts[0].role)
    files = [m.stored for m in stored] + [m.adapter.index for m in stored if m.adapter]
    stored = [view(m) for m in stored] if view else stored
    if spec.slices:           # the inputs become one virtual model per position of the slices
        if any(m.quantization for m in stored):
            raise BadParameter("quantized models with slices are not supported yet: dequantize them in a stage of "
                               "their own first (a merge of one model with --method linear)")
        if any(m.adapter for m in stored):
            raise BadParameter("LoRA adapters with slices are not supported yet: fold the adapters in a stage of "
                               "their own first")
        virtual = _sliced(spec, stored)
        base_model, models = (virtual[0], virtual[1:]) if methods.get(spec.method).needs_base else (None, virtual)
    else:
        base_model, models = (stored[0], stored[1:]) if base else (None, stored)
    ref_model = base_model or models[0]
    indexes, tied = reconcile(ref_model.index, [(m.role, m.index) for m in models])
    models = [replace(m, index=ix) for m, ix in zip(models, indexes)]
    vocab = _vocabulary(spec, base, experts, base_model, models)
    shaped = (lambda ix: reshaped(ix, vocab.rows)) if vocab else (lambda ix: ix)   # noqa: E731  (the output's rows)
    reference = shaped(ref_model.index)
    template = _chat_template(spec, base, experts, side, vocab)     # its errors before any work
    check_agreement(reference, {m.role.removeprefix("expert "): shaped(m.index) for m in models},
                    "base" if base else f"expert {spec.experts[0]!r}")
    return Models(base=base_model, experts=models, given=(base, experts), side=side, reference=reference, files=files,
                  tied=tied, vocab=vocab, template=template)


def stored_model(s: Source) -> Model:
    """A model as its folder holds it, its LoRA adapter (if any) folded into the index it is merged by."""
    index = TensorIndex.from_folder(s.path, s.role)
    quantization = read_quantization(s.path, index, s.role)
    if quantization is not None:
        if s.adapter is not None:
            raise BadParameter(f"{s.role}: a LoRA adapter on a quantized model ({s.path}) is not supported yet: "
                               f"merge the adapter into a bf16 copy of the model")
        return Model(ref=s.ref, role=s.role, stored=index, index=quantization.view(index), quantization=quantization)
    if s.adapter is None:
        return Model(ref=s.ref, role=s.role, stored=index, index=index)
    adapter = lora.read_adapter(s.adapter, index, s.role)
    return Model(ref=s.ref, role=s.role, stored=index, index=adapter.view(index), adapter=adapter)


def _sliced(spec: MergeSpec, stored: list[Model]) -> list[Model]:
    """One virtual model per position of a recipe's slices (engine/inputs/slices.py), the base's first
    where the method merges one."""
    if spec.tokenizer is not None:
        raise BadParameter("a tokenizer source with slices is not supported: the embeddings and the head may come "
                           "from different models; merge the vocabularies in a stage of their own")
    virtual = virtual_inputs(list(spec.slices), {m.ref: m.index for m in stored})
    names = [f"slice input {j + 1}" for j in range(len(virtual))]
    return [Model(ref=name, role=name, stored=None, index=ix) for name, ix in zip(names, virtual)]


def _vocabulary(spec: MergeSpec, base: Source | None, experts: list[Source], base_model: Model | None,
                models: list[Model]) -> vocabulary.Vocabulary | None:
    """The output vocabulary where spec asks for one (spec.tokenizer), from the models' tokenizers."""
    if spec.tokenizer is None:
        return None
    pairs = [(base, base_model)] * (base is not None) + list(zip(experts, models))
    rows = [m.index.tensors[names[0]].shape[0] if (names := vocab_tensors(m.index)) else 0 for _, m in pairs]
    inputs = [s.ref for s, _ in pairs if s is not base or methods.get(spec.method).needs_base]
    folders = [s.adapter if s.adapter and lora.has_tokenizer(s.adapter) else s.path for s, _ in pairs]
    return vocabulary.build(vocabulary.parse(spec.tokenizer),
                            [(s.ref, f, r) for (s, _), f, r in zip(pairs, folders, rows)], inputs,
                            base.ref if base else None)


def _chat_template(spec: MergeSpec, base: Source | None, experts: list[Source], side: Path,
                   vocab) -> tuple | None:
    """(the output's chat template or None, where it came from) where spec asks for one, else None."""
    if spec.chat_template is None:
        return None
    if not vocab and (not spec.copy_tokenizer or not (side / chat_template.CONFIG).is_file()):
        raise BadParameter(f"chat_template: the output would have no {chat_template.CONFIG} to carry it "
                           f"({'--no-copy-tokenizer' if not spec.copy_tokenizer else f'{side} has none'})")
    return chat_template.choose(spec.chat_template, [(s.ref, s.path) for s in ([base] if base else []) + experts])
