r"""SigLIP B/16 at 224 px trained on your own WebDataset tar shards (img2dataset's layout).

    python -m siglip_jax.data.check --shards='/data/cc12m/{00000..01242}.tar'   # optional, first
    python -m siglip_jax.train --config=configs/webdataset.py --workdir=DIR \
        --config.input.shards='/data/cc12m/*.tar' --config.input.tokenizer=/path/spm.model

Members `key.jpg|jpeg|png|webp` + `key.txt` (optional `key.json`). Bad records (truncated or
undecodable images, missing or blank captions) are skipped and counted (`data/skipped` in
metrics.jsonl). Other sources through the same loader: `--config.input.data=folder
--config.input.dir=DIR` (a folder with captions.jsonl, or a set made by
`python -m siglip_jax.data.prepare`), or `input.data=tfds` (see configs/tfds_coco.py), or a
weighted mixture in `input.mixture`. For a published SigLIP tokenizer set `input.tokenizer` to
its .model and `model.text.vocab_size=0` (taken from it).

Feeding an accelerator: see docs/performance.md "Data loader throughput (224 px)" for pairs/s
per CPU core; set `input.workers` to about the number of cores that needs.
"""
import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 100_000
  c.log_every_steps = 100

  c.input = ml_collections.ConfigDict()
  c.input.data = "webdataset"      # webdataset | folder | tfds
  c.input.shards = ""              # GLOB (several: joined by ','); required for webdataset
  c.input.dir = ""                 # for input.data=folder
  c.input.mixture = ()             # ((kind, {"shards": GLOB} or {"dir": DIR}, weight), ...)
  c.input.batch_size = 256         # global
  c.input.image_size = 224
  c.input.text_len = 64
  c.input.tokenizer = ""           # a SentencePiece .model; empty: the demo's
  c.input.lowercase = True
  c.input.strip_punctuation = False
  c.input.eos = "sticky"           # sticky (SigLIP) | append | none
  c.input.pad_id = -1              # -1: the EOS mode's default (sticky pads with EOS)
  c.input.resize = "squash"        # squash (SigLIP) | crop (shorter side, then centre crop)
  c.input.resize_method = "bicubic"  # bicubic | bilinear
  c.input.random_crop = False      # Inception-style random resized crop ...
  c.input.crop_scale = (0.08, 1.0)  # ... of this area fraction
  c.input.flip = False             # random horizontal flip
  c.input.jpeg_draft = True        # decode big JPEGs at 1/2..1/8 scale (fast; >= image_size)
  c.input.workers = 0              # Grain worker processes (0: decode in this process)
  c.input.threads = 4              # decoding threads per process (PIL frees the GIL)
  c.input.prefetch = 2             # batches prepared ahead (per worker)

  c.model = ml_collections.ConfigDict()
  # B/16 and text B spelled out (not `variant`) so each field can be overridden from the CLI.
  c.model.image = dict(variant=None, patch_size=(16, 16), width=768, depth=12, mlp_dim=3072,
                       num_heads=12, pool_type="map", posemb="learn", scan=False,
                       remat_policy="none")
  c.model.text = dict(variant=None, width=768, depth=12, mlp_dim=3072, num_heads=12,
                      vocab_size=0,  # 0: taken from the tokenizer
                      pool_type="last", scan=False, remat_policy="none")
  c.model.out_dim = (None, 768)    # MAP image pooling, no image head; a text head (exports to HF)
  c.model.temperature_init = 10.0
  c.model.bias_init = -10.0
  c.model.dtype = "float32"        # "bfloat16" on GPUs/TPUs
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
  c.optim.schedule = dict(decay="cosine", warmup_steps=10_000, cooldown_steps=0,
                          end_lr_frac=0.0)
  c.optim.lr_mults = ()
  c.optim.frozen = ()

  c.mesh = (("data", -1),)
  c.sharding_rules = ((".*", "replicate"),)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 2
  c.checkpoint.keep_every = 0

  c.model_init = ""
  c.model_load = ml_collections.ConfigDict()
  c.model_load.dont_load = ()

  c.evals = ml_collections.ConfigDict()
  # A smoke check of the evaluation path only (128 of the demo's shapes at the run's image
  # size, run at the last step): add evaluators for your task (kind "zeroshot" / "retrieval").
  c.evals.shapes = dict(kind="shapes", every_steps=0, batch_size=256, num_heldout=64,
                        num_unseen=64)
  return c
