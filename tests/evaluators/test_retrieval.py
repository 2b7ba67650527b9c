"""Retrieval recall@k against a loop-by-loop numpy computation, and a captions-folder run."""
import json

import numpy as np
import pytest
from PIL import Image

from siglip_jax.evaluators import retrieval


def _dot(a, b):
  return sum(float(x) * float(y) for x, y in zip(a, b))


def _brute(image_emb, text_emb, owner, k):
  """Loops only. i2t: some own caption has fewer than k captions strictly above it;
  t2i: fewer than k images strictly above the caption's own image."""
  n, m = len(image_emb), len(text_emb)
  i2t_hits = i2t_total = 0
  for i in range(n):
    own = [j for j in range(m) if owner[j] == i]
    if not own:
      continue
    i2t_total += 1
    scores = [_dot(image_emb[i], text_emb[j]) for j in range(m)]
    best = max(scores[j] for j in own)
    i2t_hits += sum(1 for j in range(m) if scores[j] > best) < k
  t2i_hits = 0
  for j in range(m):
    scores = [_dot(image_emb[i], text_emb[j]) for i in range(n)]
    t2i_hits += sum(1 for i in range(n) if scores[i] > scores[owner[j]]) < k
  return i2t_hits / i2t_total, t2i_hits / m


def _data(seed, n=23, d=5):
  rng = np.random.default_rng(seed)
  image_emb = rng.integers(-2, 3, (n, d)).astype(np.float32) / 4   # dyadic: exact dot products
  image_emb[4] = image_emb[3]                     # two identical images: t2i ties
  owner = np.concatenate([np.repeat(np.arange(n), rng.integers(1, 5, n))])   # 1-4 captions each
  owner = owner[owner != 7]                       # image 7 has no caption at all
  text_emb = rng.integers(-2, 3, (len(owner), d)).astype(np.float32) / 4
  text_emb[1] = text_emb[0]                       # duplicate captions: i2t ties
  text_emb[-1] = 0                                # a caption tied with every image
  perm = rng.permutation(len(owner))              # captions not grouped by image
  return image_emb, text_emb[perm], owner[perm]


@pytest.mark.parametrize("seed,chunk", [(0, 1024), (1, 4), (2, 1)])
def test_recall_matches_brute_force_with_ties_and_several_captions(seed, chunk):
  image_emb, text_emb, owner = _data(seed)
  got = retrieval.recall_at_k(image_emb, text_emb, owner, ks=(1, 3, 5, 10), chunk=chunk)
  for k in (1, 3, 5, 10):
    i2t, t2i = _brute(image_emb, text_emb, owner, k)
    assert got[f"i2t_r{k}"] == pytest.approx(i2t), k
    assert got[f"t2i_r{k}"] == pytest.approx(t2i), k


def test_bad_owner_rejected():
  with pytest.raises(ValueError):
    retrieval.recall_at_k(np.ones((2, 3)), np.ones((2, 3)), [0, 2])


class _Model:
  image_size = 8

  def __init__(self, words):
    self.words = words

  def encode_image(self, images):   # an image's embedding: one-hot of its brightest channel
    return np.eye(3, dtype=np.float32)[images.mean((1, 2)).argmax(1)]

  def encode_strings(self, texts):
    return np.stack([np.eye(3, dtype=np.float32)[
        next(i for i, w in enumerate(self.words) if w in t)] for t in texts])


def test_captions_folder_end_to_end(tmp_path):
  colours = {"red": (250, 0, 0), "green": (0, 250, 0), "blue": (0, 0, 250)}
  rows = []
  for name, rgb in colours.items():
    Image.new("RGB", (12, 9), rgb).save(tmp_path / f"{name}.png")
    rows.append({"image": f"{name}.png", "captions": [f"a {name} square", f"all {name}"]})
  rows.append({"image": "red.png", "caption": "more red"})   # one string, not a list
  (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  ev = retrieval.from_config("caps", dict(kind="retrieval", path=str(tmp_path), batch_size=2,
                                          ks=(1, 5)))
  got = ev.run(_Model(list(colours)))
  # The fourth image is red.png again: it ties with the first, in the model's favour.
  assert got == {"caps/retrieval_i2t_r1": 1.0, "caps/retrieval_t2i_r1": 1.0,
                 "caps/retrieval_i2t_r5": 1.0, "caps/retrieval_t2i_r5": 1.0}
  brute = _brute(np.eye(3)[[0, 1, 2, 0]], np.eye(3)[[0, 0, 1, 1, 2, 2, 0]],
                 [0, 0, 1, 1, 2, 2, 3], 1)
  assert brute == (1.0, 1.0)
