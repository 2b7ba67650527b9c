"""The shapes set at three aspect ratios (NaFlex demo): canvases, undistorted objects inside
them, determinism, balance, splits, and its zero-shot evaluator on oracle and broken handles."""
import os
import re

import numpy as np
import pytest
from PIL import Image

from siglip_jax.data import shapes, shapes_naflex, sources
from siglip_jax.data.preprocess import to_float
from siglip_jax.data.shapes_naflex import AspectShapesDataset, TrainSource
from siglip_jax.evaluators.shapes_naflex import ShapesNaflexEvaluator

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZES = {"wide": (32, 128), "tall": (128, 32), "square": (32, 32)}


@pytest.fixture(scope="module")
def ds():
  return AspectShapesDataset(seed=0, base_size=32, num_heldout=112, num_unseen=32)


@pytest.fixture(scope="module")
def train():
  return TrainSource(seed=0)._getitems(list(range(600)))


def test_canvas_shapes(ds, train):
  for aspect, hw in SIZES.items():
    images, labels = ds.eval_split("heldout", aspect)
    assert len(images) == len(labels) == 112
    assert {(im.shape, im.dtype) for im in images} == {(hw + (3,), np.dtype(np.uint8))}
  assert {r["image"].shape[:2] for r in train} == set(SIZES.values())
  small = AspectShapesDataset(base_size=16, num_heldout=4, num_unseen=0)
  assert small.eval_split("heldout", "tall")[0][0].shape == (64, 16, 3)
  with pytest.raises(ValueError, match="unknown aspect"):
    AspectShapesDataset(aspects=("wide", "panorama"))


def test_square_is_the_shapes_set(ds):
  """H x H squares are the shapes set's images, seed for seed and index for index."""
  ref = shapes.ShapesDataset(seed=0, image_size=32, num_heldout=112, num_unseen=32)
  for split in ("heldout", "unseen"):
    images, labels = ds.eval_split(split, "square")
    np.testing.assert_array_equal(to_float(np.stack(images)), ref.eval_split(split)["image"])
    np.testing.assert_array_equal(labels, ref.eval_split(split)["label"])
  idx = [2, 5, 302]   # aspect i % 3 == 2: square
  for ours, theirs in zip(TrainSource(seed=0)._getitems(idx),
                          shapes.TrainSource(seed=0)._getitems(idx)):
    np.testing.assert_array_equal(ours["image"], theirs["image"])
    assert ours["texts"] == theirs["texts"]
  assert ds.class_names == ref.class_names and ds.prompts() == ref.prompts()


@pytest.mark.parametrize("base", [16, 32])
def test_windowed_alpha_equals_whole_canvas(base):
  """Pasting each object's window = rendering it on a square of the long side, cropped."""
  rng = np.random.default_rng(base)
  n, long = 64, 4 * base
  shape_id = np.arange(n) % len(shapes.SHAPES)
  frac = np.r_[0.25, 0.42, rng.uniform(0.25, 0.42, n - 2)].astype(np.float32)
  r = frac * base
  along = r + (long - 2 * r) * np.r_[0, 1, rng.random(n - 2)].astype(np.float32)
  across = r + (base - 2 * r) * rng.random(n).astype(np.float32)
  theta = rng.uniform(-np.pi, np.pi, n).astype(np.float32)
  whole = shapes.object_alpha(shape_id, along, across, r, theta, long)
  wide = shapes_naflex.canvas_alpha(shape_id, along, across, r, theta, base, long)
  np.testing.assert_allclose(wide, whole[:, :base], atol=1e-4)
  assert whole[:, base:].max() == 0   # nothing lost below the wide canvas
  tall = shapes_naflex.canvas_alpha(shape_id, across, along, r, theta, long, base)
  whole = shapes.object_alpha(shape_id, across, along, r, theta, long)
  np.testing.assert_allclose(tall, whole[:, :, :base], atol=1e-4)


