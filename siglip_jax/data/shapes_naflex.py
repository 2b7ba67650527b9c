"""The shapes set at three aspect ratios, for NaFlex: "wide" (H x 4H), "tall" (4H x H) and
"square" (H x H) canvases, H = `base_size`, rendered on the fly (nothing is downloaded).

Classes, captions, prompts, the never-seen pairs and the per-example RNG are the shapes set's
(`shapes.py`): example `i` of a stream draws `np.random.default_rng([seed, stream, i])` in the
same order, from the same streams, so held-out images are never training images. The object is
drawn undistorted (round things round), its radius the same fraction of the canvas's short side
as in shapes, at a uniform position inside the canvas: anywhere along a wide canvas's length.

Square canvases are H x H rather than of the others' area, so that (a) the object has the same
size in pixels on every aspect, and the canvas shape is the only difference between them, and
(b) a square image is pixel for pixel the shapes set's image of that seed, stream and index: on
squares the fixed-resolution demo model sees exactly its own held-out images, the control its
scores on the squashed wide and tall images are read against.

Training record `i` has aspect `aspects[i % 3]` (each aspect equally often). The evaluation
splits draw image `j` of every aspect from the same RNG (class, size, relative position,
rotation, colours, background), so per-aspect scores compare like with like.
"""
import numpy as np

from siglip_jax.data import shapes
# The shapes set's draws (uniforms per example, size range, streams), so squares are its images.
from siglip_jax.data.shapes import _SIZE_RANGE, _SPLIT_STREAMS, _TRAIN

# Canvas (height, width) in units of `base_size`.
ASPECTS = {"wide": (1, 4), "tall": (4, 1), "square": (1, 1)}
ASPECT_NAMES = tuple(ASPECTS)
_ROT_LIMIT = np.radians([shapes.ROT_LIMIT_DEG.get(s, 180.0) for s in shapes.SHAPES]).astype(
    np.float32)
_CHUNK = 256   # images rendered at once: bounds the [n, 3, 4H, 4H] background below


def canvas_shape(aspect, base_size):
  """(height, width) in pixels of an `aspect` canvas."""
  if aspect not in ASPECTS:
    raise ValueError(f"unknown aspect {aspect!r}; expected one of {ASPECT_NAMES}")
  h, w = ASPECTS[aspect]
  return h * int(base_size), w * int(base_size)


def canvas_alpha(shape_id, cx, cy, r_px, theta, height, width):
  """`shapes.object_alpha` on a height x width canvas: [n, height, width] coverage.

  Each object is rendered in the short-side square window around it and pasted: it lies inside
  that window with a margin wider than the one-pixel anti-aliasing ramp (radius <= 0.42 of the
  side), so the coverage outside the window is 0, as rendering the whole canvas would give.
  Integer offsets keep the object's sub-pixel position exact."""
  side = min(height, width)
  ox = np.clip(np.rint(cx - side / 2), 0, width - side).astype(np.int64)
  oy = np.clip(np.rint(cy - side / 2), 0, height - side).astype(np.int64)
  window = shapes.object_alpha(shape_id, cx - ox.astype(np.float32),
                               cy - oy.astype(np.float32), r_px, theta, side)
  if (height, width) == (side, side):
    return window
  out = np.zeros((len(shape_id), height, width), np.float32)
  for j, (x, y) in enumerate(zip(ox, oy)):
    out[j, y:y + side, x:x + side] = window[j]
  return out


def canvas_background(u, height, width):
  """`shapes.background` for a height x width canvas: the central band of a square one of the
  long side (the gradient then runs across the whole canvas)."""
  side = max(height, width)
  bg, sigma = shapes.background(u, side)
  y0, x0 = (side - height) // 2, (side - width) // 2
  return bg[:, :, y0:y0 + height, x0:x0 + width], sigma


def render(labels, u, noise):
  """uint8 images [n, H, W, 3] and size bins of classes `labels`, from each example's uniforms
  `u` [n, _NUM_UNIFORMS] (float32, column = role, as in shapes) and noise [n, H, W, 3]."""
  n, height, width = noise.shape[:3]
  ns = len(shapes.SHAPES)
  color_id, shape_id = labels // ns, labels % ns
  lo, hi = _SIZE_RANGE
  frac = lo + (hi - lo) * u[:, 1]
  size_bin = np.minimum((u[:, 1] * len(shapes.SIZE_WORDS)).astype(np.int64),
                        len(shapes.SIZE_WORDS) - 1)
  r_px = frac * min(height, width)   # relative to the short side, as shapes is to its side
  cx = r_px + (width - 2 * r_px) * u[:, 2]   # the whole object inside the canvas
  cy = r_px + (height - 2 * r_px) * u[:, 3]
  theta = (2 * u[:, 4] - 1) * _ROT_LIMIT[shape_id]
  alpha = canvas_alpha(shape_id, cx, cy, r_px, theta, height, width)
  fg = shapes.object_rgb(color_id, np.concatenate([u[:, 8:9], u[:, 5:8]], axis=1))
  bg, sigma = canvas_background(u[:, 9:16], height, width)
  # The shapes renderer's float32 operations in its order, so squares are its pixels exactly.
  return shapes.composite(fg, bg, alpha, noise, sigma), size_bin


