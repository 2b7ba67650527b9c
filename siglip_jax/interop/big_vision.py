"""big_vision SigLIP `.npz` checkpoints: read (any dimensions, either block layout), write.

The published files (and big_vision's own `save_checkpoint`) hold one array per parameter, named
by its '/'-joined path under `params/` (`params/img/embedding/kernel`, ...); open_clip's
`load_big_vision_weights` reads exactly those names. Blocks come per layer (`encoderblock_N`,
published) or scanned (`encoderblock`, a leading depth axis). Our param tree has big_vision's
names, so reading is renaming-free: strip the prefix, unstack scanned blocks, then *infer* the
model from the array shapes and check every array against that model's own abstract params, so
a file that does not fit fails here, naming the arrays, rather than deep inside a jit.

A "spec" (the dict `infer_spec` returns) describes a two-tower model completely:
  image: patch_size, width, depth, mlp_dim, num_heads, pool_type, posemb, rep_size
  text:  width, depth, mlp_dim, num_heads, vocab_size, pool_type
  out_dim (image, text head widths or None), bias_init (None: no `b`), image_size, text_len.
A NaFlex model's (2-D `img/embedding/kernel`) also has image_model and max_num_patches:
interop/naflex_spec.py.
"""
import io
import math
import os
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from etils import epath

from siglip_jax import models
from siglip_jax.interop import naflex_spec

PREFIX = "params/"
_TOWERS = {"img": "img/Transformer", "txt": "txt/Encoder_0"}
_SCANNED = re.compile(r"^(.*)/encoderblock/(.*)$")
_LAYER = re.compile(r"^(.*)/encoderblock_(\d+)/(.*)$")


def name_list(names, limit=5):
  names = sorted(names)
  more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


# ------------------------------------------------------------------ reading the file

def _as_float32(name, arr, path):
  if arr.dtype.kind == "V" and arr.dtype.itemsize == 2:   # bfloat16 saved by numpy as raw bytes
    arr = arr.view(jnp.bfloat16)
  if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == jnp.bfloat16):
    raise ValueError(f"{path}: array {name!r} has dtype {arr.dtype}; a SigLIP checkpoint holds "
                     "only floating-point weights")
  return np.asarray(arr, np.float32)


def read_npz(path):
  """{name: float32 array} of a big_vision `.npz`, `params/` prefix stripped. Never unpickles."""
  from siglip_jax import paths
  path = os.fspath(path)
  try:
    # A URL (gs://big_vision/...) is read whole through etils.epath; a local file directly.
    data = np.load(io.BytesIO(epath.Path(path).read_bytes()) if paths.is_remote(path) else path,
                   allow_pickle=False)
  except FileNotFoundError:
    raise
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not a readable .npz file ({e})") from None
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ValueError(f"{path} holds a single array, not a named set of SigLIP weights")
  with data:
    names = list(data.files)
    # A full big_vision training checkpoint also holds `opt/...`: only `params/` is weights.
    if any(n.startswith(PREFIX) for n in names):
      names = [n for n in names if n.startswith(PREFIX)]
    flat = {}
    for name in names:
      try:
        arr = data[name]
      except ValueError as e:   # "Object arrays cannot be loaded when allow_pickle=False"
        raise ValueError(f"{path}: array {name!r} is a pickled object array, which is never "
                         f"loaded (allow_pickle=False): {e}") from None
      key = name[len(PREFIX):] if name.startswith(PREFIX) else name
      flat[key] = _as_float32(name, arr, path)
  return flat


def unscan(flat):
  """Scanned blocks (`.../encoderblock/...`, leading depth axis) -> `.../encoderblock_N/...`."""
  out, depths = {}, {}
  for name, arr in flat.items():
    m = _SCANNED.match(name)
    if not m:
      out[name] = arr
      continue
    tower, rest = m.groups()
    depths.setdefault(tower, {})[name] = arr.shape[0] if arr.ndim else 0
    for i in range(arr.shape[0] if arr.ndim else 0):
      out[f"{tower}/encoderblock_{i}/{rest}"] = arr[i]
  for tower, found in depths.items():
    if len(set(found.values())) > 1:
      raise ValueError(f"scanned blocks of {tower} disagree on the depth (leading axis): "
                       + "; ".join(f"{n} {d}" for n, d in sorted(found.items())))
    if any(k.startswith(f"{tower}/encoderblock_") for k in flat):
      raise ValueError(f"{tower} has both scanned (encoderblock) and per-layer "
                       "(encoderblock_N) blocks")
  return out


