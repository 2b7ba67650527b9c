"""SILC and TIPS's config (`objectives.silc`, `objectives.tips`, `objectives.teacher`): the
checks, run before anything is built (one error naming the key), and what the loader (the
views) and the step (the heads' learning-rate multipliers) take from it."""
from siglip_jax.objectives.registry import ObjectiveConfigError

NAMES = ("silc", "tips")


def check_config(config):
  """One error naming the bad key, before anything is built."""
  from siglip_jax import experiment
  on = [n for n in NAMES if float(config.objectives[n].weight) > 0]
  if not on:
    return
  img = experiment.resolve_variant(config.model.image, "model.image")
  patch = _patch_size(img)
  if "silc" in on and img.get("pool_type", "map") == "none":
    raise ObjectiveConfigError("config key `model.image.pool_type`: objectives.silc matches "
                               "the pooled image output; 'none' gives patch tokens only")
  teacher = config.objectives.teacher
  size = int(config.input.image_size)
  if not 0 <= float(teacher.momentum) < 1:
    raise ObjectiveConfigError("config key `objectives.teacher.momentum` must be in [0, 1); "
                               f"got {teacher.momentum!r}")
  if teacher.momentum_schedule not in ("constant", "cosine"):
    raise ObjectiveConfigError("config key `objectives.teacher.momentum_schedule`: "
                               f"{teacher.momentum_schedule!r} is unknown; use constant or "
                               "cosine")
  _check_crop(teacher.global_size or size, patch, size, "objectives.teacher.global_size")
  _check_scale(teacher.global_scale, "objectives.teacher.global_scale")
  if not 0 <= float(teacher.color_jitter) <= 1:
    raise ObjectiveConfigError("config key `objectives.teacher.color_jitter` must be in [0, 1]; "
                               f"got {teacher.color_jitter!r}")
  starts = {n: float(config.objectives[n].start_fraction) for n in on}
  if len(set(starts.values())) > 1:
    raise ObjectiveConfigError("config key `objectives.tips.start_fraction`: SILC and TIPS share "
                               f"one teacher and start together; got {starts}")
  for name in on:
    cfg = config.objectives[name]
    for key in ("head_hidden", "head_bottleneck", "head_dim"):
      if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
        raise ObjectiveConfigError(f"config key `objectives.{name}.{key}` must be a positive "
                                   f"integer; got {cfg[key]!r}")
    for key in ("student_temp", "teacher_temp", "head_lr_mult"):
      if not float(cfg[key]) > 0:
        raise ObjectiveConfigError(f"config key `objectives.{name}.{key}` must be > 0; got "
                                   f"{cfg[key]!r}")
    if not 0 <= float(cfg.center_momentum) < 1:
      raise ObjectiveConfigError(f"config key `objectives.{name}.center_momentum` must be in "
                                 f"[0, 1); got {cfg.center_momentum!r}")
  if "silc" in on:
    silc = config.objectives.silc
    if isinstance(silc.n_local, bool) or not isinstance(silc.n_local, int) or silc.n_local < 1:
      raise ObjectiveConfigError("config key `objectives.silc.n_local` must be an integer >= 1; "
                                 f"got {silc.n_local!r}")
    _check_crop(silc.local_size, patch, size, "objectives.silc.local_size")
    _check_scale(silc.local_scale, "objectives.silc.local_scale")
  if "tips" in on:
    ratio = config.objectives.tips.mask_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
      raise ObjectiveConfigError("config key `objectives.tips.mask_ratio` must be in (0, 1); "
                                 f"got {ratio!r}")


def _patch_size(image_cfg):
  patch = image_cfg.get("patch_size", (16, 16))
  return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def _check_crop(crop, patch, image_size, key):
  if isinstance(crop, bool) or not isinstance(crop, int) or crop < patch:
    raise ObjectiveConfigError(f"config key `{key}` must be an integer >= the patch size "
                               f"{patch}; got {crop!r}")
  if crop > image_size:
    raise ObjectiveConfigError(f"config key `{key}`: a {crop} px crop is larger than the "
                               f"{image_size} px images (input.image_size)")
  if crop % patch:
    raise ObjectiveConfigError(f"config key `{key}`: {crop} px is not a multiple of the patch "
                               f"size {patch}")


def _check_scale(scale, key):
  try:
    lo, hi = (float(v) for v in scale)
  except (TypeError, ValueError):
    raise ObjectiveConfigError(f"config key `{key}` must be a pair (low, high); got "
                               f"{scale!r}") from None
  if not 0 < lo <= hi <= 1:
    raise ObjectiveConfigError(f"config key `{key}` must satisfy 0 < low <= high <= 1; got "
                               f"{tuple(scale)}")


def view_settings(config):
  """What the loader draws when SILC or TIPS is on (None otherwise): sizes, scales, counts."""
  on = [n for n in NAMES if float(config.objectives[n].weight) > 0]
  if not on:
    return None
  from siglip_jax import experiment
  patch = _patch_size(experiment.resolve_variant(config.model.image, "model.image"))
  teacher, silc, tips = (config.objectives[k] for k in ("teacher", "silc", "tips"))
  global_size = int(teacher.global_size or config.input.image_size)
  grid = (global_size // patch) ** 2
  return dict(global_size=global_size, global_scale=tuple(teacher.global_scale),
              n_local=int(silc.n_local) if "silc" in on else 0,
              local_size=int(silc.local_size), local_scale=tuple(silc.local_scale),
              flip=bool(teacher.flip), color_jitter=float(teacher.color_jitter),
              num_masked=int(round(float(tips.mask_ratio) * grid)) if "tips" in on else 0,
              grid=grid)


def lr_mults(config):
  """((regex, multiplier), ...) of the new heads (and the mask token): `head_lr_mult`, applied
  on top of optim.lr_mults (`optim.update_multipliers`)."""
  out = []
  if float(config.objectives.silc.weight) > 0:
    out.append(("silc_head/.*", float(config.objectives.silc.head_lr_mult)))
  if float(config.objectives.tips.weight) > 0:
    out.append(("(tips_head/.*|mask_token)", float(config.objectives.tips.head_lr_mult)))
  return tuple(out)
