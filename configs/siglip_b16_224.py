r"""SigLIP B/16 at 224 px (text B, vocab 32000, 64 tokens): the GPU speed target of issue 9.

    python -m siglip_jax.bench --config=configs/siglip_b16_224.py --batch=256
    python -m siglip_jax.bench --config=configs/siglip_b16_224.py:L/16 --batch=256
    python -m siglip_jax.preflight --config=configs/siglip_b16_224.py:So400m/14 --devices=8 \
        --chip=H100

The optional argument after ':' picks another image variant ("L/16", "So400m/14", "g/14"); the
text tower takes the same width/depth (as published SigLIP pairs them). `,siglip2` adds SigLIP 2's
objectives: LocCa (weight 1) from the start, SILC and TIPS from 80% of the steps with weights 1
and 0.25 times the variant's size factor (0.25 / 0.5 / 1.0 / 0.5 for B / L / So400m / g;
`config_defaults.SIZE_FACTORS`), 8 local crops of 96 px:

    python -m siglip_jax.preflight --config=configs/siglip_b16_224.py:B/16,siglip2 --devices=8 \
        --config.mesh="(('fsdp', 8),)" --config.sharding_rules="(('.*', 'fsdp'),)" The benchmark and the
preflight feed synthetic batches; training reads real data (set `input.data` and its keys as
configs/webdataset.py does).

Fast-path choices (why):
- `model.dtype="bfloat16"`: bf16 activations and matmuls, float32 params and optimizer state
  (flax `param_dtype`), so the update keeps full precision while the tensor cores run bf16.
- `model.attention_impl="cudnn"`: fused (flash-style) attention in the encoder blocks; the MAP
  head always takes the XLA path (cuDNN rejects its single query). Set it to "" on CPU/TPU.
- remat: B/16 at batch 256 fits an 80 GiB H100 without it (about 36 GiB in big_vision), and
  recomputing costs ~1/3 more FLOPs, so it is off; the larger variants need it.
- scan: off, so XLA can schedule across layers (faster steps); scan=True compiles faster and
  is worth it for deep models on pods, where compile time adds up.
"""
from siglip_jax import config_defaults

# variant -> remat policy: only B/16 fits an H100 at batch 256 without rematerialization.
_REMAT = {"B": "none"}
# variant -> width (the text head projects to it, as big_vision's SigLIP: out_dim=(None, width)).
# Kept here rather than imported from siglip_jax.models so loading a config never imports JAX.
_WIDTH = {"B": 768, "L": 1024, "So400m": 1152, "g": 1408}


def get_config(arg=None):
  variant, _, recipe = (arg or "B/16").partition(",")
  if recipe not in ("", "siglip2"):
    raise ValueError(f"configs/siglip_b16_224.py: unknown recipe {recipe!r}; use ',siglip2'")
  name = variant.partition("/")[0]
  if name not in _WIDTH:
    raise ValueError(f"configs/siglip_b16_224.py: unknown variant {variant!r}; use B/16, L/16, "
                     "So400m/14 or g/14")
  remat = _REMAT.get(name, "nothing_saveable")
  c = config_defaults.base()
  c.total_steps = 100_000
  c.input.data = "synthetic"       # bench/preflight; training: webdataset / tfds
  c.input.batch_size = 256         # global
  c.model.image = dict(variant=variant, pool_type="map", posemb="learn", scan=False,
                       remat_policy=remat)
  c.model.text = dict(variant=name, vocab_size=32_000, pool_type="last", scan=False,
                      remat_policy=remat)
  c.model.out_dim = (None, _WIDTH[name])  # MAP image pooling, no image head; a text head
  c.model.dtype = "bfloat16"
  c.model.attention_impl = "cudnn"
  c.optim.schedule.warmup_steps = 10_000
  if recipe == "siglip2":
    # The decoder needs captions (training: webdataset / tfds); bench and preflight feed
    # synthetic batches of the same shapes.
    c.input.data = "webdataset"
    c.objectives.locca.weight = 1.0
    factor = config_defaults.SIZE_FACTORS[name]
    c.objectives.silc.weight = 1.0 * factor
    c.objectives.tips.weight = 0.25 * factor
  return c