class AspectShapesDataset:
  """The shapes set's classes on wide, tall and square canvases; see the module docstring.

  `class_names`, `colors`, `shapes`, `seen_class_ids`, `unseen_class_ids`, `prompts()` are
  ShapesDataset's. Images are uint8 [H, W, 3] (their sizes differ by aspect), in lists.
  """

  def __init__(self, *, seed=0, base_size=32, num_heldout=512, num_unseen=512,
               aspects=ASPECT_NAMES):
    # Validates base_size as shapes does its image_size, and holds the class lists.
    self._classes = shapes.ShapesDataset(seed=seed, image_size=base_size, num_heldout=0,
                                         num_unseen=0)
    self.aspects = tuple(aspects)
    if not self.aspects:
      raise ValueError("aspects is empty")
    for a in self.aspects:
      canvas_shape(a, base_size)   # names the unknown aspect
    self.seed, self.base_size = int(seed), int(base_size)
    self.num_heldout, self.num_unseen = int(num_heldout), int(num_unseen)
    self.colors, self.shapes = self._classes.colors, self._classes.shapes
    self.class_names = self._classes.class_names
    self.seen_class_ids = self._classes.seen_class_ids
    self.unseen_class_ids = self._classes.unseen_class_ids
    self._eval_cache = {}

  @property
  def num_classes(self):
    return len(self.class_names)

  def prompts(self):
    """Per class (in `class_names` order), the zero-shot prompt texts (the shapes set's)."""
    return self._classes.prompts()

  def train_aspect(self, i):
    """The aspect of training example `i` (cycling, so each is drawn equally often)."""
    return self.aspects[int(i) % len(self.aspects)]

  def train_examples(self, indices):
    """Training examples `indices` (ints >= 0): {"image": [uint8 [H, W, 3]], "text", "label",
    "aspect"}, seen classes only."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    return self._examples(_TRAIN, indices, [self.train_aspect(i) for i in indices], None)

  def eval_split(self, name, aspect):
    """("heldout" | "unseen", aspect) -> (images: list of uint8 [H, W, 3], labels int32 [N]).

    Labels cycle through the split's classes, as shapes' do; cached and read-only."""
    if name not in _SPLIT_STREAMS:
      raise ValueError(f"unknown eval split {name!r}; expected one of {sorted(_SPLIT_STREAMS)}")
    if aspect not in self.aspects:
      raise ValueError(f"unknown aspect {aspect!r}; this set has {self.aspects}")
    key = (name, aspect)
    if key not in self._eval_cache:
      n, ids = ((self.num_heldout, self.seen_class_ids) if name == "heldout"
                else (self.num_unseen, self.unseen_class_ids))
      labels = ids[np.arange(n) % len(ids)].astype(np.int32)
      ex = self._examples(_SPLIT_STREAMS[name], np.arange(n), [aspect] * n, labels)
      for image in ex["image"]:
        image.setflags(write=False)
      labels.setflags(write=False)
      self._eval_cache[key] = (ex["image"], labels)
    return self._eval_cache[key]

  def _examples(self, stream, indices, aspects, labels):
    if indices.size and indices.min() < 0:
      raise ValueError("example indices must be >= 0")
    n = len(indices)
    images, texts = [None] * n, [None] * n
    out_labels = np.empty(n, np.int32)
    for aspect in dict.fromkeys(aspects):   # each aspect's examples rendered together
      rows = [j for j in range(n) if aspects[j] == aspect]
      for start in range(0, len(rows), _CHUNK):
        part = rows[start:start + _CHUNK]
        got = self._render_rows(stream, indices[part], aspect,
                                None if labels is None else np.asarray(labels)[part])
        for j, image, text, label in zip(part, *got):
          images[j], texts[j], out_labels[j] = image, text, label
    return dict(image=images, text=texts, label=out_labels, aspect=list(aspects))

  def _render_rows(self, stream, indices, aspect, labels):
    height, width = canvas_shape(aspect, self.base_size)
    uni, noise, labels = shapes.draws(self.seed, stream, indices, (height, width),
                                      self.seen_class_ids, labels)   # the shapes set's draws
    image, size_bin = render(labels, uni.astype(np.float32), noise)
    ns, templates = len(self.shapes), shapes.CAPTION_TEMPLATES
    tmpl = np.minimum((uni[:, 16] * len(templates)).astype(np.int64), len(templates) - 1)
    text = [shapes.fill(templates[t], self.colors[k // ns], self.shapes[k % ns],
                        shapes.SIZE_WORDS[z]) for t, k, z in zip(tmpl, labels, size_bin)]
    return list(image), text, labels


class TrainSource:
  """The training stream as a random-access source of raw records (see `sources.py`): record `i`
  is training example `i`, `{"image": uint8 [H, W, 3] at aspect `i % 3`, "texts": caption,
  "key": "shapes_naflex:i"}`. Endless like shapes.TrainSource, and with its epoch for the
  same reason."""

  EPOCH = shapes.TrainSource.EPOCH

  def __init__(self, *, seed=0, base_size=32, aspects=ASPECT_NAMES):
    self.dataset = AspectShapesDataset(seed=seed, base_size=base_size, num_heldout=0,
                                       num_unseen=0, aspects=aspects)

  def __len__(self):
    return self.EPOCH

  def __getitem__(self, i):
    return self._getitems([i])[0]

  def _getitems(self, indices):
    """Grain's batched read: each aspect's records rendered in one vectorized call."""
    ex = self.dataset.train_examples(indices)
    return [{"image": image, "texts": text, "key": f"shapes_naflex:{int(i)}"}
            for i, image, text in zip(indices, ex["image"], ex["text"])]
