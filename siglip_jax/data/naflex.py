"""NaFlex on the host: an image of any size -> its patches at a patch budget, padded.

The rule is transformers' `Siglip2ImageProcessor` (`get_image_size_for_max_num_patches`): keep
the aspect ratio, scale so that both sides rounded up to patch multiples fit `max_num_patches`
patches, at least one patch a side; resize the decoded uint8 image with PIL's bilinear filter (what
the processor's PIL backend runs), cut it into patches in (row, column, channel) order and pad
the sequence with zero patches. numpy/PIL only: it runs in the loader's workers.

Patches stay uint8 until they reach the devices (`to_float` maps them to [-1, 1] there, as the
fixed-size loader does with images), a quarter of float32's host traffic.
"""
import math

import numpy as np
from PIL import Image

KEYS = ("patches", "patch_mask", "spatial_shapes")


class TooManyPatches(ValueError):
  """An image that needs more patches than the budget even at one patch on its short side."""


def _scaled(size, scale, patch):
  return max(patch, int(math.ceil(size * scale / patch) * patch))


def target_size(height, width, patch, max_num_patches, eps=1e-5):
  """(height, width) in pixels, multiples of `patch`, for an image of height x width: the
  processor's binary search on the scale, step for step (same float operations, same result).

  Raises TooManyPatches for an image whose long side needs more than `max_num_patches` patches
  when its short side has one (the processor would silently squash it)."""
  short, long = sorted((int(height), int(width)))
  if short < 1 or math.ceil(long / short) > max_num_patches:
    raise TooManyPatches(
        f"an image of {height}x{width} pixels needs {math.ceil(long / max(short, 1))} patches "
        f"on its long side at one patch on its short side; max_num_patches is "
        f"{max_num_patches} (raise it, or leave out such extreme aspect ratios)")
  lo, hi = eps / 10, 100.0
  while hi - lo >= eps:
    scale = (lo + hi) / 2
    h, w = _scaled(height, scale, patch), _scaled(width, scale, patch)
    if (h / patch) * (w / patch) <= max_num_patches:
      lo = scale
    else:
      hi = scale
  return _scaled(height, lo, patch), _scaled(width, lo, patch)


def resize(image, height, width):
  """uint8 [H, W, 3] -> uint8 [height, width, 3], PIL bilinear (antialiased when shrinking)."""
  image = np.asarray(image)
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def patchify(image, patch):
  """[h*p, w*p, C] -> [h*w, p*p*C], patches row by row, each in (row, column, channel) order."""
  hp, wp, c = image.shape
  h, w = hp // patch, wp // patch
  x = image.reshape(h, patch, w, patch, c).transpose(0, 2, 1, 3, 4)
  return x.reshape(h * w, patch * patch * c)


def encode(image, patch, max_num_patches, length=None):
  """One uint8 image [H, W, 3] -> {"patches": uint8 [length, p*p*3], "patch_mask": int32
  [length], "spatial_shapes": int32 [2]}, resized for `max_num_patches` patches and padded to
  `length` (default `max_num_patches`)."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 [H, W, 3] image; got {image.dtype} {image.shape}")
  length = max_num_patches if length is None else int(length)
  if length < max_num_patches:
    raise ValueError(f"length {length} < max_num_patches {max_num_patches}")
  h, w = target_size(image.shape[0], image.shape[1], patch, max_num_patches)
  patches = patchify(resize(image, h, w), patch)
  n = patches.shape[0]
  out = np.zeros((length, patches.shape[1]), np.uint8)
  out[:n] = patches
  mask = np.zeros(length, np.int32)
  mask[:n] = 1
  return {"patches": out, "patch_mask": mask,
          "spatial_shapes": np.array([h // patch, w // patch], np.int32)}


def encode_batch(images, patch, max_num_patches, length=None):
  """A list of uint8 images (any sizes) -> the batch dict, stacked."""
  rows = [encode(im, patch, max_num_patches, length) for im in images]
  return {k: np.stack([r[k] for r in rows]) for k in KEYS}


def to_float(patches, patch_mask):
  """uint8 patches -> float32 in [-1, 1] (x / 127.5 - 1); padding patches 0, as the processor
  pads them after normalising. Works on numpy and jax arrays."""
  if isinstance(patches, np.ndarray):
    xp = np
  else:
    import jax.numpy as xp   # pylint: disable=import-outside-toplevel
  x = patches.astype(xp.float32) * (2.0 / 255.0) - 1.0
  return x * patch_mask[..., None].astype(xp.float32)


# ------------------------------------------------------------- the per-step length plan

def _mix(x):
  """splitmix64's finalizer on uint64 arrays (as the loader's permutation)."""
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class LengthPlan:
  """Step s's sequence length and global batch, and where its examples start in the slot
  stream: pure functions of (seed, s), so a resumed or rescaled run draws the same.

  The length is drawn uniformly from `seq_lens` per step (SigLIP 2); `batch_by_len` gives a
  length its own global batch (SigLIP 2 halves it at 1024). Slots are consumed in order, so
  step s starts at the sum of the batches of the steps before it: cached per block of steps.
  """
  BLOCK = 4096

  def __init__(self, seq_lens, batch_size, batch_by_len=(), seed=0):
    self.seq_lens = tuple(int(n) for n in seq_lens)
    self.batch_by_len = {int(n): int(b) for n, b in dict(batch_by_len).items()}
    self.sizes = np.array([self.batch_by_len.get(n, int(batch_size)) for n in self.seq_lens],
                          np.int64)
    self.seed = int(seed)
    self._starts = [0]   # slot at which each block of steps starts

  def _choice(self, steps):
    steps = np.asarray(steps, np.int64).astype(np.uint64)
    key = _mix(np.uint64(0x6A09E667F3BCC908) ^ np.uint64(self.seed & 0xFFFFFFFFFFFFFFFF))
    return (_mix(key ^ steps) % np.uint64(len(self.seq_lens))).astype(np.int64)

  def length(self, step):
    return self.seq_lens[int(self._choice([step])[0])]

  def batch(self, step):
    return int(self.sizes[self._choice([step])[0]])

  def first_slot(self, step):
    step = int(step)
    block, within = divmod(step, self.BLOCK)
    while len(self._starts) <= block:
      b = len(self._starts) - 1
      steps = np.arange(b * self.BLOCK, (b + 1) * self.BLOCK)
      self._starts.append(self._starts[-1] + int(self.sizes[self._choice(steps)].sum()))
    steps = np.arange(block * self.BLOCK, block * self.BLOCK + within)
    return self._starts[block] + int(self.sizes[self._choice(steps)].sum())
