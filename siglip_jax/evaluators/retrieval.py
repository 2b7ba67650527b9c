"""Image-text retrieval recall@k both ways, with several captions per image.

Image -> text: an image is right at k when one of its own captions is among the k best texts;
text -> image: a caption is right at k when its image is among the k best images. Ties count
in the model's favour (fewer than k candidates strictly better).

`RetrievalEvaluator` runs it over any captioned source (evaluators.sources), encoding images and
their captions batch by batch; metrics `<name>/retrieval_{i2t,t2i}_r{1,5,10}`.
"""
import numpy as np

from siglip_jax.evaluators import sources

# Images per block of the score matrix: 5k images x 25k captions (COCO) never sit in memory whole.
_CHUNK = 1024


def recall_at_k(image_emb, text_emb, text_to_image, ks=(1, 5, 10), chunk=_CHUNK):
  """Returns {"i2t_r{k}": ..., "t2i_r{k}": ...}.

  image_emb [N, D], text_emb [M, D], text_to_image [M] (index of each caption's image).
  Images without a caption are left out of i2t; they still compete in t2i."""
  image_emb = np.asarray(image_emb, np.float32)
  text_emb = np.asarray(text_emb, np.float32)
  owner = np.asarray(text_to_image)
  n_img, n_txt = len(image_emb), len(text_emb)
  if owner.shape != (n_txt,) or owner.min(initial=0) < 0 or owner.max(initial=0) >= n_img:
    raise ValueError("text_to_image must give, for each caption, the index of its image")
  blocks = [slice(s, min(s + chunk, n_img)) for s in range(0, n_img, chunk)]
  # Pass 1: each caption's score with its own image, read off the same matmul blocks that pass
  # 2 compares against (recomputing it as a row dot product could differ in the last bit and
  # turn a tie into a loss); and the image -> text ranks.
  t2i_true = np.empty(n_txt, np.float32)
  i2t_rank = np.zeros(n_img, np.int64)
  for blk in blocks:
    scores = image_emb[blk] @ text_emb.T                      # [c, M]
    rows = np.arange(blk.start, blk.stop)
    own = owner[None, :] == rows[:, None]                     # caption j belongs to image i
    best_own = np.where(own, scores, -np.inf).max(1)          # best score of own captions
    i2t_rank[blk] = (scores > best_own[:, None]).sum(1)
    mine = (owner >= blk.start) & (owner < blk.stop)
    t2i_true[mine] = scores[owner[mine] - blk.start, np.nonzero(mine)[0]]
  # Pass 2: images scoring strictly above each caption's own image.
  t2i_rank = np.zeros(n_txt, np.int64)
  for blk in blocks:
    t2i_rank += (image_emb[blk] @ text_emb.T > t2i_true[None, :]).sum(0)
  has_caption = np.bincount(owner, minlength=n_img) > 0
  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = float(np.mean(i2t_rank[has_caption] < k))
    out[f"t2i_r{k}"] = float(np.mean(t2i_rank < k))
  return out


class RetrievalEvaluator:
  """R@k both ways over a source whose `batches(bs, size)` yields (images, [captions])."""

  def __init__(self, source, *, every_steps=0, prefix="retrieval", batch_size=256,
               ks=(1, 5, 10)):
    self.source, self.every_steps, self.prefix = source, int(every_steps or 0), prefix
    self.batch_size, self.ks = int(batch_size), tuple(ks)

  def run(self, model):
    """`model`: a `siglip_jax.inference.SigLIP` handle (encode_image, encode_strings)."""
    images, texts, owner = [], [], []
    for batch, captions in self.source.batches(self.batch_size, model.image_size):
      first = sum(map(len, images))
      images.append(model.encode_image(batch))
      flat = [c for caps in captions for c in caps]
      owner += [first + i for i, caps in enumerate(captions) for _ in caps]
      if flat:
        texts.append(model.encode_strings(flat))
    if not texts:
      raise ValueError(f"{self.prefix}: the retrieval source has no captioned images")
    recall = recall_at_k(np.concatenate(images), np.concatenate(texts), np.asarray(owner),
                         ks=self.ks)
    return {f"{self.prefix}/retrieval_{k}": v for k, v in recall.items()}


def from_config(name, cfg):
  """`config.evals.<name> = dict(kind="retrieval", every_steps=N, source="folder"|"tfds",
  path=..., captions_file="captions.jsonl", tfds_name=..., split=..., image_key="image",
  caption_key="captions/text", batch_size=256, max_examples=0, ks=(1, 5, 10))`."""
  return RetrievalEvaluator(sources.caption_source(cfg), every_steps=cfg.get("every_steps", 0),
                            prefix=name, batch_size=cfg.get("batch_size", 256),
                            ks=tuple(cfg.get("ks", (1, 5, 10))))
