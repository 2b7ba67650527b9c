"""The embedded demo data set: coloured shapes on noisy backgrounds, rendered on the fly.

Nothing is downloaded. Every example is a pure function of (seed, stream, index): its RNG is
`np.random.default_rng([seed, stream, index])`, so a process can render any slice of a global
batch, and a resumed run sees exactly the examples it would have seen. Train, held-out and unseen
examples come from different streams, so held-out images are never training images.

Eight colour-shape pairs (`UNSEEN_PAIRS`) never occur in training, neither as images nor in
captions; every colour and every shape still occurs with seven other partners, so a model that
learns colour and shape separately can name the unseen pairs (compositional zero-shot).

Images are uint8 pixels, like any decoded image: training reads them through the same loader,
preprocessing and sharding as real data (`TrainSource`, a random-access source of raw records
for `pipeline.Batches`), and the evaluation splits are the same pixels as floats in [-1, 1].
"""
import re

import numpy as np

from siglip_jax.data.preprocess import to_float

# Colours far apart in RGB, so that the jitter below never makes two of them meet.
COLOR_RGB = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.15, 0.35, 1.00),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.15, 0.85),
    "orange": (1.00, 0.55, 0.00),
    "cyan": (0.00, 0.85, 0.90),
    "white": (0.95, 0.95, 0.95),
}
COLORS = tuple(COLOR_RGB)
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "heart")

# A Latin-square diagonal: colour i with shape 3i mod 8 (3 is coprime to 8, so each colour and
# each shape loses exactly one partner).
UNSEEN_PAIRS = tuple((COLORS[i], SHAPES[(3 * i) % len(SHAPES)]) for i in range(len(COLORS)))

SIZE_WORDS = ("small", "medium", "large")

CAPTION_TEMPLATES = (
    "a {color} {shape}",
    "a photo of a {color} {shape}.",
    "a {shape} that is {color}",
    "there is a {color} {shape} in the picture.",
    "a {size} {color} {shape} on a noisy background",
    "{color} {shape}",
    "a {size} {shape}, colored {color}",
    "an image showing a {color} {shape}.",
    "the {shape} is {color}",
    "a picture of one {size} {color} {shape}.",
)

# Zero-shot class prompts (no size word: a class is a colour-shape pair at any size).
PROMPT_TEMPLATES = (
    "a photo of a {color} {shape}.",
    "a {color} {shape}",
    "{color} {shape}",
    "a {shape} that is {color}",
    "there is a {color} {shape} in the picture.",
)

_TRAIN, _HELDOUT, _UNSEEN = 0, 1, 2
_SPLIT_STREAMS = {"heldout": _HELDOUT, "unseen": _UNSEEN}
_SIZE_RANGE = (0.25, 0.42)  # shape radius as a fraction of the image side (>= 8 px at 32 px)
# Shapes that turn into another class (or an "x") when rotated far get a small rotation only.
ROT_LIMIT_DEG = {"square": 15.0, "diamond": 15.0, "cross": 15.0, "heart": 20.0}
_NUM_UNIFORMS = 17


def _a_an(text):
  return re.sub(r"\ba (?=[aeiou])", "an ", text)


def fill(template, color, shape, size="medium"):
  return _a_an(template.format(color=color, shape=shape, size=size))


def caption_corpus(include_unseen=False):
  """Every caption and prompt the demo can produce (the tokenizer's training text)."""
  unseen = set(UNSEEN_PAIRS)
  pairs = [(c, s) for c in COLORS for s in SHAPES if include_unseen or (c, s) not in unseen]
  texts = {fill(t, c, s, z) for t in CAPTION_TEMPLATES for c, s in pairs for z in SIZE_WORDS}
  texts |= {fill(t, c, s) for t in PROMPT_TEMPLATES for c, s in pairs}
  return sorted(texts)


# Signed distances in the shape's own frame (unit ~ shape radius, y up; negative inside).
# Exact near the boundary, which is all that the one-pixel anti-aliasing ramp needs.
def _box(u, v, hx, hy):
  qx, qy = np.abs(u) - hx, np.abs(v) - hy
  outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
  return outside + np.minimum(np.maximum(qx, qy), 0)


