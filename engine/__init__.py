"""The streaming engine, in rooms, each saying what it owns; imports run one way, down this list:

    inputs/     what a merge reads: references resolved, safetensors headers and indexes, mapped reads,
                quantized checkpoints read dequantized, tied heads, slices, vocabularies, side files,
                statistics folders
    flags, spec, plan, journal, device
                the core's ground: the merge command's options (one table, the command line's and the
                card's), a checked MergeSpec and its RunOptions (torch-free), the output plan (tensors,
                chunks, shards), the resume journal and fingerprint, the compute device
    output/     what a merge writes and where: the output's place, the shard writer and card, FP8 output,
                verify
    adapters/   LoRA adapters read as the weights they adapt, and extracted (mbmerge extract-lora)
    transplant/ a model given another model's tokenizer (mbmerge tokensurgeon): tokens matched, rows rebuilt
    models      one record per model of a merge, built from the spec (engine/models.py)
    modules     a `modules:` recipe's parts: each module of a multimodal model merged by its own method
                and models through a view of its tensors, into one plan (engine/modules.py)
    execute     the executor: chunks read, merged by the method, written
    norms       the experts' parameter norms, streamed before a merge whose weights come from them (NAN)
    moe/        Mixtures of Experts from dense experts (mbmerge moe): mergekit-moe's recipe, the output
                architectures, each output tensor's source, the streaming assembly and card; routers come in
                as tensors (stats/routers.py computes them)
    api         one merge as a story: models -> plan -> executor -> finish (run, merge, fingerprint)
    recipe/     mergekit YAML: documents, per-tensor parameter values, stages; beside the core, which
                never imports it (a recipe's gradients reach it as MergeSpec.layered)

Import what you use from its module (engine.api.run, engine.spec.MergeSpec): this package imports nothing,
so the command line reads engine.output.place and engine.inputs.resolve without torch."""
