"""The demo: a small SigLIP trained on the embedded coloured-shapes set, on a 2-core CPU.

    python -m siglip_jax.train --config=configs/demo.py --workdir=/tmp/demo

The model has SigLIP's shape (MAP image pooling, no image head, last-token text pooling with
sticky EOS, a text head), so it exports to HF transformers as it is.
"""
import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 2500
  c.log_every_steps = 100

  c.input = ml_collections.ConfigDict()
  c.input.data = "shapes"          # the embedded demo set (siglip_jax.data.shapes)
  c.input.batch_size = 128         # global
  c.input.image_size = 32
  c.input.text_len = 16
  c.input.tokenizer = ""           # empty: the demo's shipped SentencePiece model
  c.input.prefetch = 2

  c.model = ml_collections.ConfigDict()
  # 8 px patches (16 tokens) at width 128 learned shapes faster per CPU-second than 4 px patches
  # (64 tokens) at width 64, at the same FLOPs (docs/performance.md, "The demo").
  c.model.image = dict(variant=None, patch_size=(8, 8), width=128, depth=3, mlp_dim=512,
                       num_heads=4, pool_type="map", posemb="learn", scan=False,
                       remat_policy="none")
  c.model.text = dict(variant=None, width=128, depth=1, mlp_dim=512, num_heads=4,
                      vocab_size=0,  # 0: taken from the tokenizer
                      pool_type="last", scan=False, remat_policy="none")
  c.model.out_dim = (None, 128)
  c.model.temperature_init = 10.0
  c.model.bias_init = -10.0
  c.model.dtype = "float32"
  c.model.attention_impl = ""      # "" lets JAX pick; "cudnn" for fused attention on GPUs

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = "sigmoid_ring"

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.wd = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.clip_norm = 1.0
  c.optim.schedule = dict(decay="cosine", warmup_steps=100, cooldown_steps=0, end_lr_frac=0.0)
  # ((regex, multiplier), ...). The text transformer learns at 0.1x (its head at 1x): a text
  # encoder that stays near its init composes colour and shape words almost additively, which
  # is what naming unseen pairs takes (0.29 -> 0.43 unseen top-1 at step 1000; 0.01x was worse;
  # docs/performance.md, "The demo").
  c.optim.lr_mults = (("txt/(Embed_0|Encoder_0|pos_embedding).*", 0.1),)
  c.optim.frozen = ()              # (regex, ...): e.g. ("img/.*",) for LiT

  c.mesh = (("data", -1),)
  c.sharding_rules = ((".*", "replicate"),)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 2
  c.checkpoint.keep_every = 0      # 0: keep no extra checkpoints for good

  c.model_init = ""
  c.model_load = ml_collections.ConfigDict()
  c.model_load.dont_load = ()

  c.peak_tflops = 0.0              # per device, for perf/mfu; 0: from flops.PEAK_TFLOPS
  c.profile_steps = ""             # "N,M": a jax.profiler trace of steps N..M in DIR/profile/

  c.evals = ml_collections.ConfigDict()
  c.evals.shapes = dict(kind="shapes", every_steps=500, batch_size=256)
  return c
