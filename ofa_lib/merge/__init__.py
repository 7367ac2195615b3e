"""Merge stage: combining runs (03_average) -- averaging, the merge-method registry, the cross-run pass, the ofa-merge command."""
