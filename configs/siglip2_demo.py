"""The SigLIP 2 demo: the sigmoid loss and the LocCa decoder (captioning, referring expressions,
grounded captioning) trained together on the embedded scenes set, on a 2-core CPU.

    python -m siglip_jax.train --config=configs/siglip2_demo.py --workdir=DIR
    # SigLIP 1 on the same data, for comparison:
    python -m siglip_jax.train --config=configs/siglip2_demo.py --workdir=DIR \\
        --config.objectives.locca.weight=0

Scenes of 1 to 3 coloured shapes (siglip_jax/data/scenes.py), each object a region with its box
and caption. What each choice bought is in docs/performance.md ("The SigLIP 2 demo").
"""
from siglip_jax import config_defaults


def get_config(arg=None):
  del arg
  c = config_defaults.base()
  c.total_steps = 2700

  c.input.data = "scenes"
  c.input.batch_size = 128
  c.input.image_size = 48          # 3 shapes of 8-12 px radius fit (data/scenes.py)
  c.input.text_len = 20            # the longest scene caption is 17 tokens and EOS
  c.input.decoder_len = 20
  c.input.loc_bins = 32            # 1.5 px a bin at 48 px

  c.model.image = dict(variant=None, patch_size=(8, 8), width=128, depth=3, mlp_dim=512,
                       num_heads=4, pool_type="map", posemb="sincos2d", scan=False,
                       remat_policy="none")
  c.model.text = dict(variant=None, width=128, depth=1, mlp_dim=512, num_heads=4,
                      vocab_size=0, pool_type="last", scan=False, remat_policy="none")
  c.model.out_dim = (None, 128)

  c.objectives.locca.weight = 1.0  # SigLIP 2: equal weights, from the first step
  # A quarter of the captions predicted in parallel (SigLIP 2: half): the evaluation decodes
  # captions one token at a time, which the other captions train (caption_acc 0.35 -> 0.39 at
  # 2,500 steps; docs/performance.md, "The SigLIP 2 demo").
  c.objectives.locca.parallel_fraction = 0.25

  # Stage B (SILC + TIPS against an EMA teacher) for the last 20% of the steps, as SigLIP 2.
  # Heads sized for a width-128 tower; 24 px local crops are 3x3 patches of the 6x6 grid.
  for name in ("silc", "tips"):
    c.objectives[name].update(head_hidden=512, head_bottleneck=128, head_dim=1024,
                              head_lr_mult=1.0)
  c.objectives.silc.weight = 1.0 * 0.25     # SigLIP 2's weights at B's size factor
  c.objectives.tips.weight = 0.25 * 0.25
  c.objectives.silc.update(n_local=4, local_size=24, local_scale=(0.1, 0.4))
  c.objectives.teacher.update(momentum=0.99, global_scale=(0.4, 1.0), flip=True)

  c.optim.schedule.warmup_steps = 100
  # As in the demo: the text transformer near its init composes colour and shape words.
  c.optim.lr_mults = (("txt/(Embed_0|Encoder_0|pos_embedding).*", 0.1),)

  c.checkpoint.every_steps = 500
  # Evaluated at the end only (decoding 768 scenes three ways costs half a minute here).
  c.evals.scenes = dict(kind="scenes", every_steps=2700, num_heldout=512, num_unseen=256,
                        num_probe_train=1024)   # the dense probe's training scenes
  return c