def match_layout(flat, names):
  """`flat`'s blocks in the layout `names` (a model's param names) uses, scanned or per layer:
  the same weights either way, so a scanned run can start from a per-layer file and back."""
  out = unscan(flat)
  for name in names:
    m = _SCANNED.match(name)
    if m and name not in out:
      tower, rest = m.groups()
      layers, i = [], 0
      while f"{tower}/encoderblock_{i}/{rest}" in out:
        layers.append(out.pop(f"{tower}/encoderblock_{i}/{rest}"))
        i += 1
      if layers:
        out[name] = np.stack(layers)
  return out


# ------------------------------------------------------------------ the model, from the arrays

def _need(flat, name, ndim, what):
  if name not in flat:
    raise ValueError(f"missing array {name} ({what})")
  arr = flat[name]
  if arr.ndim != ndim:
    raise ValueError(f"array {name} ({what}) has shape {arr.shape}; expected {ndim} dimensions")
  return arr.shape


def _depth(flat, tower):
  prefix = _TOWERS[tower] + "/encoderblock_"
  idx = {int(n[len(prefix):].split("/")[0]) for n in flat
         if n.startswith(prefix) and n[len(prefix):].split("/")[0].isdigit()}
  if not idx:
    raise ValueError(f"no transformer blocks under {_TOWERS[tower]}/ (encoderblock_N or a "
                     "scanned encoderblock)")
  gaps = sorted(set(range(max(idx) + 1)) - idx)
  if gaps:
    raise ValueError(f"{_TOWERS[tower]}: blocks {gaps} are missing (found {sorted(idx)})")
  return len(idx)


def _block(flat, tower):
  """(width, depth, mlp_dim, num_heads) of a tower's transformer, from block 0."""
  b0 = _TOWERS[tower] + "/encoderblock_0/"
  d, heads, _ = _need(flat, b0 + "MultiHeadDotProductAttention_0/query/kernel", 3,
                      "attention query kernel [width, heads, head_dim]")
  d_in, mlp = _need(flat, b0 + "MlpBlock_0/Dense_0/kernel", 2, "MLP kernel [width, mlp_dim]")
  if d_in != d:
    raise ValueError(f"{b0}: the MLP kernel's input width {d_in} contradicts the attention "
                     f"width {d}")
  return d, _depth(flat, tower), mlp, heads


def infer_spec(flat, *, image=None, text=None, image_size=None, text_len=None,
               max_num_patches=None):
  """The two-tower model `flat` (per-layer names, no prefix) holds. Keyword overrides supply
  what arrays cannot tell (a run config's pool types, a sincos posemb's image size, a NaFlex
  model's patch budget: interop/naflex_spec.py)."""
  image, text = dict(image or {}), dict(text or {})
  if not any(n.startswith("img/") for n in flat) or not any(n.startswith("txt/") for n in flat):
    raise ValueError("not a SigLIP two-tower checkpoint: expected img/..., txt/... and t arrays; "
                     f"found {name_list(flat) or 'no arrays'}")
  if naflex_spec.is_naflex_params(flat):
    img_spec, img_out = naflex_spec.image_spec(flat, _block(flat, "img"), image.get("pool_type"))
    extra = {"image_model": naflex_spec.NAFLEX,
             "max_num_patches": int(max_num_patches or naflex_spec.DEFAULT_MAX_NUM_PATCHES)}
    return {**_text_spec(flat, img_spec, img_out, text, text_len), "image_size": None, **extra}
  img_spec, img_out, size = _image_spec(flat, image, image_size)
  return {**_text_spec(flat, img_spec, img_out, text, text_len), "image_size": size}


def _image_spec(flat, image, image_size):
  """(image dict, image head width or None, image size) of a fixed-size ViT."""
  ph, pw, c, width = _need(flat, "img/embedding/kernel", 4, "patch embedding [p, p, 3, width]")
  if c != 3 or ph != pw:
    raise ValueError(f"img/embedding/kernel has shape {(ph, pw, c, width)}; expected square "
                     "patches of 3 channels [p, p, 3, width]")
  d, depth, mlp, heads = _block(flat, "img")
  if d != width:
    raise ValueError(f"image width: patch embedding {width} vs transformer {d}")
  posemb = image.get("posemb", "learn" if "img/pos_embedding" in flat else "sincos2d")
  size = image_size
  if posemb == "learn":
    _, n, _ = _need(flat, "img/pos_embedding", 3, "position embedding [1, tokens, width]")
    g = math.isqrt(n)
    if g * g != n:
      raise ValueError(f"img/pos_embedding has {n} positions, not a square grid of patches")
    if size is not None and size != g * ph:
      raise ValueError(f"image size {size} contradicts img/pos_embedding's {g}x{g} grid of "
                       f"{ph}-pixel patches")
    size = g * ph
  elif size is None:
    raise ValueError("cannot infer the image size: no img/pos_embedding (sincos position "
                     "embedding); give image_size")
  pool = image.get("pool_type") or ("map" if any(n.startswith("img/MAPHead_0/") for n in flat)
                                    else "tok" if "img/cls" in flat else "gap")
  rep = flat["img/pre_logits/kernel"].shape[-1] if "img/pre_logits/kernel" in flat else False
  img_out = flat["img/head/kernel"].shape[-1] if "img/head/kernel" in flat else None
  return (dict(patch_size=(ph, pw), width=width, depth=depth, mlp_dim=mlp, num_heads=heads,
               pool_type=pool, posemb=posemb, rep_size=rep), img_out, size)


