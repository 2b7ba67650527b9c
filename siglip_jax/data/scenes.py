"""The SigLIP 2 demo set: scenes of 1 to 3 coloured shapes, each object a region with its box
and caption, rendered on the fly (nothing is downloaded).

Colours, shapes, held-out images and never-seen pairs are the shapes set's (`shapes.py`): the
training stream holds only seen colour-shape pairs; the "heldout" split holds new scenes of seen
pairs; the "unseen" split holds scenes whose objects are all `UNSEEN_PAIRS`. Within a scene the
objects do not overlap and have distinct colour-shape pairs, so each region caption ("red
circle") names exactly one object. Half of the multi-object training and held-out scenes make
their second object share the first one's colour or shape (the other word differs), so a region
caption has to name both words to pick its object: with the independent draws of the rest,
about 60% of multi-object scenes hold such a pair.

Every scene is a pure function of (seed, stream, index), as in the shapes set.
"""
import math

import numpy as np

from siglip_jax.data import shapes

COLORS, SHAPES = shapes.COLORS, shapes.SHAPES
MAX_OBJECTS = 3
_TRAIN, _HELDOUT, _UNSEEN = 10, 11, 12     # streams apart from the shapes set's
_SPLIT_STREAMS = {"heldout": _HELDOUT, "unseen": _UNSEEN}
_NUM_OBJECTS_P = (0.2, 0.4, 0.4)           # 1, 2 or 3 objects
_SHARE_P = 0.5                             # second object shares a word with the first
# Words the demo's tokenizer knows (it was trained on the shapes set's captions).
_CAPTION_TEMPLATES = ("{list}", "a picture of {list}.", "an image showing {list}.",
                      "there is {list} in the picture.")


def region_caption(color, shape):
  return f"{color} {shape}"


def image_caption(pairs, template=0):
  """'a red circle', 'a red circle, a blue star', ... in one of the templates."""
  listed = ", ".join(shapes.fill("a {color} {shape}", c, s) for c, s in pairs)
  return _CAPTION_TEMPLATES[template].format(list=listed)


def parse_pairs(text):
  """The (colour, shape) pairs a caption names, in order: a colour word followed by a shape
  word. Words that do not form such a pair are returned apart as `other` words."""
  words = [w.strip(".,;:!?") for w in text.lower().split()]
  pairs, other, i = [], [], 0
  while i < len(words):
    if words[i] in COLORS and i + 1 < len(words) and words[i + 1] in SHAPES:
      pairs.append((words[i], words[i + 1]))
      i += 2
      continue
    if words[i] in COLORS or words[i] in SHAPES:
      other.append(words[i])
    i += 1
  return pairs, other


