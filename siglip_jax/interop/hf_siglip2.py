"""HF transformers `Siglip2Model` folders (NaFlex) for NaFlex models: write, read back.

Siglip2Model is SiglipModel with a NaFlex vision embedding, so the tensors are hf.py's table
(`patch_embedding.weight` [D, p*p*3] is the embedding kernel transposed, `position_embedding.weight`
[g*g, D] the [g, g, D] table flattened) and only the config and the processor files differ:
config.json's vision_config has `num_patches` = g*g and no image_size; preprocessor_config.json
names `Siglip2ImageProcessor` with the model's `patch_size` and `max_num_patches`.

The image processor class: transformers 5 picks the backend by what is installed, whichever of
its two names the file gives (`Siglip2ImageProcessorPil` where torchvision is missing, the
torchvision `Siglip2ImageProcessor` where it is), and only the plain name exists in transformers
4 (whose Siglip2ImageProcessor resizes with PIL), so the plain name it is. The PIL backend is
siglip_jax's own resize (data/naflex.py: PIL bilinear), pixel for pixel; torchvision's
antialiased bilinear gives slightly other pixels (AutoImageProcessor(..., backend="pil") pins
PIL).

The tokenizer: for model_type "siglip2" transformers 5's AutoTokenizer swaps the declared class
for its `Siglip2Tokenizer` (Gemma's normalizer: no SentencePiece dummy prefix, other ids) unless
tokenizer_config.json has an `auto_map`; with one naming no remote code it loads the
`PreTrainedTokenizerFast` declared, so interop/hf_tokenizer.py's tokenizer.json and our ids.
"""
import math
import os

from siglip_jax.interop import hf, hf_tokenizer, naflex_spec

MODEL_TYPE = "siglip2"
IMAGE_PROCESSOR = "Siglip2ImageProcessor"
PROCESSOR = "Siglip2Processor"
_RESAMPLE_BILINEAR = 2   # PIL.Image.Resampling.BILINEAR, what data/naflex.py resizes with
# transformers' Siglip2VisionConfig defaults (no image_size; a 16 x 16 position table).
_VISION_DEFAULTS = {**{k: v for k, v in hf.VISION_DEFAULTS.items() if k != "image_size"},
                    "num_patches": 256}


def hf_config(spec, tokenizer=None):
  """config.json contents: hf.py's SiglipModel config as transformers' Siglip2 names it."""
  cfg = hf.hf_config({**spec, "image_size": None}, tokenizer)
  cfg.update(architectures=["Siglip2Model"], model_type=MODEL_TYPE)
  cfg["text_config"]["model_type"] = "siglip2_text_model"
  vision = cfg["vision_config"]
  del vision["image_size"]
  vision.update(model_type="siglip2_vision_model",
                num_patches=spec["image"]["posemb_grid"] ** 2)
  return cfg


def preprocessor_config(spec):
  """preprocessor_config.json: images to [-1, 1] patches at the model's patch budget."""
  return {"image_processor_type": IMAGE_PROCESSOR, "processor_class": PROCESSOR,
          "do_resize": True, "resample": _RESAMPLE_BILINEAR,
          "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
          "patch_size": int(spec["image"]["patch_size"][0]),
          "max_num_patches": int(spec["max_num_patches"])}


def tokenizer_extra(spec):
  """tokenizer_config.json's additions for Siglip2Processor. Its class defaults (text
  max_length 64, 16-pixel patches, 256 of them) beat the image processor's own config, but a
  tokenizer's init kwargs beat them and go to every modality that takes them: so the model's
  values are here. `auto_map` keeps AutoTokenizer on the declared class (module docstring)."""
  return {"max_length": int(spec["text_len"]),
          "patch_size": int(spec["image"]["patch_size"][0]),
          "max_num_patches": int(spec["max_num_patches"]),
          "auto_map": {"AutoTokenizer": [None, "PreTrainedTokenizerFast"]}}


def save(flat, spec, out, tokenizer=None):
  """Writes a Siglip2Model folder at `out` for the NaFlex model `spec` (created; files in it
  replaced)."""
  if not naflex_spec.is_naflex(spec):
    raise ValueError("a Siglip2Model folder is written for NaFlex models only; this one has a "
                     "fixed image size (hf.save writes it as a SiglipModel)")
  spec = hf.write_weights(flat, spec, out)
  hf.write_json(os.path.join(out, hf.CONFIG), hf_config(spec, tokenizer))
  hf.write_json(os.path.join(out, hf.PREPROCESSOR), preprocessor_config(spec))
  if tokenizer is not None:
    hf_tokenizer.write(out, tokenizer, spec["text_len"], processor_class=PROCESSOR,
                       extra=tokenizer_extra(spec))


def is_folder(path):
  """An HF folder whose config.json says model_type "siglip2"."""
  if not hf.is_hf_folder(path):
    return False
  try:
    return hf.read_json(path).get("model_type") == MODEL_TYPE
  except ValueError:   # not JSON: hf.read_config names the file
    return False


def _max_num_patches(path, patch):
  """The processor's patch budget (its default when the folder has no processor config)."""
  if not os.path.isfile(os.path.join(path, hf.PREPROCESSOR)):
    return naflex_spec.DEFAULT_MAX_NUM_PATCHES
  pre = hf.read_json(path, hf.PREPROCESSOR)
  pre_patch = pre.get("patch_size", patch)
  if pre_patch != patch:
    raise ValueError(f"{os.path.join(path, hf.PREPROCESSOR)}: patch_size {pre_patch} differs "
                     f"from config.json's {patch}")
  return int(pre.get("max_num_patches") or naflex_spec.DEFAULT_MAX_NUM_PATCHES)


def read_config(path):
  """The NaFlex spec of the Siglip2Model folder at `path` (config.json, defaults filled in;
  max_num_patches from preprocessor_config.json)."""
  cfg = hf.read_json(path)
  if cfg.get("model_type") != MODEL_TYPE:
    raise ValueError(f"{path}: config.json has model_type {cfg.get('model_type')!r}, not "
                     f"{MODEL_TYPE!r}")
  spec, v = hf.spec_from_config(cfg, path, _VISION_DEFAULTS)
  g = math.isqrt(int(v["num_patches"]))
  if g * g != v["num_patches"]:
    raise ValueError(f"{path}: config.json's vision_config num_patches {v['num_patches']} is "
                     "not a square grid")
  image = {k: spec["image"][k] for k in ("patch_size", "width", "depth", "mlp_dim",
                                         "num_heads", "pool_type")}
  return {**spec, "image": {**image, "posemb_grid": g}, "image_size": None,
          "image_model": naflex_spec.NAFLEX,
          "max_num_patches": _max_num_patches(path, image["patch_size"][0])}


def load(path):
  """(flat per-layer params, NaFlex spec, SentencePiece path or None) of a Siglip2 folder."""
  path = os.fspath(path)
  spec = read_config(path)
  return hf.read_weights(path, spec), spec, hf.spiece_path(path)