def _text_spec(flat, img_spec, img_out, text, text_len):
  """The spec less `image_size`: the text tower's, `t` and `b` from the arrays."""
  vocab, t_width = _need(flat, "txt/Embed_0/embedding", 2, "token embedding [vocab, width]")
  td, t_depth, t_mlp, t_heads = _block(flat, "txt")
  if td != t_width:
    raise ValueError(f"text width: token embedding {t_width} vs transformer {td}")
  _, length, _ = _need(flat, "txt/pos_embedding", 3, "text position embedding [1, len, width]")
  if text_len is not None and text_len != length:
    raise ValueError(f"text length {text_len} contradicts txt/pos_embedding's {length}")
  t_pool = text.get("pool_type") or ("map" if any(n.startswith("txt/MAPHead_0/") for n in flat)
                                     else "last")
  txt_out = flat["txt/head/kernel"].shape[-1] if "txt/head/kernel" in flat else None
  _need(flat, "t", 1, "log temperature")
  return {
      "image": img_spec,
      "text": dict(width=t_width, depth=t_depth, mlp_dim=t_mlp, num_heads=t_heads,
                   vocab_size=vocab, pool_type=t_pool),
      "out_dim": (img_out, txt_out),
      # The value is only an init; loaded weights replace it. None: the model has no bias.
      "bias_init": -10.0 if "b" in flat else None,
      "text_len": length,
  }


def model_config(spec):
  """A `models.from_config` dict for `spec`: per-layer blocks, no remat (inference, export)."""
  fixed = dict(scan=False, remat_policy="none")
  out = {"image": {**spec["image"], **fixed}, "text": {**spec["text"], **fixed},
         "out_dim": tuple(spec["out_dim"]), "bias_init": spec["bias_init"]}
  if naflex_spec.is_naflex(spec):
    out["image_model"] = naflex_spec.NAFLEX
  return out


def make_model(spec):
  return models.from_config(model_config(spec))