class ScenesDataset:
  """Scenes with regions; `image_size` pixels a side, object radius `radius` (a fraction of the
  side, drawn per object). `_scenes(stream, indices)` -> dicts (see there).

  The default radius, 0.17-0.25 of the side (8-12 px at 48 px, about the shapes set's object
  size), is what shape recognition needed: at 0.13-0.20 the colours were right but the shapes
  were not (caption_acc 0.25 after 3,000 steps; docs/performance.md). About 5% of the objects
  drawn then find no room and the scene keeps fewer (never an overlap)."""

  def __init__(self, *, seed=0, image_size=64, radius=(0.17, 0.25), num_heldout=512,
               num_unseen=256):
    if not 32 <= image_size <= 512:
      raise ValueError(f"image_size must be in [32, 512], got {image_size}")
    lo, hi = radius
    if not 0 < lo <= hi or 6 * hi > 1.5:
      raise ValueError(f"radius {radius}: three objects of that size do not fit a scene")
    self.seed, self.image_size, self.radius = int(seed), int(image_size), (lo, hi)
    self.num_heldout, self.num_unseen = int(num_heldout), int(num_unseen)
    unseen = set(shapes.UNSEEN_PAIRS)
    self.seen_pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in unseen]
    self.unseen_pairs = list(shapes.UNSEEN_PAIRS)
    self._eval_cache = {}

  # ------------------------------------------------------------------------------- drawing

  def _pairs(self, rng, stream):
    n = 1 + int(rng.choice(MAX_OBJECTS, p=_NUM_OBJECTS_P))
    pool = self.unseen_pairs if stream == _UNSEEN else self.seen_pairs
    first = pool[int(rng.integers(len(pool)))]
    pairs = [first]
    if n > 1 and stream != _UNSEEN and rng.random() < _SHARE_P:
      same_color = rng.random() < 0.5
      options = [p for p in pool if p != first and
                 ((p[0] == first[0]) if same_color else (p[1] == first[1]))]
      pairs.append(options[int(rng.integers(len(options)))])
    while len(pairs) < n:
      p = pool[int(rng.integers(len(pool)))]
      if p not in pairs:
        pairs.append(p)
    return pairs

  def _place(self, rng, n):
    """Radii and centres (pixels) of n objects whose circles neither overlap nor leave the
    image; a few tries, then fewer objects (never an overlap)."""
    size = self.image_size
    placed = []
    for _ in range(n):
      for _ in range(100):
        r = size * rng.uniform(*self.radius)
        cx, cy = rng.uniform(r, size - r, 2).tolist()
        # Python floats: numpy's per-call overhead on scalars was a third of a scene's time.
        if all(math.hypot(cx - x2, cy - y2) >= r + r2 + 1.5 for r2, (x2, y2) in placed):
          placed.append((r, (cx, cy)))
          break
    return placed

  def _draw(self, stream, index):
    """Every random draw of scene `index` (pure function of seed, stream, index)."""
    rng = np.random.default_rng([self.seed, stream, int(index)])
    pairs = self._pairs(rng, stream)
    placed = self._place(rng, len(pairs))
    pairs = pairs[:len(placed)]
    order = rng.permutation(len(pairs))   # caption order independent of drawing order
    template = int(rng.integers(len(_CAPTION_TEMPLATES)))
    size = self.image_size
    background_u = rng.random(7)
    noise = rng.standard_normal((3, size, size), dtype=np.float32)
    objects = []   # (colour id, shape id, cx, cy, radius, angle, colour uniforms [4])
    for (color, shape), (r, (cx, cy)) in zip(pairs, placed):
      limit = np.radians(shapes.ROT_LIMIT_DEG.get(shape, 180.0))
      theta = (2 * rng.random() - 1) * limit
      objects.append((COLORS.index(color), SHAPES.index(shape), cx, cy, r, theta,
                      rng.random(4).astype(np.float32)))
    return dict(pairs=pairs, order=order, template=template, background_u=background_u,
                noise=noise, objects=objects)

  def _scenes(self, stream, indices):
    """Scenes `indices` of `stream`, drawn one by one and rendered together (every object of
    the batch in one vectorized call: twice as fast as one scene at a time). Each is a dict:
    image uint8 [S, S, 3], texts (the caption), regions [{box, caption}], pairs, class_map
    int16 [S, S] (0 background, else 1 + colour * 8 + shape)."""
    draws = [self._draw(stream, i) for i in indices]
    size = self.image_size
    objects = [o for d in draws for o in d["objects"]]
    if objects:
      color_id, shape_id, cx, cy, r, theta, rgb_u = zip(*objects)
      f32 = lambda v: np.array(v, np.float32)  # noqa: E731
      alpha = shapes.object_alpha(np.array(shape_id), f32(cx), f32(cy), f32(r), f32(theta),
                                  size)
      rgb = shapes.object_rgb(np.array(color_id), np.stack(rgb_u))
    bg, sigma = shapes.background(np.stack([d["background_u"] for d in draws]), size)
    images = bg.astype(np.float32)                  # channels first, as shapes.py renders
    out, k = [], 0
    for b, d in enumerate(draws):
      img = images[b]
      class_map = np.zeros((size, size), np.int16)
      regions = []
      for ci, si, *_ in d["objects"]:
        img += alpha[k][None] * (rgb[k][:, None, None] - img)
        inside = alpha[k] > 0.5
        class_map[inside] = 1 + ci * len(SHAPES) + si
        rows, cols = np.nonzero(inside)
        box = [float(cols.min() / size), float(rows.min() / size),
               float((cols.max() + 1) / size), float((rows.max() + 1) / size)]
        regions.append({"box": box, "caption": region_caption(COLORS[ci], SHAPES[si])})
        k += 1
      img += sigma[b] * d["noise"]
      pairs = d["pairs"]
      out.append({"image": shapes.quantize(img.transpose(1, 2, 0)),
                  "texts": image_caption([pairs[j] for j in d["order"]], d["template"]),
                  "regions": regions, "pairs": pairs, "class_map": class_map})
    return out

  # ------------------------------------------------------------------------------- access

  def train_records(self, indices):
    """Raw records `indices` of the training stream (see `sources.py`; with `regions`)."""
    return [{"image": s["image"], "texts": s["texts"], "regions": s["regions"],
             "key": f"scenes:{int(i)}"} for i, s in zip(indices, self._scenes(_TRAIN, indices))]

  def train_scenes(self, indices):
    """Scenes `indices` of the training stream as `_scenes` gives them (class_map included):
    what the dense probe fits on."""
    return self._scenes(_TRAIN, indices)

  def eval_split(self, name):
    """The fixed "heldout" or "unseen" split: a list of scenes (dicts with image uint8,
    caption, regions, pairs, class_map), cached."""
    if name not in _SPLIT_STREAMS:
      raise ValueError(f"unknown eval split {name!r}; expected one of {sorted(_SPLIT_STREAMS)}")
    if name not in self._eval_cache:
      n = self.num_heldout if name == "heldout" else self.num_unseen
      self._eval_cache[name] = [s for start in range(0, n, 256) for s in self._scenes(
          _SPLIT_STREAMS[name], range(start, min(n, start + 256)))]
    return self._eval_cache[name]


class TrainSource:
  """The scenes training stream as a random-access source of raw records (see
  `shapes.TrainSource` for why its epoch is 2**32 records)."""

  EPOCH = 2**32

  def __init__(self, *, seed=0, image_size=64, **kwargs):
    self.dataset = ScenesDataset(seed=seed, image_size=image_size, num_heldout=0, num_unseen=0,
                                 **kwargs)

  def __len__(self):
    return self.EPOCH

  def __getitem__(self, i):
    return self._getitems([i])[0]

  def _getitems(self, indices):
    """The loader's batched read: one render for all of `indices`."""
    return self.dataset.train_records(indices)
