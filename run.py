"""Evaluate a method (DiffSeg, DiffCut, the K-Means baselines) on a dataset: the Hydra entry.

    python run.py dataset=coco_stuff27 resolution=512
    python run.py method=diffcut dataset=cityscapes
    python run.py -m method=diffseg,kmeans_c,kmeans_s resolution=320,512

See configs/config.yaml for every option and diffseg/tasks/evaluate.py for what a run writes.
"""

import os
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from diffseg.tasks.evaluate import main as evaluate_main

    return evaluate_main(cfg)


def _torchrun_setup() -> None:
    """Under torchrun: one run dir for every process (the main one's time stamp), and the
    other processes' logs in run_rank<r>.log without rewriting the run dir's .hydra files."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from diffseg.engine.distributed import agree_on_run_stamp

    agree_on_run_stamp()
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:
        sys.argv += [f"hydra.job.name=run_rank{rank}", "hydra.output_subdir=null"]


def _open_sweep() -> None:
    """``sweep`` is an open mapping of method keys (configs/config.yaml: ``sweep: {}``): let
    ``sweep.<any method key>=[...]`` add the key, as ``+sweep.<key>=[...]`` does."""
    sys.argv[1:] = ["++" + a if a.startswith("sweep.") else a for a in sys.argv[1:]]


if __name__ == "__main__":
    from diffseg.tasks.hydra_errors import install as one_line_hydra_errors

    one_line_hydra_errors()  # a mistyped key or group, an unwritable output dir: one line, exit 2
    _open_sweep()
    _torchrun_setup()
    main()
