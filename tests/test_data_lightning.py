import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from kontext.data.loader import KontextDataModule, KontextLoader
from kontext.data.writers import write_shapes_edit


class KeyRecorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.keys: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.keys.append(list(batch["key"]))
        return ((self.w - batch["target"].mean()) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dm, max_steps, ckpt=None, save=None):
    module = KeyRecorder()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return module.keys


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_edit(out, 60, shard_size=15, size=32)
    return str(out)


def _dm(shards):
    return KontextDataModule(shards, batch_size=4, num_workers=0, mode="resampled", epoch_samples=20,
                             bucket_area=32 * 32, shuffle_buffer=10, t2i_fraction=0.2, instruction_dropout=0.1)


def test_trainer_resume_continues_the_data_stream(shards, tmp_path):
    reference = _fit(_dm(shards), 12)  # 5 batches per epoch: crosses two epoch boundaries
    head = _fit(_dm(shards), 7, save=tmp_path / "a.ckpt")
    tail = _fit(_dm(shards), 12, ckpt=str(tmp_path / "a.ckpt"))
    assert head == reference[:7] and len(tail) == 5
    # Lightning fetches one batch ahead: the resumed run continues right after the prefetched one,
    # never repeating a batch.
    assert tail in (reference[7:12], reference[8:13])
    state = torch.load(tmp_path / "a.ckpt", weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state[0]["epoch"] == 1


def test_datamodule_config_instantiates(shards):
    from hydra.utils import instantiate

    cfg = OmegaConf.create({"seed": 5, "paths": {"data_dir": "/nowhere"},
                            "data": OmegaConf.load("configs/data/shapes_edit.yaml")})
    cfg.data.shards = shards
    cfg.data.num_workers = 0
    dm = instantiate(cfg.data)
    assert isinstance(dm, KontextDataModule) and dm.hparams.seed == 5
    loader = dm.train_dataloader()
    assert isinstance(loader, KontextLoader) and len(loader) == 20000 // 32
    batch = next(iter(loader))
    assert batch["target"].shape == (32, 3, 64, 64)  # 32 px shards scaled up to the 64 x 64 bucket
