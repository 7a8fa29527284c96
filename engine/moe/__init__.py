"""Mixtures of Experts assembled from dense experts (mbmerge moe, as mergekit-moe): the recipe, the output
architectures, the output's tensors and their sources, the streaming assembly and the card; the routers come
in as tensors (stats/routers.py computes them)."""
