"""Test and benchmark helpers shipped with the package (importable from anywhere, no
``sys.path`` edits): small datasets written in the benchmarks' real on-disk formats
(:mod:`.fakedata`, :mod:`.fakedata_diffcut`) and structured synthetic attention
(:mod:`.synthetic_attention`)."""
