"""What a merge reads: model references resolved to folders, validated safetensors headers and indexes,
mapped reads, quantized checkpoints read dequantized, tied heads, slices' virtual models, vocabularies
and their rows, side files (config, tokenizer, chat template) and statistics folders. Knows nothing of
methods or of the output."""
