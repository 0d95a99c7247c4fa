"""Run DiffSeg (or a baseline) on a dataset and save its metrics: the Hydra entry point.

    python run.py dataset=coco_stuff27 resolution=512
    python run.py -m method=diffseg,kmeans_c,kmeans_s resolution=320,512

See configs/config.yaml for every option and diffseg/runner.py for what a run writes.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from diffseg.runner import main as run_main

    return run_main(cfg)


if __name__ == "__main__":
    main()
