"""The embedded demo data set: determinism, splits, the unseen pairs, value ranges."""
import re

import numpy as np
import pytest

from siglip_jax.data import shapes
from siglip_jax.data.preprocess import to_float
from siglip_jax.data.shapes import ShapesDataset


@pytest.fixture(scope="module")
def ds():
  return ShapesDataset(seed=0, image_size=32, num_heldout=256, num_unseen=128)


@pytest.fixture(scope="module")
def train5k(ds):
  return ds.train_examples(np.arange(5000))


def test_classes(ds):
  assert len(ds.colors) >= 8 and len(ds.shapes) >= 8
  assert ds.num_classes == len(ds.class_names) == len(ds.colors) * len(ds.shapes)
  assert len(set(ds.class_names)) == ds.num_classes
  assert ds.class_names[0] == f"{ds.colors[0]} {ds.shapes[0]}"
  assert len(shapes.UNSEEN_PAIRS) >= 8
  unseen = {f"{c} {s}" for c, s in shapes.UNSEEN_PAIRS}
  assert {ds.class_names[k] for k in ds.unseen_class_ids} == unseen
  assert sorted(np.r_[ds.seen_class_ids, ds.unseen_class_ids]) == list(range(ds.num_classes))
  # Every colour and every shape keeps partners in training.
  seen = [ds.class_names[k].split() for k in ds.seen_class_ids]
  assert {c for c, _ in seen} == set(ds.colors) and {s for _, s in seen} == set(ds.shapes)


def test_deterministic(ds):
  idx = np.array([0, 7, 123456, 3, 3])
  a = ds.train_examples(idx)
  b = ShapesDataset(seed=0, image_size=32).train_examples(idx)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])
  assert a["text"] == b["text"]
  np.testing.assert_array_equal(a["image"][3], a["image"][4])  # same index, same example
  c = ShapesDataset(seed=1, image_size=32).train_examples(idx)
  assert not np.array_equal(a["image"], c["image"])


def test_batch_split_invariant(ds):
  """A global batch rendered at once equals the concatenation of per-process slices."""
  idx = np.arange(1000, 1064)
  whole = ds.train_examples(idx)
  parts = [ds.train_examples(idx[p::2]) for p in range(2)]  # strided, like a process slice
  for p in range(2):
    np.testing.assert_array_equal(whole["image"][p::2], parts[p]["image"])
    np.testing.assert_array_equal(whole["label"][p::2], parts[p]["label"])
    assert whole["text"][p::2] == parts[p]["text"]
  halves = [ds.train_examples(idx[:32]), ds.train_examples(idx[32:])]
  np.testing.assert_array_equal(whole["image"], np.concatenate([h["image"] for h in halves]))


def test_format(ds):
  for size in (24, 32, 64):
    ex = ShapesDataset(seed=3, image_size=size).train_examples(np.arange(8))
    assert ex["image"].shape == (8, size, size, 3) and ex["image"].dtype == np.uint8
    assert ex["image"].min() < 64 and ex["image"].max() > 192   # dark background, bright shape
    assert ex["label"].shape == (8,) and ex["label"].dtype == np.int32
    assert len(ex["text"]) == 8 and all(isinstance(t, str) and t for t in ex["text"])
  assert ds.train_examples([])["image"].shape == (0, 32, 32, 3)
  held = ds.eval_split("heldout")["image"]
  assert held.dtype == np.float32 and held.min() >= -1 and held.max() <= 1
  # Evaluation images are uint8 pixels too, as the loader maps them to floats.
  np.testing.assert_array_equal(to_float(np.rint((held + 1) * 127.5).astype(np.uint8)), held)


def test_quantize_rounds_to_the_nearest_level():
  x = np.array([-0.2, 0.0, 0.5 / 255 - 1e-4, 0.5 / 255 + 1e-4, 0.5, 254.6 / 255, 1.0, 1.3])
  np.testing.assert_array_equal(shapes.quantize(x), [0, 0, 0, 1, 128, 255, 255, 255])