def expected_shapes(spec):
  """{name: shape} of the params a `spec` model has (abstract: nothing is allocated)."""
  model = make_model(spec)
  size, length = spec["image_size"], spec["text_len"]
  image = (naflex_spec.dummy_image(spec) if naflex_spec.is_naflex(spec)
           else jnp.zeros((1, size, size, 3)))
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), image, jnp.zeros((1, length), jnp.int32)))
  flat = jax.tree_util.tree_flatten_with_path(params["params"])[0]
  return {"/".join(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in flat}


def check_params(flat, spec, source):
  """ValueError naming missing, extra and wrongly shaped arrays of `flat` for `spec`."""
  want = expected_shapes(spec)
  problems = []
  missing, extra = set(want) - set(flat), set(flat) - set(want)
  bad = [f"{n} {tuple(flat[n].shape)} (expected {want[n]})"
         for n in sorted(set(want) & set(flat)) if tuple(flat[n].shape) != want[n]]
  if missing:
    problems.append(f"missing {len(missing)} arrays: {name_list(missing)}")
  if extra:
    problems.append(f"{len(extra)} unexpected arrays: {name_list(extra)}")
  if bad:
    problems.append(f"{len(bad)} arrays contradict the model inferred from the others: "
                    + "; ".join(bad[:5]))
  if problems:
    raise ValueError(f"{source} does not hold a consistent SigLIP model "
                     f"({describe(spec)}):\n  " + "\n  ".join(problems))


def describe(spec):
  """One line: the model's dimensions."""
  i, t = spec["image"], spec["text"]
  size = (naflex_spec.describe(spec) if naflex_spec.is_naflex(spec)
          else f"{spec['image_size']}px patch {i['patch_size'][0]}")
  return (f"image {size} width {i['width']} depth {i['depth']} heads {i['num_heads']} pool "
          f"{i['pool_type']}; text len {spec['text_len']} vocab {t['vocab_size']} width "
          f"{t['width']} depth {t['depth']}")


def load_npz(path):
  """(flat per-layer params, spec) of a big_vision SigLIP `.npz`, checked for consistency."""
  flat = unscan(read_npz(path))
  if "txt/Encoder_0/pos_embedding" in flat and "txt/pos_embedding" in flat:
    # Some older big_vision text towers had a second position embedding inside the encoder,
    # also added to the input; big_vision's own `load` merges the two the same way.
    flat["txt/pos_embedding"] = flat["txt/pos_embedding"] + flat.pop("txt/Encoder_0/pos_embedding")
  try:
    spec = infer_spec(flat)
  except ValueError as e:
    raise ValueError(f"{os.fspath(path)}: {e}") from None
  check_params(flat, spec, os.fspath(path))
  return flat, spec


def read_params(path):
  """The `model_init` seam: the weights of a big_vision `.npz` as {name: array}, per layer."""
  return load_npz(path)[0]


def save_npz(flat, path):
  """Writes `flat` as a published-layout `.npz`: `params/`-prefixed, per-layer, float32.

  Written to a temporary name and renamed, so a killed write leaves no half file at `path`."""
  path = os.fspath(path)
  arrays = {PREFIX + k: np.asarray(v, np.float32) for k, v in sorted(unscan(flat).items())}
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:   # a file object: np.savez would otherwise append ".npz"
      np.savez(f, **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# ------------------------------------------------------------------ what goes beside an export

_EOS_NAMES = {"sticky": "sticky", "append": "yes", "none": "none"}   # big_vision's `tokenize`


def sidecar_paths(path):
  """(two_towers JSON, SentencePiece model) written beside the `.npz` at `path`."""
  path = os.fspath(path)
  stem = path[:-len(".npz")] if path.endswith(".npz") else path
  return stem + ".json", stem + ".model"


def two_towers_config(spec, tokenizer=None, sp_file=None):
  """big_vision's config for the model `spec` describes: `model` holds exactly the keyword
  arguments of its `two_towers.Model`, `bias_init` only when the model has `b` (its presence is
  what makes big_vision's `two_towers.load` read `b`); `pp_img` / `pp_txt` are big_vision
  preprocessing strings (`pp_txt` only when its ops can express the tokenizer's options)."""
  i, t = spec["image"], spec["text"]
  model = {
      "image_model": "vit", "text_model": "proj.image_text.text_transformer",
      "image": {k: i[k] for k in ("patch_size", "width", "depth", "mlp_dim", "num_heads",
                                  "pool_type", "posemb", "rep_size")},
      "text": {k: t[k] for k in ("width", "depth", "mlp_dim", "num_heads", "vocab_size",
                                 "pool_type")},
      "out_dim": list(spec["out_dim"]),
      "temperature_init": 10.0,   # an init only: the loaded `t` replaces it
  }
  model["image"]["patch_size"] = list(i["patch_size"])
  if spec["bias_init"] is not None:
    model["bias_init"] = float(spec["bias_init"])
  size = spec["image_size"]
  out = {"model_name": "proj.image_text.two_towers", "model": model,
         "pp_img": f"resize({size}, method='bicubic', antialias=True)|value_range(-1, 1)"}
  if tokenizer is not None and not tokenizer.strip_punctuation:
    out["pp_txt"] = (f"tokenize(max_len={spec['text_len']}, model='{sp_file}', "
                     f"eos='{_EOS_NAMES[tokenizer.eos]}', pad_value={tokenizer.pad_value}, "
                     f"lower={bool(tokenizer.lowercase)}, inkey='texts')")
  return out


def _write_atomic(path, data):
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def save(flat, spec, path, tokenizer=None):
  """Writes the `.npz` at `path`, its two_towers JSON beside it and, with a `tokenizer` (a
  siglip_jax Tokenizer), its SentencePiece model (else an old one there is removed)."""
  import json
  naflex_spec.check_big_vision_export(spec)
  json_path, sp_path = sidecar_paths(path)
  save_npz(flat, path)
  if tokenizer is not None:
    _write_atomic(sp_path, tokenizer.serialized_model())
  elif os.path.lexists(sp_path):
    os.remove(sp_path)
  cfg = two_towers_config(spec, tokenizer, os.path.basename(sp_path))
  _write_atomic(json_path, (json.dumps(cfg, indent=2) + "\n").encode())
