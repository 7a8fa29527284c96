"""Evaluation-guided merging: grid tuning of a method's parameters on validation data (mbmerge tune) and Hi-Merging, both scoring candidate merges through the eval layer with a cache."""
