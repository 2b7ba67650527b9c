"""Analytic FLOPs of a two-tower train step, and peak FLOP/s per chip: the two halves of MFU.

Counted: every matmul of both towers (patch embedding, Q/K/V/out projections, the two attention
matmuls, MLPs, the MAP head, the projection heads) and the B x B similarity of the loss, at
2 FLOPs per multiply-add. Not counted: LayerNorm, GELU, softmax, residual adds, the embedding
lookup and the optimizer, which are a few percent at real sizes (the test holds the count within
10% of XLA's own cost analysis). A train step is 3x the forward (backward = 2x forward), the
usual MFU convention (PaLM, appendix B), so MFU compares like with like across code bases. The
same 3x holds for a frozen tower (LiT), which really skips its backward pass: there the figure
overstates the work done, as model-FLOPs MFU does in other code bases too.

Hardware FLOPs (`hw_train_flops_per_pair`) add what the step really computes twice: the blocks
a remat policy recomputes in the backward, and gradient caching's extra tower forward.
"""
import re

TRAIN_MULTIPLIER = 3  # forward + backward (two matmuls per forward matmul)


def _pair(v):
  return (int(v), int(v)) if isinstance(v, int) else tuple(int(s) for s in v)


def encoder_flops(tokens, width, depth, mlp_dim, num_heads=None):
  """Forward FLOPs of `depth` pre-LN blocks on one sequence of `tokens` tokens."""
  del num_heads  # the attention matmuls cost the same whatever the split into heads
  proj = 4 * 2 * tokens * width * width          # query, key, value, out
  attn = 2 * 2 * tokens * tokens * width         # q @ k^T and weights @ v, all heads together
  mlp = 2 * 2 * tokens * width * mlp_dim
  return depth * (proj + attn + mlp)


def map_head_flops(tokens, width, mlp_dim):
  """Forward FLOPs of the MAP head: one learned query attends over `tokens`, then an MLP."""
  q_and_out = 2 * 2 * width * width              # one query token: query and out projections
  kv = 2 * 2 * tokens * width * width
  attn = 2 * 2 * tokens * width
  return q_and_out + kv + attn + 2 * 2 * width * mlp_dim


def _pool_flops(pool_type, tokens, width, mlp_dim):
  return map_head_flops(tokens, width, mlp_dim) if pool_type == "map" else 0


