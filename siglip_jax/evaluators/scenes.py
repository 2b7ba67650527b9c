"""The scenes demo's evaluators: referring expressions, grounded captions, captions, retrieval.

On held-out scenes of seen colour-shape pairs (the same names with `_unseen` on scenes of
never-seen pairs, reported without a target), with greedy decoding (jitted, batched):

- `scenes/refexp_acc50`: share of region captions, in scenes of 2 or more objects, whose decoded
  box has IoU >= 0.5 with the true box; `scenes/refexp_const_acc50`: the best single constant
  box's score on the same set (what a model that ignores the image gets).
- `scenes/grounded_acc`: share of boxes, in scenes of 2 or more objects, whose decoded caption
  names exactly that object's colour and shape and no other colour or shape.
- `scenes/caption_acc`: share of images whose decoded caption's multiset of (colour, shape)
  pairs equals the scene's.
- `scenes/retrieval_i2t_r1`, `scenes/retrieval_t2i_r1`: the towers, image captions.
- `scenes/dense_miou`, `scenes/dense_acc` (held-out only, any model): a linear probe on the
  image tower's patch tokens, fitted on the first `num_probe_train` training scenes
  (`dense.py`).
"""
import collections

import numpy as np

from siglip_jax.data import preprocess, scenes
from siglip_jax.evaluators import dense, retrieval


def iou(a, b):
  """IoU of boxes [..., 4] (x0, y0, x1, y1), broadcasting."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = w * h
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
  return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def best_constant_box_acc(boxes, grid=16):
  """The highest share of `boxes` [N, 4] that one constant box (corners on a `grid`-step
  lattice of [0, 1]) reaches IoU >= 0.5 with."""
  edges = np.linspace(0, 1, grid + 1)
  x0, y0, x1, y1 = np.meshgrid(edges, edges, edges, edges, indexing="ij")
  keep = (x1 > x0) & (y1 > y0)
  cands = np.stack([x0[keep], y0[keep], x1[keep], y1[keep]], -1)
  best = 0.0
  for start in range(0, len(cands), 4096):
    hits = iou(cands[start:start + 4096, None, :], np.asarray(boxes)[None]) >= 0.5
    best = max(best, float(hits.mean(1).max()))
  return best


def names_exactly(text, pair):
  """True when `text` names the colour-shape `pair` and no other colour or shape word."""
  pairs, other = scenes.parse_pairs(text)
  return pairs == [tuple(pair)] and not other


def same_pairs(text, pairs):
  found, _ = scenes.parse_pairs(text)
  return collections.Counter(found) == collections.Counter(map(tuple, pairs))


class ScenesEvaluator:

  def __init__(self, dataset, *, every_steps, prefix="scenes", num_probe_train=1024):
    """`num_probe_train`: training scenes the dense probe fits on (0: no dense metrics)."""
    self.dataset, self.every_steps, self.prefix = dataset, int(every_steps), prefix
    self.num_probe_train = int(num_probe_train)
    self._probe_train = None   # (images, class maps), rendered once

  def _split(self, name):
    split = self.dataset.eval_split(name)
    images = preprocess.to_float(np.stack([s["image"] for s in split]))
    return split, images

  def _one(self, model, name):
    split, images = self._split(name)
    out = {}
    zimg = model.encode_image(images)
    ztxt = model.encode_strings([s["texts"] for s in split])
    recall = retrieval.recall_at_k(zimg, ztxt, range(len(split)), ks=(1,))
    out["retrieval_i2t_r1"], out["retrieval_t2i_r1"] = recall["i2t_r1"], recall["t2i_r1"]
    if not model.has_decoder:   # SigLIP 1 on scenes (locca off): the towers' metrics only
      return out
    captions = model.caption(images)
    out["caption_acc"] = float(np.mean([same_pairs(c, s["pairs"])
                                        for c, s in zip(captions, split)]))
    rows = [(i, r, pair) for i, s in enumerate(split) if len(s["regions"]) >= 2
            for r, pair in zip(s["regions"], s["pairs"])]
    if rows:
      idx = np.array([i for i, _, _ in rows])
      true = np.array([r["box"] for _, r, _ in rows])
      boxes = model.locate(images[idx], [r["caption"] for _, r, _ in rows])
      out["refexp_acc50"] = float(np.mean(iou(boxes, true) >= 0.5))
      out["refexp_const_acc50"] = best_constant_box_acc(true)
      texts = model.describe(images[idx], true)
      out["grounded_acc"] = float(np.mean([names_exactly(t, pair)
                                           for t, (_, _, pair) in zip(texts, rows)]))
    return out

  def _dense(self, model):
    if self._probe_train is None:
      rows = [s for start in range(0, self.num_probe_train, 256) for s in
              self.dataset.train_scenes(range(start, min(self.num_probe_train, start + 256)))]
      self._probe_train = (preprocess.to_float(np.stack([s["image"] for s in rows])),
                           np.stack([s["class_map"] for s in rows]))
    split, images = self._split("heldout")
    num_classes = 1 + len(scenes.COLORS) * len(scenes.SHAPES)
    return dense.evaluate(model, *self._probe_train, images,
                          np.stack([s["class_map"] for s in split]), num_classes)

  def run(self, model):
    """`model`: an inference handle; the decoder's metrics need one with a decoder (`caption`,
    `locate`, `describe`), the retrieval and dense ones do not."""
    results = {}
    for split, suffix in (("heldout", ""), ("unseen", "_unseen")):
      for k, v in self._one(model, split).items():
        results[f"{self.prefix}/{k}{suffix}"] = v
    if self.num_probe_train > 0:
      for k, v in self._dense(model).items():
        results[f"{self.prefix}/{k}"] = v
    return results
