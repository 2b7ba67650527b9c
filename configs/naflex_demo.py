"""The NaFlex demo: the demo's SigLIP with a NaFlex image tower, trained on the shapes set
rendered at three aspect ratios (wide 4:1, tall 1:4, square), each image kept at its own
aspect ratio. A 2-core CPU.

    python -m siglip_jax.train --config=configs/naflex_demo.py --workdir=/tmp/naflex

Evaluated per aspect as `shapes_naflex/zeroshot_top1_wide`, `_tall`, `_square` (held-out images
of seen pairs; `_unseen` for never-seen pairs). The fixed-resolution demo (configs/demo.py) sees
the same images squashed to 32 x 32: `python -m siglip_jax.evaluate --workdir=DEMO_RUN
--config=configs/naflex_demo.py:eval_only` measures it on them (docs/performance.md, "NaFlex").

`switch=RUN`: SigLIP 2's switch instead of a fresh start (and the better demo: from scratch the
mix of canvases and budgets learns slowly, docs/performance.md, "NaFlex"): continue a
fixed-resolution run of configs/demo.py as NaFlex from one of its checkpoints, e.g.

    python -m siglip_jax.train --config=configs/demo.py --workdir=/tmp/demo
    python -m siglip_jax.train --config=configs/naflex_demo.py:switch=/tmp/demo/checkpoints/2000 \
        --workdir=/tmp/naflex

The 8 x 8 patch convolution becomes the dense patch embedding (kernel [8, 8, 3, D] reshaped to
[192, D], the (row, column, channel) order of the patches), the 4 x 4 position grid is
reused, the optimizer state starts fresh, and the rest of the source's schedule, from the
learning rate it had reached, is stretched over this run's total_steps: 1,875 = 3.75 x the 500
steps the demo has left after its step 2,000 (80%; SigLIP 2 switches at 90% and stretches the
last 10% 3.75x).
"""
from siglip_jax import config_defaults


def get_config(arg=None):
  c = config_defaults.base()
  c.total_steps = 2500

  c.input.data = "shapes_naflex"   # siglip_jax.data.shapes_naflex: 3 aspects, rendered
  c.input.batch_size = 128         # global, at every length
  c.input.text_len = 16
  c.input.image_size = 32          # unused by the NaFlex tower (the base canvas side)
  # Patch budgets drawn per step (SigLIP 2 draws from 128..1024 at 16 px): a 32 x 128 wide
  # image is 4 x 16 patches of 8 px at 64, 3 x 10 at 32. Adding 16 (2 x 8: objects 4-7 px
  # across) cost the switched model 0.03 on wide and tall images (docs/performance.md).
  c.input.seq_lens = (32, 64)
  c.input.max_num_patches = 64     # the handle's and the HF processor's budget

  c.model.image_model = "proj.image_text.naflex_vit"
  c.model.image = dict(variant=None, patch_size=(8, 8), width=128, depth=3, mlp_dim=512,
                       num_heads=4, pool_type="map", posemb_grid=4, scan=False,
                       remat_policy="none")
  c.model.text = dict(variant=None, width=128, depth=1, mlp_dim=512, num_heads=4,
                      vocab_size=0, pool_type="last", scan=False, remat_policy="none")
  c.model.out_dim = (None, 128)

  c.optim.schedule.warmup_steps = 100
  c.optim.lr_mults = (("txt/(Embed_0|Encoder_0|pos_embedding).*", 0.1),)   # as configs/demo.py

  c.checkpoint.every_steps = 500
  c.evals.shapes_naflex = dict(kind="shapes_naflex", every_steps=500, batch_size=256)

  if arg:
    key, _, value = arg.partition("=")
    if key == "switch" and value:
      c.model_init = value
      c.optim.schedule = dict(continue_init=True)
      c.total_steps = 1875         # 3.75 x the demo's 500 steps after its checkpoint at 2,000
    elif key == "eval_only" and not value:
      pass   # the evaluators alone, for `evaluate --config` of a fixed-resolution run
    else:
      raise ValueError(f"configs/naflex_demo.py: unknown argument {arg!r}; use "
                       "naflex_demo.py:switch=RUN")
  return c
