"""Edit or generate images with a trained model: compose the Hydra config, then sample.

    python sample.py checkpoint=outputs/train/default image=in.png prompt="make the red circle blue"
    python sample.py checkpoint=exports/shapes image=in.png prompt="remove the couple's shadow, then make it red"
    python sample.py checkpoint=exports/shapes image=in.png 'turns=[remove the blue square,make the background black]'
    python sample.py checkpoint=exports/shapes batch=cases.jsonl

All options: configs/sample.yaml. Logic: kontext/sample.py.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kontext.cli import hydra_guard
from kontext.sample import run_sample


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    status = run_sample(cfg)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    # prompt=, negative_prompt= and the turns are free text: no Hydra quoting needed
    hydra_guard(main, str(Path(__file__).resolve().parent / "configs"), config_name="sample",
                text_keys=("prompt", "negative_prompt"), list_keys=("turns",))
