"""Evaluate a method (DiffSeg, DiffCut, the K-Means baselines) on a dataset: the Hydra entry.

    python run.py dataset=coco_stuff27 resolution=512
    python run.py method=diffcut dataset=cityscapes
    python run.py -m method=diffseg,kmeans_c,kmeans_s resolution=320,512

See configs/config.yaml for every option and diffseg/tasks/evaluate.py for what a run writes.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from diffseg.tasks.evaluate import main as evaluate_main

    return evaluate_main(cfg)


if __name__ == "__main__":
    main()
