"""Write small checkpoints with the code of main before the layout move (commit 02ef3b4)."""
import sys, torch, lightning as L
from torch.utils.data import DataLoader, TensorDataset
import lightning_mtl as mtl
from lightning_mtl.callbacks import MultiTaskGradient, GradientMagnitudeProbe, ResidualProbe
from lightning_mtl.demo import DigitsMultiTask
out = sys.argv[1]
torch.manual_seed(0)
def tr(cbs, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=cbs, **kw)
x = torch.randn(32, 12); y = torch.randint(0, 10, (32, 2))
m = DigitsMultiTask(in_dim=12, hidden=16)
t = tr([MultiTaskGradient(mtl.PCGrad(seed=3)), GradientMagnitudeProbe(every_n_steps=1), ResidualProbe(every_n_steps=1, forward_fn=lambda mod, b: mod.trunk(b[0]))], max_steps=3)
t.fit(m, DataLoader(TensorDataset(x, y), batch_size=8))
t.save_checkpoint(f"{out}/demo_pcgrad_probes.ckpt")
from lightning_gen.lm import GAULanguageModel
from lightning_gen.text_data import TextDataModule
lm = GAULanguageModel(dim=16, depth=1, qk_dim=8, warmup_steps=1, lr=5e-3)
t = tr([MultiTaskGradient(mtl.PrimaryAuxiliary(primary="lm"))], max_steps=2, limit_val_batches=0)
t.fit(lm, TextDataModule(seq_len=16, batch_size=2, steps_per_epoch=2))
t.save_checkpoint(f"{out}/gau_lm_primary_aux.ckpt")
from lightning_gen.ddpm import DDPM
from lightning_gen.image_data import load_digits_images, resize_images
d = DDPM(preset="digits8", unet={"block_out_channels": [8, 8], "norm_num_groups": 4}, timestep_buckets=2)
imgs = resize_images(load_digits_images()[0][:16], None)
t = tr([MultiTaskGradient(mtl.GradNormalize())], max_steps=2)
t.fit(d, DataLoader(TensorDataset(imgs), batch_size=8))
t.save_checkpoint(f"{out}/ddpm_buckets.ckpt")
