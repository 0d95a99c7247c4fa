"""Tasks: what the entry points run. ``evaluate`` (``run.py``) scores methods on a dataset;
``diffseg.tasks.generate`` (``generate.py``) generates a dataset with SeeDiff; both go through
:mod:`diffseg.tasks.entry`."""
