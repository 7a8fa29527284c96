"""LoRA adapters: read as the weights they adapt (W + s B A on each chunk), and extracted from a model
and its base (mbmerge extract-lora)."""
