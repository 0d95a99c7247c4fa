"""Generate a SeeDiff dataset (images and class masks from Stable Diffusion): the Hydra entry.

    python generate.py classes=[dog,cat,aeroplane] images_per_class=100
    python generate.py class_list=voc images_per_class=500 output_dir=outputs/seediff_voc
    python generate.py backbone=sd15 dtype=fp16 classes=[dog]

See configs/generate.yaml for every option, diffseg/tasks/generate.py for the task and
docs/seediff.md for the output layout.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    from diffseg.tasks.generate import main as generate_main

    generate_main(cfg)


if __name__ == "__main__":
    main()
