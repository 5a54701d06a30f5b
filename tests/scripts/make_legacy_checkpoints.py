"""Write the checkpoints in ``tests/data/legacy/`` (run once, with main at 02ef3b4, before the layout move).

``python tests/scripts/make_legacy_checkpoints.py tests/data/legacy``. Kept so that the files can be traced to the
code that wrote them; ``tests/test_layout.py`` checks that they still load and resume.
"""

import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_mtl as mtl
from lightning_gen.ddpm import DDPM
from lightning_gen.image_data import load_digits_images, resize_images
from lightning_gen.lm import GAULanguageModel
from lightning_gen.text_data import TextDataModule
from lightning_mtl.callbacks import GradientMagnitudeProbe, MultiTaskGradient, ResidualProbe
from lightning_mtl.demo import DigitsMultiTask


def trainer(callbacks: list, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kw,
    )


def main(out: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(32, 12), torch.randint(0, 10, (32, 2))
    probes = [
        GradientMagnitudeProbe(every_n_steps=1),
        ResidualProbe(every_n_steps=1, forward_fn=lambda m, b: m.trunk(b[0])),
    ]
    t = trainer([MultiTaskGradient(mtl.PCGrad(seed=3)), *probes], max_steps=3)
    t.fit(DigitsMultiTask(in_dim=12, hidden=16), DataLoader(TensorDataset(x, y), batch_size=8))
    t.save_checkpoint(f"{out}/demo_pcgrad_probes.ckpt")

    t = trainer([MultiTaskGradient(mtl.PrimaryAuxiliary(primary="lm"))], max_steps=2, limit_val_batches=0)
    t.fit(
        GAULanguageModel(dim=16, depth=1, qk_dim=8, warmup_steps=1, lr=5e-3), TextDataModule(seq_len=16, batch_size=2)
    )
    t.save_checkpoint(f"{out}/gau_lm_primary_aux.ckpt")

    ddpm = DDPM(preset="digits8", unet={"block_out_channels": [8, 8], "norm_num_groups": 4}, timestep_buckets=2)
    images = resize_images(load_digits_images()[0][:16], None)
    t = trainer([MultiTaskGradient(mtl.GradNormalize())], max_steps=2)
    t.fit(ddpm, DataLoader(TensorDataset(images), batch_size=8))
    t.save_checkpoint(f"{out}/ddpm_buckets.ckpt")


if __name__ == "__main__":
    main(sys.argv[1])
