"""What a merge writes and where: the output's place (checked, locked, published by renames, replacing
only mbmerge's own files), the shard writer and the card, FP8 output (--out-quant), and verifying a
written output."""