def _red_circle(aspect, u_pos):
  """A red circle of the largest size, no noise, at relative position u_pos = (x, y)."""
  h, w = SIZES[aspect]
  u = np.full((1, 17), 0.5, np.float32)
  u[0, 1], u[0, 2], u[0, 3], u[0, 14] = 1.0, *u_pos, 0.0   # size, position, no gradient
  label = np.array([shapes.COLORS.index("red") * len(shapes.SHAPES)], np.int32)
  image, _ = shapes_naflex.render(label, u, np.zeros((1, h, w, 3), np.float32))
  return image[0].astype(int)


@pytest.mark.parametrize("aspect", list(SIZES))
def test_object_round_and_inside_anywhere(aspect):
  h, w = SIZES[aspect]
  diameter = 2 * 0.9 * 0.42 * 32   # the circle's SDF radius 0.9, at the top of the size range
  for pos in ((0.0, 0.0), (1.0, 1.0), (0.5, 0.3)):
    img = _red_circle(aspect, pos)
    rows, cols = np.nonzero(img[..., 0] - img[..., 1] > 100)   # red: the object's pixels
    extent_y, extent_x = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert extent_x == extent_y and abs(extent_x - diameter) <= 1.5   # round, not squashed
    # Inside the canvas, at the drawn end of its length (so anywhere along it).
    cy, cx = (rows.max() + rows.min() + 1) / 2, (cols.max() + cols.min() + 1) / 2
    assert abs(cx - (diameter / 0.9 / 2 + (w - diameter / 0.9) * pos[0])) <= 1
    assert abs(cy - (diameter / 0.9 / 2 + (h - diameter / 0.9) * pos[1])) <= 1


def test_deterministic_and_balanced(train):
  again = TrainSource(seed=0)
  for i in (0, 1, 2, 599):
    np.testing.assert_array_equal(again[i]["image"], train[i]["image"])
    assert again[i]["texts"] == train[i]["texts"] and again[i]["key"] == f"shapes_naflex:{i}"
  other = TrainSource(seed=1)[0]
  assert other["image"].shape == train[0]["image"].shape
  assert not np.array_equal(other["image"], train[0]["image"])
  counts = {}
  for r in train:
    counts[r["image"].shape[:2]] = counts.get(r["image"].shape[:2], 0) + 1
  assert sorted(counts.values()) == [200, 200, 200]


def _object_colour(image):
  """The colour name nearest the mean of the 20 pixels (3 x 3 averaged against the noise)
  farthest from the background's median: the object's, whatever the canvas."""
  x = image / 255.0
  x = sum(x[i:len(x) - 2 + i, j:x.shape[1] - 2 + j] for i in range(3) for j in range(3)) / 9
  x = x.reshape(-1, 3)
  far = x[np.argsort(np.linalg.norm(x - np.median(x, 0), axis=1))[-20:]].mean(0)
  rgb = np.array([shapes.COLOR_RGB[c] for c in shapes.COLORS])
  return shapes.COLORS[np.argmin(((rgb - far) ** 2).sum(1))]


def test_captions_name_the_drawn_colour(train):
  unseen = {f"{c} {s}" for c, s in shapes.UNSEEN_PAIRS}
  right = {}
  for r in train:
    words = re.findall(r"[a-z]+", r["texts"])
    (color,), (shape,) = set(words) & set(shapes.COLORS), set(words) & set(shapes.SHAPES)
    assert f"{color} {shape}" not in unseen
    right.setdefault(r["image"].shape, []).append(_object_colour(r["image"]) == color)
  assert len(right) == 3 and all(np.mean(v) > 0.97 for v in right.values())


def test_eval_splits_are_not_training_images(ds, train):
  seen = {r["image"].tobytes() for r in train}
  for aspect in SIZES:
    held, held_labels = ds.eval_split("heldout", aspect)
    assert not {im.tobytes() for im in held} & seen
    assert set(held_labels.tolist()) == set(ds.seen_class_ids.tolist())
    assert set(ds.eval_split("unseen", aspect)[1].tolist()) == set(ds.unseen_class_ids.tolist())
  assert ds.eval_split("heldout", "wide") is ds.eval_split("heldout", "wide")   # cached
  with pytest.raises(ValueError, match="unknown eval split"):
    ds.eval_split("train", "wide")


