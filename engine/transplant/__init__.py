"""A model given another model's tokenizer (mbmerge tokensurgeon): the donor's tokens matched to the model's,
rows of new tokens approximated, the vocabulary tensors rebuilt in row chunks and every other tensor copied
through the shard writer."""
