"""One raw record -> (uint8 image [S, S, 3], int32 tokens [L]), or `BadRecord(reason)`.

A raw record is what a source returns (see `sources.py`): `{"image": encoded bytes | uint8 array |
None, "texts": str | bytes | list of them | None, "key": str}`, optionally `"error": reason` when
the source already knows it is unusable. Everything here is numpy/PIL only (no JAX): it runs in
Grain's worker processes, which should start fast.

Images stay uint8 through decode and resize (what PIL works in); the loader maps them to float
[-1, 1] on the accelerator (`to_float` is the same map on the host), which keeps host memory and
host-to-device traffic at a quarter of float32's.

Randomness (caption choice, random resized crop, flip) comes from `rng_for(seed, slot)`: a pure
function of the seed and the example's slot in the global stream, so whichever process or worker
renders a slot renders the same example.
"""
import io
import unicodedata
import warnings

import numpy as np
from PIL import Image, ImageFile

from siglip_jax.data import tokenizer as tokenizer_lib
from siglip_jax.data import views as views_lib

# Reasons a record is skipped; `check` and the loader count them under these names. The last
# group comes from the sources: tar shards (webdataset.py) and folders (sources.FolderSource).
REASONS = ("missing_image", "undecodable_image", "truncated_image", "image_too_large",
           "missing_caption", "blank_caption", "caption_too_large", "bad_metadata",
           "read_error", "duplicate_key", "member_out_of_bounds", "truncated_shard",
           "outside_folder", "not_a_regular_file",
           "extreme_aspect_ratio")   # NaFlex: too long for the patch budget at 1 patch across
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
RESIZE_MODES = ("squash", "crop")
METHODS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

# A truncated file must fail, not decode to a half-grey image that we would train on.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadRecord(Exception):
  """A record that cannot be used; `reason` is one of REASONS."""

  def __init__(self, reason, detail=""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


def rng_for(seed, slot):
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(slot)])


# ---------------------------------------------------------------------------------------- text

def caption_list(texts):
  """str | bytes | array | list of them | None -> list of str (possibly empty)."""
  if texts is None:
    return []
  if isinstance(texts, (str, bytes, np.bytes_, np.str_)):
    texts = [texts]
  out = []
  for t in np.asarray(texts, dtype=object).reshape(-1):
    out.append(t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t))
  return out


def is_blank(text):
  """Nothing but whitespace and control or format characters (NUL, ESC, zero-width space,
  BOM...): nothing a tokenizer could learn from."""
  return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


def pick_caption(texts, rng):
  """One non-blank caption, drawn with `rng` when there are several."""
  texts = caption_list(texts)
  if not texts:
    raise BadRecord("missing_caption")
  usable = [t.strip() for t in texts if not is_blank(t)]
  if not usable:
    raise BadRecord("blank_caption")
  return usable[int(rng.integers(len(usable)))] if len(usable) > 1 else usable[0]


# --------------------------------------------------------------------------------------- image

