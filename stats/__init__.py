"""Statistics of experts on data (Fisher diagonals, RegMean Gram matrices, trained stitch masks),
collected by running one model at a time and written as safetensors folders the merge streams."""
