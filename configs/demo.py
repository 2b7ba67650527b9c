"""The demo: a small SigLIP trained on the embedded coloured-shapes set, on a 2-core CPU.

    python -m siglip_jax.train --config=configs/demo.py --workdir=/tmp/demo
    python -m siglip_jax.train --config=configs/demo.py:lit=IMAGE_RUN --workdir=DIR   # LiT

The model has SigLIP's shape (MAP image pooling, no image head, last-token text pooling with
sticky EOS, a text head), so it exports to HF transformers as it is. Every key not set here
keeps its default (siglip_jax/config_defaults.py).

`lit=IMAGE_RUN` (a siglip_jax workdir, a checkpoint folder or a big_vision `.npz`) is LiT on the
demo set: the image tower is loaded from IMAGE_RUN and frozen (no update, no optimizer state),
the text tower and its head start fresh.
"""
from siglip_jax import config_defaults


def get_config(arg=None):
  c = config_defaults.base()
  c.total_steps = 2500

  c.input.data = "shapes"          # the embedded demo set (siglip_jax.data.shapes)
  c.input.batch_size = 128         # global
  c.input.image_size = 32
  c.input.text_len = 16

  # 8 px patches (16 tokens) at width 128 learned shapes faster per CPU-second than 4 px patches
  # (64 tokens) at width 64, at the same FLOPs (docs/performance.md, "The demo").
  c.model.image = dict(variant=None, patch_size=(8, 8), width=128, depth=3, mlp_dim=512,
                       num_heads=4, pool_type="map", posemb="learn", scan=False,
                       remat_policy="none")
  c.model.text = dict(variant=None, width=128, depth=1, mlp_dim=512, num_heads=4,
                      vocab_size=0, pool_type="last", scan=False, remat_policy="none")
  c.model.out_dim = (None, 128)

  c.optim.schedule.warmup_steps = 100
  # The text transformer learns at 0.1x (its head at 1x): a text encoder that stays near its
  # init composes colour and shape words almost additively, which is what naming unseen pairs
  # takes (0.29 -> 0.43 unseen top-1 at step 1000; 0.01x was worse; docs/performance.md).
  c.optim.lr_mults = (("txt/(Embed_0|Encoder_0|pos_embedding).*", 0.1),)

  c.checkpoint.every_steps = 500
  c.evals.shapes = dict(kind="shapes", every_steps=500, batch_size=256)

  if arg:
    key, _, image_run = arg.partition("=")
    if key != "lit" or not image_run:
      raise ValueError(f"configs/demo.py: unknown argument {arg!r}; use demo.py:lit=IMAGE_RUN")
    c.model_init = image_run
    c.model_load.dont_load = ("txt/.*", "t", "b")
    c.optim.frozen = ("img/.*",)
    c.total_steps = 1000
  return c