def _folded(u, v, m, phase):
  """Polar coordinates folded into one wedge [0, pi/m] of an m-fold symmetric shape."""
  w = 2 * np.pi / m
  theta = np.arctan2(v, u) - phase
  return np.hypot(u, v), np.abs(np.mod(theta + w / 2, w) - w / 2)


def _polygon(u, v, m, phase, radius=1.0):
  r, t = _folded(u, v, m, phase)
  return r * np.cos(t - np.pi / m) - radius * np.cos(np.pi / m)


def _star(u, v, inner=0.45):
  # In the folded wedge the boundary is the one edge from the tip (1, 0) to the inner vertex.
  r, t = _folded(u, v, 5, np.pi / 2)
  bx, by = inner * np.cos(np.pi / 5), inner * np.sin(np.pi / 5)
  nx, ny = by, 1 - bx
  norm = np.hypot(nx, ny)
  return (r * (np.cos(t) * nx + np.sin(t) * ny) - nx) / norm


def _heart(u, v):
  # A square turned 45 degrees with a disc on each upper side, scaled to fit the unit circle.
  k, side, c = 1.0 / 0.92, 1.0, -0.073
  u, v = u / k, v / k - c
  a, b = (u + v) / np.sqrt(2), (v - u) / np.sqrt(2)
  h = side / (2 * np.sqrt(2))
  d = np.minimum(_box(a, b, side / 2, side / 2), np.hypot(u + h, v - h) - side / 2)
  return k * np.minimum(d, np.hypot(u - h, v - h) - side / 2)


_SDF = {
    "circle": lambda u, v: np.hypot(u, v) - 0.9,
    "square": lambda u, v: _polygon(u, v, 4, np.pi / 4),
    "triangle": lambda u, v: _polygon(u, v, 3, np.pi / 2),
    "star": _star,
    "cross": lambda u, v: np.minimum(_box(u, v, 0.95, 0.3), _box(u, v, 0.3, 0.95)),
    "diamond": lambda u, v: (np.abs(u) / 0.62 + np.abs(v) - 1) * (0.62 / np.hypot(0.62, 1.0)),
    "ring": lambda u, v: np.abs(np.hypot(u, v) - 0.72) - 0.24,
    "heart": _heart,
}


