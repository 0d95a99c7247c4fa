"""Tasks: what the entry points run. ``evaluate`` (``run.py``) scores methods on a dataset;
``diffseg.seediff.task`` (``generate.py``) generates a dataset with SeeDiff."""
