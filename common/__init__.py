"""Shared ground: what every layer may import and which imports nothing of mbmerge. The user-facing
errors, the cache folder, and the names of MergeBench's domains, bases and expert repos."""

VERSION = "0.1.0"
