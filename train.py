"""Train a Kontext model: compose the Hydra config, then run the configured stage.

    python train.py                                   # the embedded default, end to end
    python train.py experiment=embedded_autoencoder   # another stage or recipe
    python train.py -m seed=1,2,3                     # a sweep
"""

import hydra
from omegaconf import DictConfig

from kontext.run import main_guard, register_resolvers, run

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main_guard(main, config_name="train")
