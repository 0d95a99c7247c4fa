"""Numerical parts shared by several methods (one home for each):

- :mod:`.aggregation`: self-attention maps aggregated over resolutions (DiffSeg, K-Means);
- :mod:`.kmeans`: seeded K-Means in torch (DiffSeg's optional refinement, the K-Means baselines);
- :mod:`.pamr`: PAMR and the label refinement built on it (DiffCut, DiffSeg's ``pamr``, SeeDiff).

A numerical part used by one method only lives beside that method in :mod:`diffseg.methods`
(e.g. ``methods/merging.py`` for DiffSeg, ``methods/ncut.py`` for DiffCut).
"""
