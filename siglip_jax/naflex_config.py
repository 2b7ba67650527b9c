"""NaFlex run settings: which configs train a NaFlex tower, their lengths and batches, and
the checks that name a bad key before anything is built.

A NaFlex run sets `model.image_model = "proj.image_text.naflex_vit"`; its batches carry
`patches`, `patch_mask`, `spatial_shapes` instead of `image` (design.md, "NaFlex").
"""
from siglip_jax import errors
from siglip_jax.models import naflex_vit, two_towers


class NaflexConfigError(errors.UserError, ValueError):
  """A NaFlex setting that cannot work; the message names the key."""


def is_naflex(config) -> bool:
  return config.model.get("image_model", "vit") == two_towers.NAFLEX


def seq_lens(config) -> tuple[int, ...]:
  """The per-step patch budgets (`input.seq_lens`; empty: `input.max_num_patches` alone)."""
  return tuple(int(n) for n in (config.input.get("seq_lens") or ())) or (
      int(config.input.max_num_patches),)


def batch_by_len(config) -> dict[int, int]:
  return {int(n): int(b) for n, b in (config.input.get("batch_size_by_len") or ())}


def batch_sizes(config) -> dict[int, int]:
  """{length: global batch} for every training length."""
  over = batch_by_len(config)
  return {n: over.get(n, int(config.input.batch_size)) for n in seq_lens(config)}


def patch_size(config) -> int:
  from siglip_jax import experiment   # pylint: disable=import-outside-toplevel
  patch = experiment.resolve_variant(config.model.image, "model.image").get("patch_size", 16)
  patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
  if len(set(patch)) != 1:
    raise NaflexConfigError(f"config key `model.image.patch_size`: NaFlex needs square "
                            f"patches; got {patch}")
  return int(patch[0])


def _positive_ints(value, key):
  try:
    out = [int(v) for v in value]
  except (TypeError, ValueError):
    out = []
  if not out or any(v < 1 for v in out) or any(int(v) != v for v in value):
    raise NaflexConfigError(f"config key `{key}`: expected positive integers; got {value!r}")
  return out


def check_config(config, batch_devices=None):
  """Raises NaflexConfigError naming the first bad NaFlex key (nothing for other runs).
  `batch_devices`: the batch axes' device count, once the mesh is known."""
  model_name = config.model.get("image_model", "vit")
  if model_name not in two_towers.IMAGE_MODELS:
    raise NaflexConfigError(f"config key `model.image_model`: {model_name!r} is unknown; use "
                            f"one of {sorted(two_towers.IMAGE_MODELS)}")
  inp = config.input
  if not is_naflex(config):
    for key in ("seq_lens", "batch_size_by_len"):
      if inp.get(key):
        raise NaflexConfigError(f"config key `input.{key}` is for NaFlex runs only "
                                f"(model.image_model={two_towers.NAFLEX!r})")
    return
  _positive_ints([inp.max_num_patches], "input.max_num_patches")
  lens = _positive_ints(seq_lens(config), "input.seq_lens")
  if len(set(lens)) != len(lens):
    raise NaflexConfigError(f"config key `input.seq_lens`: {tuple(lens)} repeats a length")
  pairs = inp.get("batch_size_by_len") or ()
  if any(len(p) != 2 for p in pairs):
    raise NaflexConfigError("config key `input.batch_size_by_len`: expected ((length, "
                            f"global batch), ...); got {pairs!r}")
  if pairs:
    _positive_ints([b for _, b in pairs], "input.batch_size_by_len")
  stray = sorted(set(batch_by_len(config)) - set(lens))
  if stray:
    raise NaflexConfigError(f"config key `input.batch_size_by_len`: lengths {stray} are not in "
                            f"input.seq_lens {tuple(lens)}")
  if batch_devices:
    for n, b in batch_sizes(config).items():
      if b % batch_devices:
        key = "input.batch_size_by_len" if n in batch_by_len(config) else "input.batch_size"
        raise NaflexConfigError(f"config key `{key}`: the global batch {b} at length {n} is "
                                f"not divisible by the {batch_devices} devices of the batch "
                                "axes")
  img = config.model.image
  pool = img.get("pool_type", "map")
  if pool not in naflex_vit.POOL_TYPES:
    raise NaflexConfigError(f"config key `model.image.pool_type`: {pool!r} is not a NaFlex "
                            f"pooling; use one of {naflex_vit.POOL_TYPES}")
  if img.get("posemb", "learn") != "learn":
    raise NaflexConfigError("config key `model.image.posemb`: a NaFlex tower has a learned "
                            "position table (posemb 'learn'), resized to each image")
  if img.get("rep_size"):
    raise NaflexConfigError("config key `model.image.rep_size`: not supported by the NaFlex "
                            "tower (big_vision's has no 2-D pre_logits either)")
  patch_size(config)
  if inp.get("random_crop"):
    raise NaflexConfigError("config key `input.random_crop`: NaFlex keeps each image whole at "
                            "its aspect ratio; a random crop would change it")
  objectives = config.get("objectives") or {}
  for name in ("silc", "tips"):
    if name in objectives and float(objectives[name].weight) > 0:
      raise NaflexConfigError(f"config key `objectives.{name}.weight`: SILC/TIPS are not "
                              "trained with a NaFlex tower (SigLIP 2 trains NaFlex without "
                              "them; their views are square crops)")