def _to_rgb(img):
  """Any PIL mode -> RGB. Transparent pixels go onto white (how web pages show them); the
  colour stored under alpha 0 is often arbitrary (black), which plain dropping would keep."""
  if img.mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):   # 16-bit / float PNG, TIFF
    arr = np.asarray(img, np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
    img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img if img.mode == "RGB" else img.convert("RGB")   # L, 1, CMYK, YCbCr, LAB, ...


def decode_image(data, draft_size=None):
  """Encoded bytes or a uint8 array -> an RGB PIL image, fully decoded.

  `draft_size`: for JPEGs, let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay
  >= draft_size (much faster on big photos; truncation is still detected, all data is read).
  """
  if data is None:
    raise BadRecord("missing_image")
  if isinstance(data, np.ndarray):   # TFDS with decoding on: already pixels
    arr = data if data.dtype == np.uint8 else np.clip(data, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
      arr = arr[..., 0]
    try:
      return _to_rgb(Image.fromarray(arr))
    except (TypeError, ValueError) as e:
      raise BadRecord("undecodable_image", f"array of shape {arr.shape}") from e
  if not data:
    raise BadRecord("missing_image", "empty image member")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(bytes(data)))
      if draft_size and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
      img.load()
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise BadRecord("image_too_large", str(e)[:120]) from None
  except Image.UnidentifiedImageError as e:
    raise BadRecord("undecodable_image", str(e)[:120]) from None
  except Exception as e:  # pylint: disable=broad-except
    # PIL says "truncated" when the data ends early. Corrupt streams raise whatever the format
    # plugin trips on (OSError, SyntaxError, struct.error, ZeroDivisionError, ...): all of them
    # mean this record, not the run, is bad.
    reason = "truncated_image" if "truncat" in str(e).lower() else "undecodable_image"
    raise BadRecord(reason, f"{type(e).__name__}: {str(e)[:120]}") from None
  if img.width < 1 or img.height < 1:
    raise BadRecord("undecodable_image", f"size {img.size}")
  try:
    return _to_rgb(img)
  except (OSError, ValueError) as e:
    raise BadRecord("undecodable_image", str(e)[:120]) from None


def _center_box(w, h, mode):
  if mode == "squash":
    return (0, 0, w, h)
  side = min(w, h)
  left, top = (w - side) / 2, (h - side) / 2
  return (left, top, left + side, top + side)


def random_box(w, h, rng, scale, ratio):
  """Inception-style crop (as torchvision's RandomResizedCrop): area fraction in `scale`,
  aspect ratio log-uniform in `ratio`; ten tries, then the central square."""
  area = w * h
  log_r = np.log(ratio)
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = float(np.exp(rng.uniform(*log_r)))
    cw, ch = np.sqrt(target * aspect), np.sqrt(target / aspect)
    if 1 <= cw <= w and 1 <= ch <= h:
      left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
      return (left, top, left + cw, top + ch)
  return _center_box(w, h, "crop")


class Preprocessor:
  """Callable `(raw record, slot) -> {"image": uint8 [S, S, 3], "text": int32 [L]}`.

  With `decoder` (the LocCa objective's text settings: decoder_len, text_vocab, loc_bins,
  parallel_fraction) the example also holds the decoder's three passes (`decoder_text`) as
  "dec_inputs", "dec_targets", "dec_task" (int32 [3 * decoder_len]), its regions moved with the
  pixels ("regions": boxes float32 [max_regions, 4], "region_mask"), and how many regions were
  dropped ("skipped_regions"). Picklable: the SentencePiece model is loaded lazily in whichever
  process uses it.
  """

  def __init__(self, *, image_size=224, text_len=64, tokenizer=None, lowercase=True,
               strip_punctuation=False, eos="sticky", pad_id=None, resize="squash",
               method="bicubic", random_crop=False, crop_scale=(0.08, 1.0),
               crop_ratio=(3 / 4, 4 / 3), flip=False, jpeg_draft=True, seed=0, decoder=None,
               max_regions=16, views=None, naflex_patch=None):
    if resize not in RESIZE_MODES:
      raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if method not in METHODS:
      raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    self.image_size, self.text_len = int(image_size), int(text_len)
    self.resize, self.method = resize, method
    self.random_crop, self.crop_scale, self.crop_ratio = bool(random_crop), crop_scale, crop_ratio
    self.flip, self.seed = bool(flip), int(seed)
    # A random crop may zoom into a small region: decode at full resolution then.
    self.draft = self.image_size if (jpeg_draft and not self.random_crop) else None
    self._tok_args = dict(path=tokenizer or None, lowercase=lowercase,
                          strip_punctuation=strip_punctuation, eos=eos, pad_id=pad_id)
    self._tok = None
    self.decoder, self.max_regions = (dict(decoder) if decoder else None), int(max_regions)
    self._decoder_text = None
    self.views = dict(views) if views else None   # SILC/TIPS's crops (`views.py`)
    # NaFlex: the patch size; each image keeps its aspect ratio, resized to the step's budget.
    self.naflex_patch = int(naflex_patch) if naflex_patch else None
    if self.naflex_patch:
      self.draft = None   # the target size depends on the budget: decode whole

  @property
  def decoder_text(self):
    if self._decoder_text is None and self.decoder:
      from siglip_jax.data import decoder_text
      cfg = {k: v for k, v in self.decoder.items() if k != "parallel_fraction"}
      self._decoder_text = decoder_text.DecoderText(self.tokenizer, **cfg)
    return self._decoder_text

  @property
  def tokenizer(self):
    if self._tok is None:
      self._tok = tokenizer_lib.Tokenizer(**self._tok_args)
    return self._tok

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_tok"] = state["_decoder_text"] = None
    return state

  def check(self, raw):
    """Raises BadRecord if `raw` is unusable (caption first: it is cheap); returns None."""
    self._parts(raw, rng_for(self.seed, 0))

  def _parts(self, raw, rng):
    if raw.get("error"):
      raise BadRecord(raw["error"])
    caption = pick_caption(raw.get("texts"), rng)
    return decode_image(raw.get("image"), self.draft), caption

  def geometry(self, w, h, rng):
    """(crop box in pixels, flipped) for a w x h image: what `pixels` does, and what moves
    regions' boxes with the pixels (the draws in the same order)."""
    if self.random_crop:
      box = random_box(w, h, rng, self.crop_scale, self.crop_ratio)
    else:
      box = _center_box(w, h, self.resize)
    return box, bool(self.flip and rng.random() < 0.5)

  def pixels(self, img, rng, geometry=None):
    box, flipped = geometry or self.geometry(*img.size, rng)
    size = (self.image_size, self.image_size)
    # `box` crops and resizes in one resample: no intermediate full-size copy.
    out = np.asarray(img.resize(size, METHODS[self.method], box=box), np.uint8)
    if flipped:
      out = out[:, ::-1]
    return np.ascontiguousarray(out)

  def _as_is(self, raw):
    """Pixels already at the training size (a rendered set) and nothing random to apply:
    resizing to the same size would be the identity."""
    data = raw.get("image")
    return (not self.random_crop and not self.flip and isinstance(data, np.ndarray)
            and data.dtype == np.uint8 and data.shape == (self.image_size, self.image_size, 3)
            and not raw.get("error"))

  def __call__(self, raw, slot, tokenize=True, with_views=False, seq_len=None):
    """`with_views`: also SILC/TIPS's views (`views.draw`; from the switch step on).
    `seq_len`: a NaFlex run's patch budget at this step (`naflex_patch` set)."""
    if self.naflex_patch:
      return self._naflex(raw, slot, tokenize, seq_len)
    geometry, img = None, None
    if self._as_is(raw):
      texts = raw.get("texts")
      rng = None if isinstance(texts, str) and not self.decoder else rng_for(self.seed, slot)
      image, caption = raw["image"], pick_caption(texts, rng)
    else:
      rng = rng_for(self.seed, slot)
      img, caption = self._parts(raw, rng)
      geometry = self.geometry(*img.size, rng) + img.size
      image = self.pixels(img, rng, geometry[:2])
    text = self.tokenizer.encode([caption], self.text_len)[0] if tokenize else caption
    example = {"image": image, "text": text}
    if self.decoder:
      example.update(self._decoder_fields(raw, caption, geometry, rng))
    if with_views and self.views:
      if img is None or self.draft:   # crops zoom in: the full-resolution pixels
        img = decode_image(raw.get("image"))
      example.update(views_lib.draw(img, views_lib.rng_for(self.seed, slot), self.views,
                                    METHODS[self.method]))
    return example

  def _naflex(self, raw, slot, tokenize, seq_len):
    """{"patches": uint8 [seq_len, p*p*3], "patch_mask", "spatial_shapes", "text", ...}: the
    whole image at its aspect ratio (a flip at most), resized for `seq_len` patches."""
    from siglip_jax.data import naflex   # pylint: disable=import-outside-toplevel
    rng = rng_for(self.seed, slot)
    data = raw.get("image")
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3 \
        and data.shape[-1] == 3 and not raw.get("error"):   # rendered pixels: no PIL round trip
      pixels, caption = data, pick_caption(raw.get("texts"), rng)
    else:
      img, caption = self._parts(raw, rng)
      pixels = np.asarray(img, np.uint8)
    h, w = pixels.shape[:2]
    flipped = bool(self.flip and rng.random() < 0.5)
    if flipped:
      pixels = pixels[:, ::-1]
    try:
      example = naflex.encode(np.ascontiguousarray(pixels), self.naflex_patch, seq_len)
    except naflex.TooManyPatches as e:
      raise BadRecord("extreme_aspect_ratio", str(e)) from None
    example["text"] = self.tokenizer.encode([caption], self.text_len)[0] if tokenize \
        else caption
    if self.decoder:   # boxes are fractions of the image: a whole-image resize keeps them
      example.update(self._decoder_fields(raw, caption, ((0, 0, w, h), flipped, w, h), rng))
    return example

  def _decoder_fields(self, raw, caption, geometry, rng):
    """The LocCa passes and the regions (see the class docstring)."""
    from siglip_jax.data import regions as regions_lib
    found, bad = regions_lib.parse(raw)
    if geometry is not None:
      crop, flipped, w, h = geometry
      found, cut = regions_lib.move(found, crop, w, h, flipped)
      bad += cut
    bad += max(len(found) - self.max_regions, 0)
    found = found[:self.max_regions]
    refexp, grounded = regions_lib.pick(found, rng)
    parallel = bool(rng.random() < self.decoder.get("parallel_fraction", 0.0))
    inputs, targets, task = self.decoder_text.passes(caption, refexp, grounded, parallel)
    boxes, mask = regions_lib.padded(found, self.max_regions)
    return {"dec_inputs": inputs.reshape(-1), "dec_targets": targets.reshape(-1),
            "dec_task": task.reshape(-1), "regions": boxes, "region_mask": mask,
            "skipped_regions": bad}


def to_float(images):
  """uint8 pixels -> float32 in [-1, 1] (the model's input range)."""
  return np.asarray(images, np.float32) * (2.0 / 255.0) - 1.0


def from_config(config):
  """A Preprocessor from a training config's `input` block (missing keys take defaults)."""
  inp = config.input
  get = inp.get
  return Preprocessor(
      image_size=inp.image_size, text_len=inp.text_len, tokenizer=get("tokenizer", "") or None,
      **tokenizer_lib.options_from_input(inp), resize=get("resize", "squash"),
      method=get("resize_method", "bicubic"), random_crop=get("random_crop", False),
      crop_scale=tuple(get("crop_scale", (0.08, 1.0))),
      flip=get("flip", False), jpeg_draft=get("jpeg_draft", True), seed=config.seed,
      decoder=decoder_settings(config), max_regions=get("max_regions", 16),
      views=view_settings(config), naflex_patch=_naflex_patch(config))


def _naflex_patch(config):
  from siglip_jax import naflex_config   # pylint: disable=import-outside-toplevel
  return naflex_config.patch_size(config) if naflex_config.is_naflex(config) else None


def view_settings(config):
  """SILC/TIPS's view settings when either is on, else None."""
  if not config.get("objectives") or "silc" not in config.objectives:
    return None
  from siglip_jax.objectives import distill_config
  return distill_config.view_settings(config)


def decoder_settings(config):
  """The LocCa decoder's text settings when `objectives.locca` is on, else None."""
  objectives = config.get("objectives")
  if not objectives or float(objectives.locca.weight) <= 0:
    return None
  from siglip_jax.data import tokenizer as tok
  text_vocab = config.model.text.get("vocab_size") or tok.Tokenizer(
      config.input.get("tokenizer", "") or None).vocab_size
  return dict(decoder_len=config.input.decoder_len, text_vocab=int(text_vocab),
              loc_bins=config.input.loc_bins,
              parallel_fraction=float(objectives.locca.parallel_fraction))