class ShapesDataset:
  """Colour-shape images with captions; see the module docstring.

  Class `k` is colour `k // len(shapes)` and shape `k % len(shapes)`; `class_names[k]` is e.g.
  "red circle". Training images are uint8 [N, H, W, 3]; evaluation images float32 in [-1, 1].
  """

  def __init__(self, *, seed=0, image_size=32, num_heldout=512, num_unseen=512):
    if not 16 <= image_size <= 512:
      raise ValueError(f"image_size must be in [16, 512], got {image_size}")
    self.seed, self.image_size = int(seed), int(image_size)
    self.num_heldout, self.num_unseen = int(num_heldout), int(num_unseen)
    self.colors, self.shapes = list(COLORS), list(SHAPES)
    self.class_names = [f"{c} {s}" for c in self.colors for s in self.shapes]
    unseen = {self.class_names.index(f"{c} {s}") for c, s in UNSEEN_PAIRS}
    self.unseen_class_ids = np.array(sorted(unseen), np.int32)
    self.seen_class_ids = np.array(
        [k for k in range(len(self.class_names)) if k not in unseen], np.int32)
    self._rot_limit = np.radians(
        [ROT_LIMIT_DEG.get(s, 180.0) for s in self.shapes]).astype(np.float32)
    self._eval_cache = {}

  @property
  def num_classes(self):
    return len(self.class_names)

  def train_examples(self, indices):
    """Renders training examples `indices` (any ints >= 0): uint8 images, captions, labels (seen
    classes only)."""
    return self._examples(_TRAIN, np.asarray(indices, np.int64).reshape(-1), labels=None)

  def eval_split(self, name):
    """The fixed "heldout" (seen classes) or "unseen" (UNSEEN_PAIRS classes) split.

    Labels cycle through the split's classes, so every class gets (nearly) the same count.
    Images are float32 in [-1, 1]: the uint8 pixels as the loader maps them (`to_float`), so the
    evaluators see what training sees. Arrays are cached and read-only.
    """
    if name not in _SPLIT_STREAMS:
      raise ValueError(f"unknown eval split {name!r}; expected one of {sorted(_SPLIT_STREAMS)}")
    if name not in self._eval_cache:
      n, ids = ((self.num_heldout, self.seen_class_ids) if name == "heldout"
                else (self.num_unseen, self.unseen_class_ids))
      out = self._examples(_SPLIT_STREAMS[name], np.arange(n), labels=ids[np.arange(n) % len(ids)])
      out["image"] = to_float(out["image"])
      for v in out.values():
        if isinstance(v, np.ndarray):
          v.setflags(write=False)
      self._eval_cache[name] = out
    return self._eval_cache[name]

  def prompts(self):
    """Per class (in `class_names` order), the zero-shot prompt texts."""
    return [[fill(t, c, s) for t in PROMPT_TEMPLATES] for c in self.colors for s in self.shapes]

  def _examples(self, stream, indices, labels):
    if indices.size and indices.min() < 0:
      raise ValueError("example indices must be >= 0")
    uni, noise, labels = draws(self.seed, stream, indices, (self.image_size,) * 2,
                               self.seen_class_ids, labels)
    image, size_bin = self._render(labels, uni.astype(np.float32), noise)
    ns = len(self.shapes)
    tmpl = np.minimum((uni[:, 16] * len(CAPTION_TEMPLATES)).astype(np.int64),
                      len(CAPTION_TEMPLATES) - 1)
    text = [fill(CAPTION_TEMPLATES[t], self.colors[k // ns], self.shapes[k % ns], SIZE_WORDS[z])
            for t, k, z in zip(tmpl, labels, size_bin)]
    return dict(image=image, text=text, label=labels)

  def _render(self, labels, u, noise):
    """Vectorized over the batch; `u` holds each example's uniform draws (column = role)."""
    size = self.image_size
    ns = len(self.shapes)
    color_id, shape_id = labels // ns, labels % ns
    lo, hi = _SIZE_RANGE
    frac = lo + (hi - lo) * u[:, 1]
    size_bin = np.minimum((u[:, 1] * len(SIZE_WORDS)).astype(np.int64), len(SIZE_WORDS) - 1)
    r_px = frac * size
    cx = r_px + (size - 2 * r_px) * u[:, 2]  # the whole shape stays inside the image
    cy = r_px + (size - 2 * r_px) * u[:, 3]
    theta = (2 * u[:, 4] - 1) * self._rot_limit[shape_id]

    alpha = object_alpha(shape_id, cx, cy, r_px, theta, size)
    fg = object_rgb(color_id, np.concatenate([u[:, 8:9], u[:, 5:8]], axis=1))
    bg, sigma = background(u[:, 9:16], size)
    return composite(fg, bg, alpha, noise, sigma), size_bin


def draws(seed, stream, indices, shape, seen, labels=None):
  """Each example's uniforms [N, _NUM_UNIFORMS], pixel noise [N, H, W, 3] (`shape` (H, W)) and
  label (drawn among `seen` unless given), from (seed, stream, index) alone."""
  n = len(indices)
  uni = np.empty((n, _NUM_UNIFORMS), np.float64)
  noise = np.empty((n, *shape, 3), np.float32)
  for j, i in enumerate(indices):
    rng = np.random.default_rng([seed, stream, int(i)])
    uni[j] = rng.random(_NUM_UNIFORMS)
    rng.standard_normal(dtype=np.float32, out=noise[j])
  if labels is None:
    labels = seen[np.minimum((uni[:, 0] * len(seen)).astype(np.int64), len(seen) - 1)]
  return uni, noise, np.asarray(labels, np.int32)


def composite(fg, bg, alpha, noise, sigma):
  """uint8 [N, H, W, 3] images: bg + alpha * (fg - bg) + sigma * noise, quantized.

  Channels first and in place: the loader renders every training batch, and numpy's loops over
  a last axis of 3 were half the render time. (Each pixel goes through the same float32
  operations as channels last: the same values.)"""
  c = (slice(None), slice(None), None, None)
  img = fg[c] - bg
  img *= alpha[:, None]
  img += bg
  noise = noise.transpose(0, 3, 1, 2)
  noise *= sigma
  img += noise
  return quantize(img, out=img).transpose(0, 2, 3, 1).copy()


_RGB = np.array([COLOR_RGB[c] for c in COLORS], np.float32)
_E = (slice(None), None, None)


def _grid(size):
  return np.arange(size, dtype=np.float32) + 0.5  # pixel centres


def object_alpha(shape_id, cx, cy, r_px, theta, size):
  """Coverage [n, S, S] in [0, 1] of shapes `shape_id` (indices into SHAPES) of radius `r_px`
  centred at (cx, cy) pixels (y down), turned by `theta` radians; vectorized over n."""
  grid = _grid(size)
  e = _E
  dx = grid[None, None, :] - cx[e]
  dy = cy[e] - grid[None, :, None]  # y up, so "up" in a shape means up in the image
  cos, sin = np.cos(theta)[e], np.sin(theta)[e]
  su = (dx * cos + dy * sin) / r_px[e]
  sv = (dy * cos - dx * sin) / r_px[e]
  sdf = np.empty((len(shape_id), size, size), np.float32)
  for k, name in enumerate(SHAPES):
    m = shape_id == k
    if m.any():
      sdf[m] = _SDF[name](su[m], sv[m])
  # One-pixel linear ramp across the boundary: cheap anti-aliasing.
  return np.clip(0.5 - sdf * r_px[e], 0.0, 1.0)


def object_rgb(color_id, u):
  """[n, 3] colours of `color_id` (indices into COLORS), jittered by the uniforms u [n, 4]
  (brightness 0.85..1.05, then +-0.06 a channel): the eight colours stay apart."""
  return _RGB[color_id] * (0.85 + 0.2 * u[:, 0:1]) + 0.12 * (u[:, 1:4] - 0.5)


def background(u, size):
  """Backgrounds [n, 3, S, S] (channels first) and noise scales [n, 1, 1, 1] from uniforms
  u [n, 7]: dark-to-mid grey, a faint tint, a linear gradient in a random direction."""
  grid = _grid(size)
  e = _E
  base = 0.05 + 0.40 * u[:, 0:1] + 0.08 * (u[:, 1:4] - 0.5)
  phi = 2 * np.pi * u[:, 4]
  ramp = ((grid[None, None, :] / size - 0.5) * np.cos(phi)[e]
          + (grid[None, :, None] / size - 0.5) * np.sin(phi)[e])
  sigma = (0.02 + 0.08 * u[:, 6])[:, None, None, None]
  c = (slice(None), slice(None), None, None)
  return base[c] + ((0.3 * u[:, 5])[e] * ramp)[:, None], sigma


def quantize(intensity, out=None):
  """Intensities (float, 1 = full) -> uint8 pixels, rounded to the nearest of the 256 levels.
  `out`: a float array to work in (may be `intensity` itself)."""
  x = np.clip(intensity, 0.0, 1.0, out=out)
  x *= 255.0
  return np.rint(x, out=x).astype(np.uint8)


class TrainSource:
  """The training stream as a random-access source of raw records (see `sources.py`): record `i`
  is training example `i`, `{"image": uint8 [S, S, 3], "texts": caption, "key": "shapes:i"}`.
  Held-out and unseen examples come from other streams, so they are never records here.

  The stream has no end, but the loader permutes records within epochs of `len(source)`. Any
  two indices are independent draws, so the permutation adds nothing and costs nothing; the
  epoch only has to be longer than any run, so that no example repeats (as in the endless
  stream): 2**32 examples are 33 million steps at the demo's batch of 128, while the
  permutation's Feistel network stays at 16-bit halves.
  """

  EPOCH = 2**32

  def __init__(self, *, seed=0, image_size=32):
    self.dataset = ShapesDataset(seed=seed, image_size=image_size, num_heldout=0, num_unseen=0)

  def __len__(self):
    return self.EPOCH

  def __getitem__(self, i):
    return self._getitems([i])[0]

  def _getitems(self, indices):
    """Grain's batched read: one vectorized render for all of `indices` (about twice as fast
    as rendering them one at a time)."""
    ex = self.dataset.train_examples(indices)
    return [{"image": image, "texts": text, "key": f"shapes:{int(i)}"}
            for i, image, text in zip(indices, ex["image"], ex["text"])]
