"""The evaluation engine: settings, run directory, evaluators, the loop and the report.

``diffseg.tasks.evaluate`` composes these; each module has one job:

- :mod:`.settings`: the method settings of a run (sweeps, variants), instantiated from configs;
- :mod:`.records`: the durable per-image records (``per_image.csv``);
- :mod:`.rundir`: the run directory (fingerprint, resume, sessions, atomic JSON);
- :mod:`.evaluators`: reset / process / evaluate objects (metric + records, predictions,
  overlays), in the style of detectron2's ``DatasetEvaluator``;
- :mod:`.loop`: one feature pass per batch for all settings, with timings per stage;
- :mod:`.report`: ``results.json``, ``sweep_results.json`` and the screen summary.
"""
