"""Every config key with its default: what configs start from and what the key check reads.

A file in `configs/` starts from `base()` and sets only its real choices (data, model, batch,
schedule). A key that `base()` does not have is unknown: `unknown_keys` names it with the
nearest known one, so `--config.input.batchsize=8` fails in a second instead of being ignored.
Keys without a sensible default (`total_steps`, `input.batch_size`) are 0 here, which the
config check refuses, so every config must set them.

Plain Python and ml_collections only: loading a config never imports JAX.
"""
import difflib

import ml_collections

# The blocks whose keys are free-form dicts, and the keys each may hold. Tower dicts are the
# keyword arguments of `models.ViT` / `models.TextTransformer` (tests hold the lists to them).
IMAGE_TOWER_KEYS = ("variant", "patch_size", "width", "depth", "mlp_dim", "num_heads",
                    "pool_type", "posemb", "scan", "remat_policy", "num_classes", "rep_size",
                    "head_zeroinit", "dtype", "attention_impl", "dtype_mm",
                    "posemb_grid")   # NaFlex: the learned position table's side
TEXT_TOWER_KEYS = ("variant", "width", "depth", "mlp_dim", "num_heads", "vocab_size",
                   "pool_type", "scan", "remat_policy", "num_classes", "dtype", "attention_impl",
                   "dtype_mm")
SCHEDULE_KEYS = ("decay", "warmup_steps", "cooldown_steps", "end_lr_frac", "timescale",
                 # continue_init: model_init's run's schedule from its step on, stretched over
                 # this run (SigLIP 2's NaFlex switch); the other two are what it resolves to.
                 "continue_init", "source_total_steps", "offset_steps")
MIXTURE_SPEC_KEYS = ("shards", "dir", "tfds_name", "split", "tfds_data_dir", "image_key",
                     "text_key", "region_key", "region_box_key", "region_caption_key",
                     "box_order")
# evals.<name>: keys by `kind` (the name is free; `kind` defaults to the name).
EVAL_KEYS = {
    "shapes": ("kind", "every_steps", "batch_size", "num_heldout", "num_unseen"),
    "shapes_naflex": ("kind", "every_steps", "batch_size", "num_heldout", "num_unseen",
                      "base_size"),
    "scenes": ("kind", "every_steps", "num_heldout", "num_unseen", "num_probe_train"),
    "zeroshot": ("kind", "every_steps", "batch_size", "prompts", "source", "path", "tfds_name",
                 "split", "data_dir", "image_key", "label_key", "class_names", "max_examples"),
    "retrieval": ("kind", "every_steps", "batch_size", "ks", "source", "path", "captions_file",
                  "tfds_name", "split", "data_dir", "image_key", "caption_key", "max_examples"),
}

B16_IMAGE = dict(variant=None, patch_size=(16, 16), width=768, depth=12, mlp_dim=3072,
                 num_heads=12, pool_type="map", posemb="learn", scan=False, remat_policy="none")
# SigLIP 2's distillation weights scale with the model: silc 1.0 and tips 0.25, times these.
SIZE_FACTORS = {"B": 0.25, "L": 0.5, "So400m": 1.0, "g": 0.5}
B_TEXT = dict(variant=None, width=768, depth=12, mlp_dim=3072, num_heads=12,
              vocab_size=0,  # 0: the tokenizer's
              pool_type="last", scan=False, remat_policy="none")