def image_tower_flops(*, image_size, patch_size, width, depth, mlp_dim, num_heads=None,
                      pool_type="map", out_dim=None):
  """Forward FLOPs of the ViT for one image."""
  h, w = _pair(image_size)
  ph, pw = _pair(patch_size)
  tokens = (h // ph) * (w // pw)
  embed = 2 * tokens * ph * pw * 3 * width
  if pool_type == "tok":
    tokens += 1
  mlp_dim = mlp_dim or 4 * width
  head = 2 * width * out_dim if out_dim else 0
  return (embed + encoder_flops(tokens, width, depth, mlp_dim)
          + _pool_flops(pool_type, tokens, width, mlp_dim) + head)


def text_tower_flops(*, text_len, width, depth, mlp_dim, num_heads=None, pool_type="last",
                     out_dim=None):
  """Forward FLOPs of the text transformer for one text (the embedding lookup is free)."""
  mlp_dim = mlp_dim or 4 * width
  head = 2 * width * out_dim if out_dim else 0
  return (encoder_flops(text_len, width, depth, mlp_dim)
          + _pool_flops(pool_type, text_len, width, mlp_dim) + head)


def decoder_flops(*, tokens, width, depth, mlp_dim, image_tokens, image_width, vocab,
                  fourier=16):
  """Forward FLOPs of the LocCa decoder on one example's `tokens` (all its passes side by side:
  the self-attention matmuls run over all of them, masked) reading `image_tokens` patch tokens
  of width `image_width`; the vocabulary head over every position (chunked, all computed)."""
  self_attn = 4 * 2 * tokens * width * width + 2 * 2 * tokens * tokens * width
  cross = (2 * 2 * tokens * width * width + 2 * 2 * image_tokens * image_width * width
           + 2 * 2 * tokens * image_tokens * width)
  mlp = 2 * 2 * tokens * width * mlp_dim
  return (depth * (self_attn + cross + mlp) + 2 * tokens * fourier * width
          + 2 * tokens * width * vocab)


def image_tokens(image_size, patch_size, pool_type="map"):
  h, w = _pair(image_size)
  ph, pw = _pair(patch_size)
  return (h // ph) * (w // pw) + (1 if pool_type == "tok" else 0)


def loss_flops_per_pair(global_batch, emb_dim):
  """Each pair's row of the global B x B logit matrix (ring or gathered: the same count)."""
  return 2 * global_batch * emb_dim


def _tower_dims(model):
  """Resolved kwargs for image_tower_flops / text_tower_flops of a `models.TwoTowers`."""
  from siglip_jax.models.text import TextTransformer  # models is ground floor; imported lazily
  from siglip_jax.models.two_towers import pair_of_out_dims
  from siglip_jax.models.vit import ViT
  out_dim = pair_of_out_dims(model.out_dim)
  img_cfg = dict(model.image or {})
  txt_cfg = dict(model.text or {})
  img = ViT(**{k: v for k, v in img_cfg.items() if k in ViT.__dataclass_fields__}).dims
  txt = TextTransformer(**{k: v for k, v in txt_cfg.items()
                           if k in TextTransformer.__dataclass_fields__}).dims
  img["pool_type"] = img_cfg.get("pool_type", "map")
  txt["pool_type"] = txt_cfg.get("pool_type", "last")
  img["out_dim"] = img_cfg.get("num_classes", out_dim[0])   # a tower's own setting wins
  txt["out_dim"] = txt_cfg.get("num_classes", out_dim[1])
  return img, txt


def towers_forward_flops(model, *, image_size, text_len):
  """Forward FLOPs of both towers (pooling and heads included) for one image-text pair."""
  img, txt = _tower_dims(model)
  return (image_tower_flops(image_size=image_size, **img)
          + text_tower_flops(text_len=text_len, **txt))


def forward_flops_per_pair(model, *, image_size, text_len, global_batch):
  """Forward FLOPs for one image-text pair of a `TwoTowers` model, loss included."""
  _, txt = _tower_dims(model)
  emb_dim = txt["out_dim"] or txt["width"]
  return (towers_forward_flops(model, image_size=image_size, text_len=text_len)
          + loss_flops_per_pair(global_batch, emb_dim))


def train_flops_per_pair(model, *, image_size, text_len, global_batch, objectives=()):
  """FLOPs of one train step divided by the global batch (forward + backward), with what the
  objectives besides the contrastive loss add (`forward_flops`: the LocCa decoder's)."""
  img, _ = _tower_dims(model)
  extra = sum(o.forward_flops(image_tokens=image_tokens(image_size, img["patch_size"],
                                                        img["pool_type"]),
                              image_width=img["width"]) for o in objectives)
  return TRAIN_MULTIPLIER * (forward_flops_per_pair(
      model, image_size=image_size, text_len=text_len, global_batch=global_batch) + extra)


def remat_flops(policy, *, tokens, width, depth, mlp_dim):
  """Forward FLOPs the backward of `depth` blocks recomputes under remat policy `policy` (a
  `jax.checkpoint_policies` name, "none" = no remat; models/transformer.py `policy_from_name`).

  "none" and "everything_saveable": nothing. Policies saving every dot ("dots_saveable",
  "checkpoint_dots"): no matmul, only elementwise work (not counted). Those saving only dots
  without batch dimensions ("..._no_batch_dims..."): the two attention matmuls (batched over
  heads). Any other ("nothing_saveable"): each block's forward less its MLP's out projection,
  whose output the backward never reads (XLA drops it; tests/test_flops.py checks both counts
  against XLA's cost analysis)."""
  policy = policy or "none"
  if policy in ("none", "everything_saveable"):
    return 0
  if "dots" in policy:
    return depth * 2 * 2 * tokens * tokens * width if "no_batch_dims" in policy else 0
  return encoder_flops(tokens, width, depth, mlp_dim) - depth * 2 * tokens * width * mlp_dim


def _remat_policies(model):
  """(image, text) remat policy names: a tower's own setting, else its module's default."""
  from siglip_jax.models.text import TextTransformer
  from siglip_jax.models.two_towers import IMAGE_MODELS
  default = lambda cls: cls.__dataclass_fields__["remat_policy"].default  # noqa: E731
  return (dict(model.image or {}).get("remat_policy",
                                      default(IMAGE_MODELS[model.image_model])),
          dict(model.text or {}).get("remat_policy", default(TextTransformer)))


def hw_train_flops_per_pair(model, *, image_size, text_len, global_batch, objectives=(),
                            microbatches=1):
  """Hardware FLOPs of one train step per pair: `train_flops_per_pair` (model FLOPs, no credit
  for recomputation) plus what the step computes again:

  - remat: each tower's `remat_flops` under its `remat_policy` (once: the backward recomputes
    each block once, in pass 2 too);
  - `microbatches` K > 1 (gradient caching, siglip_jax/microbatch.py): one more forward of both
    towers, pooling and heads included (pass 1 computes the embeddings without gradient, pass 2
    computes them again with it); the loss, the LocCa decoder and the teacher run once.

  Not counted: the remat of the image tower's passes over SILC/TIPS views, and a frozen
  tower's backward skipped (as in the model count)."""
  img, txt = _tower_dims(model)
  img_policy, txt_policy = _remat_policies(model)
  recompute = (
      remat_flops(img_policy, tokens=image_tokens(image_size, img["patch_size"],
                                                  img["pool_type"]),
                  width=img["width"], depth=img["depth"],
                  mlp_dim=img["mlp_dim"] or 4 * img["width"])
      + remat_flops(txt_policy, tokens=text_len, width=txt["width"], depth=txt["depth"],
                    mlp_dim=txt["mlp_dim"] or 4 * txt["width"]))
  if int(microbatches) > 1:
    recompute += towers_forward_flops(model, image_size=image_size, text_len=text_len)
  return recompute + train_flops_per_pair(model, image_size=image_size, text_len=text_len,
                                          global_batch=global_batch, objectives=objectives)


# Dense bf16 peak TFLOP/s per chip (per JAX device), from the vendors' data sheets. Matched as
# regexes against `jax.Device.device_kind`, first match wins, so the specific names come first.
# A float32 model on a GPU runs at a fraction of these (TF32 on an H100: half): MFU is quoted
# against the bf16 peak as everyone does; pass --config.peak_tflops for another reference.
PEAK_TFLOPS = (
    (r"TPU v6 ?(lite|e)", 918.0),
    (r"TPU v5 ?(lite|e)", 197.0),
    (r"TPU v5p?$", 459.0),
    (r"TPU v4", 275.0),
    (r"H200", 989.0),
    (r"H100.*PCIe", 756.0),
    (r"H100", 989.0),
    (r"A100", 312.0),
)


def peak_tflops(device_kind, override=0.0):
  """Peak TFLOP/s of one device: `override` when > 0, else the table's, else None (CPUs: the
  figure depends on the host and on how many simulated devices share its cores)."""
  if override and float(override) > 0:
    return float(override)
  for pattern, value in PEAK_TFLOPS:
    if re.search(pattern, device_kind or "", re.IGNORECASE):
      return value
  return None