# ------------------------------------------------------------------------------ the evaluator

def _class_of_prompt(text):
  """One-hot of the class a prompt names, from its words alone (colour-major, as shapes)."""
  words = re.findall(r"[a-z]+", text)
  (c,), (s,) = ([shapes.COLORS.index(w) for w in words if w in shapes.COLORS],
                [shapes.SHAPES.index(w) for w in words if w in shapes.SHAPES])
  return np.eye(len(shapes.COLORS) * len(shapes.SHAPES))[c * len(shapes.SHAPES) + s]


class _Oracle:
  """Knows each image's class (by its bytes); `image_size` None is NaFlex, else fixed-size,
  which squashes with PIL bilinear here, independently of the evaluator. `shift` breaks it."""

  def __init__(self, ds, image_size=None, shift=0):
    self.image_size, self.calls = image_size, []
    self._table = {}
    for aspect in ds.aspects:
      for split in ("heldout", "unseen"):
        for im, label in zip(*ds.eval_split(split, aspect)):
          self._table[self._key(im)] = (label + shift) % ds.num_classes

  def _key(self, im):
    if self.image_size is not None:
      s = self.image_size
      im = np.asarray(Image.fromarray(im).resize((s, s), Image.Resampling.BILINEAR))
    return im.tobytes()

  def encode_strings(self, texts):
    return np.stack([_class_of_prompt(t) for t in texts])

  def encode_image(self, images):
    if self.image_size is None:
      assert isinstance(images, list) and all(im.dtype == np.uint8 for im in images)
      keys = [im.tobytes() for im in images]
    else:
      s = self.image_size
      assert images.dtype == np.float32 and images.shape[1:] == (s, s, 3)
      assert images.min() >= -1 and images.max() <= 1
      keys = [np.rint((im + 1) * 127.5).astype(np.uint8).tobytes() for im in images]
    self.calls.append(len(images))
    return np.eye(64)[[self._table[k] for k in keys]]


NAMES = {f"shapes_naflex/zeroshot_top1_{a}{s}" for a in SIZES for s in ("", "_unseen")}


@pytest.mark.parametrize("image_size", [None, 32, 16])
def test_evaluator_oracle_is_perfect_and_broken_is_chance(ds, image_size):
  ev = ShapesNaflexEvaluator(ds, every_steps=0, batch_size=50)
  oracle = _Oracle(ds, image_size)
  got = ev.run(oracle)
  assert set(got) == NAMES and all(v == 1.0 for v in got.values()), got
  assert max(oracle.calls) == 50   # in batches
  broken = ev.run(_Oracle(ds, image_size, shift=1))
  assert set(broken) == NAMES and all(v < 0.15 for v in broken.values()), broken
  random = type("Random", (), {"image_size": image_size,
                               "encode_strings": oracle.encode_strings,
                               "encode_image": lambda self, x: np.random.default_rng(
                                   len(x)).normal(size=(len(x), 64))})()
  assert all(v < 0.15 for v in ev.run(random).values())


def test_registered_as_data_and_evaluator():
  from siglip_jax import cli, config_defaults, experiment
  config = cli.load_config_file(os.path.join(REPO, "configs", "naflex_demo.py"))
  config.evals.shapes_naflex.num_heldout = 4
  config.evals.shapes_naflex.num_unseen = 2
  assert not config_defaults.unknown_keys(config)
  src = sources.from_config(config)
  assert isinstance(src, TrainSource) and src.dataset.base_size == config.input.image_size
  (ev,) = experiment.make_evaluators(config)
  assert isinstance(ev, ShapesNaflexEvaluator) and ev.prefix == "shapes_naflex"
  assert ev.batch_size == 256 and ev.every_steps == 500
  assert len(ev.dataset.eval_split("unseen", "tall")[0]) == 2