def base():
  """A ConfigDict holding every key the package reads, at its default."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 0                # required: set by every config
  c.log_every_steps = 100

  c.input = ml_collections.ConfigDict()
  c.input.data = "shapes"          # shapes (the demo) | webdataset | folder | tfds | synthetic
  c.input.batch_size = 0           # required: the global batch
  c.input.microbatches = 1         # K > 1: gradient caching over K micro-batches (microbatch.py)
  c.input.image_size = 224
  c.input.text_len = 64
  c.input.tokenizer = ""           # a SentencePiece .model; empty: the demo's
  c.input.lowercase = True
  c.input.strip_punctuation = False
  c.input.eos = "sticky"           # sticky (SigLIP) | append | none
  c.input.pad_id = -1              # -1: the EOS mode's default (sticky pads with EOS)
  c.input.shards = ""              # webdataset: GLOB, brace ranges, ','-joined
  c.input.dir = ""                 # folder: captions.jsonl, or a set written by `prepare`
  c.input.tfds_name = ""
  c.input.split = "train"
  c.input.tfds_data_dir = ""       # empty: TFDS's default
  c.input.image_key = "image"
  c.input.text_key = "captions/text"   # empty with region_key: the caption names the regions
  c.input.region_key = ""          # TFDS: the objects' field ("objects" in ref_coco); "": none
  c.input.region_box_key = "bbox"  # ... each object's box, in box_order ...
  c.input.region_caption_key = "refexp/raw"   # ... and its captions (each one a region)
  c.input.box_order = "yxyx"       # TFDS BBoxFeature: ymin xmin ymax xmax | xyxy
  c.input.mixture = ()             # ((kind, {"shards": GLOB} or {"dir": DIR}, weight), ...)
  c.input.max_image_bytes = 64 * 2**20   # a bigger image file is skipped, never read
  c.input.resize = "squash"        # squash (SigLIP) | crop (shorter side, then centre crop)
  c.input.resize_method = "bicubic"  # bicubic | bilinear
  c.input.random_crop = False      # Inception-style random resized crop ...
  c.input.crop_scale = (0.08, 1.0)  # ... of this area fraction
  c.input.flip = False             # random horizontal flip
  c.input.jpeg_draft = True        # decode big JPEGs at 1/2..1/8 scale (fast; >= image_size)
  c.input.workers = 0              # Grain worker processes (0: decode in this process)
  c.input.threads = 4              # decoding threads per process (PIL frees the GIL)
  c.input.prefetch = 2             # batches prepared ahead
  # The LocCa decoder's text and regions (objectives.locca).
  c.input.decoder_len = 64         # tokens a decoder pass holds (eos "append", pad id 0)
  c.input.loc_bins = 1024          # a box coordinate is one of this many location tokens
  c.input.max_regions = 16         # regions an example keeps (the rest are dropped, counted)
  # NaFlex (model.image_model = "proj.image_text.naflex_vit"): each image keeps its aspect ratio
  # and is resized to fit the step's patch budget, drawn from seq_lens by (seed, step).
  c.input.max_num_patches = 256    # the budget of the handle and the HF processor
  c.input.seq_lens = ()            # per-step budgets, e.g. (128, 256, 576, 784, 1024); (): max
  c.input.batch_size_by_len = ()   # ((length, global batch), ...): overrides input.batch_size

  c.model = ml_collections.ConfigDict()
  c.model.image_model = "vit"      # vit | proj.image_text.naflex_vit (NaFlex, SigLIP 2)
  c.model.image = dict(B16_IMAGE)
  c.model.text = dict(B_TEXT)
  c.model.out_dim = (None, 768)    # MAP image pooling, no image head; a text head (HF's shape)
  c.model.temperature_init = 10.0
  c.model.bias_init = -10.0
  c.model.dtype = "float32"        # "bfloat16" on GPUs/TPUs
  c.model.attention_impl = ""      # "" lets JAX pick; "cudnn" for fused attention on GPUs

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = "sigmoid_ring"     # sigmoid_ring | sigmoid_gather | sigmoid | softmax
  c.loss.bidirectional = False     # ring: half of each text block goes each way round

  # sum_k weight_k * loss_k, each on from start_fraction * total_steps (SigLIP 2's recipe).
  c.objectives = ml_collections.ConfigDict()
  c.objectives.contrastive = ml_collections.ConfigDict(dict(weight=1.0, start_fraction=0.0))
  c.objectives.locca = ml_collections.ConfigDict(dict(
      weight=0.0,                  # > 0 turns the decoder on (SigLIP 2: 1.0, as contrastive)
      start_fraction=0.0,
      width=0, depth=0, num_heads=0, mlp_dim=0,   # 0: the text tower's (depth: half of it)
      parallel_fraction=0.5,       # captions predicted in parallel from mask tokens (CapPa)
      vocab_chunk=8192))           # cross-entropy chunk over the vocabulary
  # SigLIP 2, stage B (objectives/distill.py): from start_fraction on, against an EMA teacher.
  # SigLIP 2's weights: silc 1.0 and tips 0.25, each times SIZE_FACTORS[variant].
  distill_head = dict(head_hidden=2048, head_bottleneck=256, student_temp=0.1,
                      teacher_temp=0.04, center_momentum=0.9,
                      head_lr_mult=1.0)        # lr multiplier of the new head (and mask token)
  c.objectives.silc = ml_collections.ConfigDict(dict(
      weight=0.0, start_fraction=0.8, head_dim=65536, **distill_head,
      n_local=8,                   # local crops the student sees per image ...
      local_size=96,               # ... of this many pixels a side ...
      local_scale=(0.05, 0.4)))    # ... cut from this area fraction of the image
  c.objectives.tips = ml_collections.ConfigDict(dict(
      weight=0.0, start_fraction=0.8, head_dim=8192, **distill_head,
      mask_ratio=0.5))             # the student's patches of the global view replaced by a token
  c.objectives.teacher = ml_collections.ConfigDict(dict(
      momentum=0.996,              # teacher = m * teacher + (1 - m) * student, every update
      momentum_schedule="constant",   # constant | cosine (DINO's: m -> 1.0 at the last step)
      global_size=0,               # the global view's side; 0: input.image_size
      global_scale=(0.4, 1.0),     # its area fraction of the image
      flip=True,                   # random horizontal flips of every view
      color_jitter=0.0))           # brightness, contrast, saturation jitter strength in [0, 1]

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"           # adamw | adafactor
  c.optim.lr = 1e-3
  c.optim.wd = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0
  c.optim.schedule = dict(decay="cosine", warmup_steps=0, cooldown_steps=0, end_lr_frac=0.0)
  c.optim.lr_mults = ()            # ((regex, multiplier), ...)
  c.optim.frozen = ()              # (regex, ...): e.g. ("img/.*",) for LiT

  c.mesh = (("data", -1),)
  c.sharding_rules = ((".*", "replicate"),)   # ((regex, "replicate" | "fsdp" | "fsdp:AXIS"),)
  c.fsdp_min_size_mb = 4.0         # FSDP rules leave smaller arrays replicated (big_vision's)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 2
  c.checkpoint.keep_every = 0      # 0: keep no extra checkpoints for good

  c.model_init = ""                # a workdir, checkpoint or big_vision .npz to start from
  c.model_load = ml_collections.ConfigDict()
  c.model_load.dont_load = ()      # regexes of params that keep their fresh init

  c.peak_tflops = 0.0              # per device, for perf/mfu; 0: from flops.PEAK_TFLOPS
  c.profile_steps = ""             # "N,M": a jax.profiler trace of steps N..M in DIR/profile/

  c.evals = ml_collections.ConfigDict()
  return c


# ------------------------------------------------------------------------------ key checking

def dotted_keys(node, prefix=""):
  out = []
  for key in node.keys():
    name = f"{prefix}{key}"
    out.append(name)
    value = node[key]
    if isinstance(value, ml_collections.ConfigDict) and key != "evals":
      out.extend(dotted_keys(value, name + "."))
  return out


def known_keys():
  """Every dotted key a config may hold (free-form blocks: their known inner keys)."""
  keys = set(dotted_keys(base()))
  keys |= {f"model.image.{k}" for k in IMAGE_TOWER_KEYS}
  keys |= {f"model.text.{k}" for k in TEXT_TOWER_KEYS}
  keys |= {f"optim.schedule.{k}" for k in SCHEDULE_KEYS}
  return keys


def nearest(key, candidates):
  """The known key closest to a misspelled one, or None."""
  close = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.6)
  if not close:   # a right leaf under a wrong block: compare the last part only
    leaf = key.rpartition(".")[2]
    leaves = {c.rpartition(".")[2]: c for c in sorted(candidates)}
    close = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.8)]
  return close[0] if close else None


def _items(node):
  return node.items() if hasattr(node, "items") else ()


def unknown_keys(config):
  """[(dotted key, nearest known key or None)] for every key `config` holds that nothing reads."""
  known = known_keys()
  found = []

  def walk(node, prefix):
    for key, value in _items(node):
      name = f"{prefix}{key}"
      if name == "evals":
        for ev_name, ev in _items(value):
          kind = ev.get("kind", ev_name) if hasattr(ev, "get") else ev_name
          allowed = EVAL_KEYS.get(kind, ())   # an unknown kind is its own error
          for k, _ in _items(ev):
            if allowed and k not in allowed:
              near = nearest(k, allowed)
              found.append((f"evals.{ev_name}.{k}", near and f"evals.{ev_name}.{near}"))
      elif name not in known:
        found.append((name, nearest(name, known)))
      elif hasattr(value, "items"):
        walk(value, name + ".")
    for entry in (node.get("mixture", ()) or ()) if prefix == "input." else ():
      spec = entry[1] if len(entry) == 3 and hasattr(entry[1], "items") else {}
      for k in spec:
        if k not in MIXTURE_SPEC_KEYS:
          near = nearest(k, MIXTURE_SPEC_KEYS)
          found.append((f"input.mixture[].{k}", near and f"input.mixture[].{near}"))

  walk(config, "")
  return found


def complete(config):
  """Adds every key `config` lacks, at its default, in place (nested blocks included; the
  free-form blocks, towers and schedule, are left as written). Returns `config`."""
  def fill(node, defaults, prefix):
    for key, value in _items(defaults):
      name = f"{prefix}{key}"
      if key not in node:
        node[key] = value
      elif (isinstance(value, ml_collections.ConfigDict) and hasattr(node[key], "keys")
            and name not in ("model.image", "model.text", "optim.schedule", "evals")):
        fill(node[key], value, name + ".")

  if isinstance(config, ml_collections.ConfigDict):
    with config.unlocked():
      fill(config, base(), "")
  else:
    fill(config, base(), "")
  return config
