"""The SigLIP inference handle: encode images and texts, with the learned scale and bias.

Used by `siglip_jax.load` (`load` below: a workdir, checkpoint, big_vision `.npz` or HF folder),
by the evaluators during training and by the notebook. Inputs are cut into fixed-size batches
(the last one padded) so each tower compiles once (a NaFlex tower once per sequence length);
with a mesh, each batch is sharded over its batch axes, each process giving its own slice.
"""
import logging
import os
from typing import NamedTuple

import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from etils import epath


TOWER_NAMES = ("img", "txt", "t", "b")   # what exports and the towers hold


class SigLIP:
  """encode_image(float32 [N,H,W,3] in [-1,1]) / encode_text(int32 [N,L]) -> [N,D] normalized;
  encode_patches(images) -> the image tower's patch tokens [N, h*w, width] (before pooling).

  A NaFlex model (`two_towers.is_naflex(model)`) has `image_size` None, `max_num_patches` (the
  default patch budget) and `preprocess`; its `encode_image` takes a list of uint8 [H, W, 3]
  arrays or PIL images of any sizes, or the dict `preprocess` returns."""

  def __init__(self, model, params, *, image_size, text_len, vocab_size, tokenizer=None,
               batch_size=256, mesh=None, config=None, decoding=None, max_num_patches=None):
    from siglip_jax.models import two_towers
    self.model, self.params, self.decoding = model, params, decoding
    self.naflex = two_towers.is_naflex(model)
    if self.naflex:
      from siglip_jax.interop import naflex_spec
      self.image_size = None
      self.max_num_patches = int(max_num_patches or naflex_spec.DEFAULT_MAX_NUM_PATCHES)
      self.patch_size = two_towers.image_tower(model).dims["patch_size"][0]
    else:
      self.image_size, self.max_num_patches, self.patch_size = int(image_size), None, None
    self.text_len, self.vocab_size = int(text_len), int(vocab_size)
    self.tokenizer, self.config, self.mesh = tokenizer, config, mesh
    if mesh is not None:
      from siglip_jax import mesh as mesh_lib
      n = int(np.prod([mesh.shape[a] for a in mesh_lib.batch_axes(mesh)]))
      batch_size = -(-batch_size // n) * n
      in_sh = NamedSharding(mesh, P(mesh_lib.batch_axes(mesh)))
      rep = NamedSharding(mesh, P())
      jit = lambda f: jax.jit(f, in_shardings=(None, in_sh), out_shardings=rep)
    else:
      jit = jax.jit
    self.batch_size = batch_size
    self._img = jit(lambda p, x: model.apply({"params": p}, x, None)[0])
    self._txt = jit(lambda p, x: model.apply({"params": p}, None, x)[1])
    self._patches = jit(lambda p, x: _patch_tokens(model.apply({"params": p}, x, None)[2]))

  @property
  def t(self):
    return float(np.exp(np.asarray(jax.device_get(self.params["t"])).reshape(())))

  @property
  def b(self):
    return float(np.asarray(jax.device_get(self.params["b"])).reshape(())) if "b" in self.params else 0.0

  def _run(self, fn, x, dtype=None):
    """`fn` over `x` (an array, or a dict of arrays with one leading batch axis) in batches of
    `batch_size`, the last one padded with copies of its last row."""
    x = jax.tree.map(lambda a: np.asarray(a, dtype), x)
    total = len(jax.tree.leaves(x)[0])
    if total == 0:
      raise ValueError("nothing to encode: the input is empty")
    out = []
    for start in range(0, total, self.batch_size):
      chunk = jax.tree.map(lambda a: a[start:start + self.batch_size], x)
      n = min(self.batch_size, total - start)
      if n < self.batch_size:   # pad to the compiled size
        chunk = jax.tree.map(
            lambda a: np.concatenate([a, np.repeat(a[-1:], self.batch_size - n, 0)]), chunk)
      out.append(self._gather(fn(self.params, self._put(chunk)))[:n])
    return np.concatenate(out).astype(np.float32)

  def _put(self, chunk):
    if self.mesh is None or jax.process_count() == 1:
      return jax.tree.map(jnp.asarray, chunk)
    from siglip_jax import mesh as mesh_lib
    sharding = NamedSharding(self.mesh, P(mesh_lib.batch_axes(self.mesh)))
    per = len(jax.tree.leaves(chunk)[0]) // jax.process_count()
    lo = jax.process_index() * per
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, a[lo:lo + per]), chunk)

  @staticmethod
  def _gather(y):
    # A replicated output is whole on every process: read the local copy.
    return np.asarray(y.addressable_data(0)) if hasattr(y, "addressable_data") else np.asarray(y)

  def _check_images(self, images, what):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"{what} wants float32 [N, H, W, 3]; got shape {images.shape}")
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"{what}: images are {images.shape[1]}x{images.shape[2]}, "
                       f"the model takes {self.image_size}x{self.image_size}")
    return images

  def encode_image(self, images):
    if self.naflex:
      return self._run(self._img, self._naflex_batch(images))
    return self._run(self._img, self._check_images(images, "encode_image"), np.float32)

  def encode_patches(self, images):
    """The image tower's patch tokens before the MAP head (or other pooling; a [cls] token is
    left out): float32 [N, h*w, width], row-major over the patch grid, for images as
    `encode_image` takes them (float32 [N, H, W, 3] in [-1, 1])."""
    if self.naflex:
      raise ValueError("encode_patches is not implemented for NaFlex models (each image has "
                       "its own patch grid): apply the model to preprocess(images) and read "
                       "`img/encoded` with `patch_mask` instead")
    return self._run(self._patches, self._check_images(images, "encode_patches"), np.float32)

  # NaFlex models: images of any size, cut into at most `max_num_patches` patches each.

  def preprocess(self, images, max_num_patches=None):
    """A list of uint8 [H, W, 3] arrays or PIL images (any sizes) -> {"patches": float32
    [N, max_num_patches, p*p*3] in [-1, 1] (padding 0), "patch_mask": int32 [N, max_num_patches],
    "spatial_shapes": int32 [N, 2]}, resized as transformers' Siglip2ImageProcessor does."""
    from siglip_jax.data import naflex
    if not self.naflex:
      raise ValueError(f"preprocess is for NaFlex models; this one takes float32 [N, "
                       f"{self.image_size}, {self.image_size}, 3] images in [-1, 1]")
    budget = int(max_num_patches or self.max_num_patches)
    rows = []
    for i, image in enumerate(images):
      try:
        rows.append(naflex.encode(_uint8_rgb(image, i), self.patch_size, budget))
      except ValueError as e:   # naflex.TooManyPatches included
        raise ValueError(f"preprocess: image {i}: {e}") from None
    if not rows:
      raise ValueError("nothing to encode: the input is empty")
    batch = {k: np.stack([r[k] for r in rows]) for k in naflex.KEYS}
    batch["patches"] = naflex.to_float(batch["patches"], batch["patch_mask"])
    return batch

  def _naflex_batch(self, images):
    """`encode_image`'s input as the model's dict: preprocessed when it is a list of images."""
    from siglip_jax.data import naflex
    if not isinstance(images, dict):
      if isinstance(images, np.ndarray) and images.dtype != np.uint8:
        raise ValueError("encode_image of a NaFlex model takes a list of uint8 [H, W, 3] images "
                         "(or PIL images) or the dict preprocess(images) returns; got a "
                         f"{images.dtype} array {images.shape}")
      return self.preprocess(images)
    missing = [k for k in naflex.KEYS if k not in images]
    if missing:
      raise ValueError(f"encode_image: the NaFlex batch dict lacks {missing}; it needs "
                       f"{list(naflex.KEYS)} (as preprocess returns)")
    patches, mask = np.asarray(images["patches"]), np.asarray(images["patch_mask"], np.int32)
    shapes = np.asarray(images["spatial_shapes"], np.int32)
    width = self.patch_size ** 2 * 3
    if (patches.ndim != 3 or patches.shape[-1] != width or mask.shape != patches.shape[:2]
        or shapes.shape != (len(patches), 2)):
      raise ValueError(f"encode_image: a NaFlex batch is patches [N, L, {width}], patch_mask "
                       f"[N, L], spatial_shapes [N, 2]; got {patches.shape}, {mask.shape}, "
                       f"{shapes.shape}")
    if patches.dtype == np.uint8:   # data/naflex.py's encode_batch: not yet in [-1, 1]
      patches = naflex.to_float(patches, mask)
    return {"patches": patches.astype(np.float32), "patch_mask": mask, "spatial_shapes": shapes}

  def encode_text(self, tokens):
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != self.text_len:
      raise ValueError(f"encode_text wants int32 [N, {self.text_len}]; got shape {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= self.vocab_size:
      raise ValueError(f"encode_text: token ids must lie in [0, {self.vocab_size})")
    return self._run(self._txt, tokens, np.int32)

  def tokenize(self, texts):
    if self.tokenizer is None:
      raise ValueError("no SentencePiece model is known for this model: pass token ids to "
                       "encode_text instead")
    return self.tokenizer.encode(list(texts), self.text_len)

  def encode_strings(self, texts):
    return self.encode_text(self.tokenize(texts))

  # With a LocCa decoder (a workdir or checkpoint trained with objectives.locca).

  @property
  def has_decoder(self):
    return self.decoding is not None

  def _decoder(self):
    if self.decoding is None:
      raise ValueError("this model has no LocCa decoder: caption/locate/describe need a "
                       "workdir or checkpoint trained with objectives.locca")
    return self.decoding

  def caption(self, images):
    """Captions of images (float32 [N, H, W, 3] in [-1, 1]) -> list of str."""
    return self._decoder().caption(images)

  def locate(self, images, texts):
    """Boxes [N, 4] (x0, y0, x1, y1 in [0, 1], x right, y down) of what each text names."""
    return self._decoder().locate(images, list(texts))

  def describe(self, images, boxes):
    """Captions of the regions `boxes` [N, 4] of images (grounded captioning)."""
    return self._decoder().describe(images, np.asarray(boxes, np.float32))


def _uint8_rgb(image, index):
  """A PIL image or uint8 [H, W, 3] array -> uint8 [H, W, 3]; ValueError naming `index`."""
  if hasattr(image, "convert") and hasattr(image, "size"):   # PIL, without importing it
    image = image.convert("RGB")
  arr = np.asarray(image)
  if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
    raise ValueError(f"preprocess: image {index} is a {arr.dtype} array {arr.shape}; expected "
                     "uint8 [H, W, 3] (or a PIL image)")
  return arr


def _patch_tokens(out):
  """The patch tokens of a TwoTowers' intermediates: `img/encoded` less any leading [cls]
  token (the stem's grid says how many patches there are)."""
  encoded = out["img/encoded"]
  _, h, w, _ = out["img/stem"].shape
  return encoded[:, encoded.shape[1] - h * w:]


# ------------------------------------------------------------------ load(path)

class Source(NamedTuple):
  """A model read from disk: per-layer params {name: float32 array}, its spec (see
  `interop.big_vision`), a SentencePiece path or None, and what kind of source it was."""
  params: dict
  spec: dict
  tokenizer_path: str | None
  kind: str   # "checkpoint" | "big_vision" | "hf"
  tokenizer_options: dict | None = None   # the run's text options (Tokenizer kwargs)
  # A checkpoint's LocCa decoder: ({name: array} under decoder/, the run's config) or None.
  decoder: tuple | None = None

  def tokenizer(self):
    """The Tokenizer the model was trained with, text options included, or None."""
    from siglip_jax.data import tokenizer as tok
    if not self.tokenizer_path:
      return None
    return tok.Tokenizer(self.tokenizer_path, **(self.tokenizer_options or {}))


def _checkpoint_source(path):
  from siglip_jax import checkpoint_read
  from siglip_jax.data import tokenizer as tok
  from siglip_jax.interop import big_vision
  # Params and config from one step: the newest readable one of a workdir (a damaged newer
  # one is skipped with a warning), verified against the fingerprints saved with it.
  ckpt = checkpoint_read.read(path)
  flat = big_vision.unscan(ckpt.params)
  cfg = ckpt.config
  # Parameters only training uses stay out of the towers (and out of every export); the
  # decoder is kept for caption/locate/describe.
  extra = {k: flat.pop(k) for k in [k for k in flat if k.split("/")[0] not in TOWER_NAMES]}
  decoder = ({k[len("decoder/"):]: v for k, v in extra.items() if k.startswith("decoder/")},
             cfg) if any(k.startswith("decoder/") for k in extra) else None
  model, inp = cfg.get("model") or {}, cfg.get("input") or {}
  img, txt = model.get("image") or {}, model.get("text") or {}
  # What arrays cannot tell (gap vs "0" pooling, a sincos posemb's size) comes from the run.
  spec = big_vision.infer_spec(
      flat, image={"pool_type": img.get("pool_type", "map"), "posemb": img.get("posemb", "learn")},
      text={"pool_type": txt.get("pool_type", "last")},
      image_size=inp.get("image_size"), text_len=inp.get("text_len"),
      max_num_patches=inp.get("max_num_patches"))   # a NaFlex run's handle and HF budget
  big_vision.check_params(flat, spec, f"checkpoint {path}")
  sp = inp.get("tokenizer") or tok.DEMO_MODEL
  if not os.path.isfile(sp):
    logging.warning("the run's tokenizer %s is not on this machine: no tokenize()", sp)
    sp = None
  return Source(flat, spec, sp, "checkpoint", tok.options_from_input(inp), decoder)


def read_source(path):
  """A training workdir, a checkpoint folder, a big_vision `.npz` or an HF SigLIP or SigLIP 2
  (NaFlex) folder; all but the HF folder may also be URLs (gs://...)."""
  from siglip_jax import paths
  from siglip_jax.interop import big_vision, hf, hf_siglip2
  path = os.fspath(path)
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"no such file or folder: {path}")
  if epath.Path(path).is_file():
    if not path.endswith(".npz"):
      raise ValueError(f"{path}: a file must be a big_vision .npz checkpoint")
    return Source(*big_vision.load_npz(path), None, "big_vision")
  if not paths.is_remote(path) and hf.is_hf_folder(path):
    from siglip_jax.interop import hf_tokenizer
    reader = hf_siglip2 if hf_siglip2.is_folder(path) else hf
    return Source(*reader.load(path), "hf", hf_tokenizer.read_options(path))
  return _checkpoint_source(path)


