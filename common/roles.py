"""Tensor roles by name, written once: a decoder layer's tensors (and which layer) and the weights
mergekit plans before the layers (the token embeddings), as transformers names them."""
import re

LAYER = re.compile(r"\.layers\.(\d+)\.")   # a decoder layer's tensors, as transformers names them
EMBEDDING = re.compile(r"(^|\.)(embed_tokens|embed_in|wte|wpe|word_embeddings)\.")  # mergekit's pre-layer weights