def test_unseen_pairs_never_in_training(ds, train5k):
  labels = train5k["label"]
  assert not np.isin(labels, ds.unseen_class_ids).any()
  assert set(labels.tolist()) == set(ds.seen_class_ids.tolist())  # all seen classes occur
  for text, label in zip(train5k["text"], labels):
    color, shape = ds.class_names[label].split()
    words = re.findall(r"[a-z]+", text)
    assert color in words and shape in words, text
    # No other colour or shape word is mentioned, so no caption names an unseen pair.
    assert not set(words) & (set(ds.colors) - {color}) and not set(words) & (set(ds.shapes) - {shape})


def test_caption_variety(train5k):
  assert len(shapes.CAPTION_TEMPLATES) >= 6
  skeletons = set()
  for t in train5k["text"]:
    for w in shapes.COLORS + shapes.SHAPES + shapes.SIZE_WORDS:
      t = re.sub(rf"\b{w}\b", "_", t)
    skeletons.add(re.sub(r"\ban\b", "a", t))
  assert len(skeletons) == len(shapes.CAPTION_TEMPLATES)
  assert any(re.search(r"\ban orange\b", t) for t in train5k["text"])  # article agrees


def test_eval_splits(ds, train5k):
  held, unseen = ds.eval_split("heldout"), ds.eval_split("unseen")
  assert held["image"].shape == (256, 32, 32, 3) and unseen["image"].shape == (128, 32, 32, 3)
  assert set(held["label"].tolist()) == set(ds.seen_class_ids.tolist())
  assert set(unseen["label"].tolist()) == set(ds.unseen_class_ids.tolist())
  assert np.bincount(unseen["label"]).max() - np.bincount(unseen["label"])[
      ds.unseen_class_ids].min() == 0  # balanced
  assert ds.eval_split("heldout") is held  # cached: rendered once
  again = ShapesDataset(seed=0, image_size=32, num_heldout=256).eval_split("heldout")
  np.testing.assert_array_equal(held["image"], again["image"])
  # Held-out images come from their own RNG stream: none equals a training image.
  tr = to_float(train5k["image"]).reshape(len(train5k["image"]), -1)
  for img in held["image"][:64]:
    assert not (tr == img.reshape(1, -1)).all(axis=1).any()
  for img in unseen["image"][:64]:
    assert np.abs(tr[:500] - img.reshape(1, -1)).max(axis=1).min() > 0.1
  with pytest.raises(ValueError, match="unknown eval split"):
    ds.eval_split("train")


def test_prompts(ds):
  prompts = ds.prompts()
  assert len(prompts) == ds.num_classes
  assert all(len(p) == len(shapes.PROMPT_TEMPLATES) >= 3 for p in prompts)
  for name, texts in zip(ds.class_names, prompts):
    color, shape = name.split()
    assert all(color in t and shape in t for t in texts)


def _features(images):
  """Translation-invariant cues: mean foreground colour; |FFT| of the foreground mask."""
  x = (images + 1) / 2
  med = np.median(x.reshape(len(x), -1, 3), axis=1)[:, None, None, :]
  mask = (np.linalg.norm(x - med, axis=-1) > 0.25).astype(np.float32)
  color = (x * mask[..., None]).sum((1, 2)) / np.maximum(mask.sum((1, 2)), 1)[:, None]
  spec = np.abs(np.fft.fft2(mask))[:, :8, :8].reshape(len(x), -1)
  return color, spec / np.maximum(spec[:, :1], 1)


def test_learnable(ds, train5k):
  """Colour and shape are each recoverable by a trivial numpy classifier (chance 1/8)."""
  ns = len(ds.shapes)
  ctr, ftr = _features(to_float(train5k["image"][:2000]))
  held = ds.eval_split("heldout")
  cte, fte = _features(held["image"])
  y = train5k["label"][:2000]
  cents = np.stack([ctr[y // ns == c].mean(0) for c in range(len(ds.colors))])
  pred_color = np.argmin(((cte[:, None] - cents[None]) ** 2).sum(-1), axis=1)
  assert (pred_color == held["label"] // ns).mean() > 0.8
  xtr, xte = np.c_[ftr, np.ones(len(ftr))], np.c_[fte, np.ones(len(fte))]
  w = np.linalg.solve(xtr.T @ xtr + 1e-2 * np.eye(xtr.shape[1]), xtr.T @ np.eye(ns)[y % ns])
  assert ((xte @ w).argmax(1) == held["label"] % ns).mean() > 0.45