def load(path, *, batch_size=64):
  """The SigLIP handle (single device, float32) for whatever `read_source` reads."""
  from flax import traverse_util
  from siglip_jax.interop import big_vision
  src = read_source(path)
  nested = traverse_util.unflatten_dict(
      {tuple(k.split("/")): jnp.asarray(v) for k, v in src.params.items()})
  tokenizer = src.tokenizer()
  spec = src.spec
  model = big_vision.make_model(spec)
  decoding = None
  if src.decoder is not None and tokenizer is not None:
    decoding = _decoding(model, nested, src.decoder, spec["text"]["vocab_size"], tokenizer)
  return SigLIP(model, nested, image_size=spec["image_size"], text_len=spec["text_len"],
                vocab_size=spec["text"]["vocab_size"], tokenizer=tokenizer,
                batch_size=batch_size, config=spec, decoding=decoding,
                max_num_patches=spec.get("max_num_patches"))


def _decoding(model, tower_params, decoder, text_vocab, tokenizer):
  """The Decoding of a checkpoint's decoder params, built as its run's config built it."""
  import ml_collections
  from flax import traverse_util
  from siglip_jax import config_defaults, decoding
  from siglip_jax.objectives import locca
  flat, cfg = decoder
  config = config_defaults.complete(ml_collections.ConfigDict(cfg))
  params = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                         for k, v in flat.items()})
  return decoding.Decoding(model, tower_params, locca.make_decoder(config, text_vocab), params,
                           tokenizer)
