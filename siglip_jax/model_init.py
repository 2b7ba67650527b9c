"""Fine-tune initialisation: `config.model_init` weights into a freshly initialised model.

Only parameters are loaded (never the optimizer state). Names are the '/'-joined param paths
(`img/embedding/kernel`); `dont_load` regexes (full match) keep the fresh init for what they
name. The image position embedding is resampled when the token grid differs (another image
size or patch size), as big_vision's `resample_posemb` does; any other difference is an error.
"""
import logging
import os
import re

import jax
import numpy as np
import scipy.ndimage

from etils import epath

from siglip_jax import checkpoint, mesh as mesh_lib

_log = logging.getLogger(__name__)


def _read_params(path):
  """{name: np.ndarray} of the weights at `path`. The one place that knows source formats:
  a siglip_jax workdir (latest checkpoint), one DIR/checkpoints/<step>/ folder, or a big_vision
  SigLIP `.npz` (published layout, either block layout; never unpickled)."""
  if str(path).endswith(".npz"):
    from siglip_jax.interop import big_vision
    return big_vision.read_params(path)
  return checkpoint.read_params(path)


def _is_image_posemb(name):
  return name.startswith("img/") and name.endswith("pos_embedding")


def resample_posemb(old, new_shape):
  """[1, g*g, D] -> `new_shape` [1, h*h, D] by bilinear zoom of the g x g grid (big_vision's
  `scipy.ndimage.zoom(order=1)`, so a resampled big_vision checkpoint matches its own)."""
  old = np.asarray(old)
  if old.shape == tuple(new_shape):
    return old
  g_old, g_new = int(round(np.sqrt(old.shape[1]))), int(round(np.sqrt(new_shape[1])))
  if (old.ndim != 3 or len(new_shape) != 3 or old.shape[0] != 1 or old.shape[2] != new_shape[2]
      or g_old * g_old != old.shape[1] or g_new * g_new != new_shape[1]):
    raise ValueError(f"cannot resample a position embedding of shape {old.shape} to "
                     f"{tuple(new_shape)}: both must be [1, square grid, same width]")
  grid = old.reshape(g_old, g_old, -1).astype(np.float32)
  zoom = (g_new / g_old, g_new / g_old, 1)
  grid = scipy.ndimage.zoom(grid, zoom, order=1)
  return grid.reshape(1, g_new * g_new, -1).astype(old.dtype)


def to_naflex(name, value, shape):
  """SigLIP 2's switch to NaFlex, for the two image params whose layout differs: the patch
  convolution's kernel [p, p, 3, D] is the dense patch embedding [p*p*3, D] (a patch's pixels
  in (row, column, channel) order, the order `data/naflex.py` cuts them in), and the position
  table [1, g*g, D] is the NaFlex grid [g, g, D] (resampled first if g differs). Returns the
  converted value, or None when `name` is not one of them or the shapes say no switch."""
  value = np.asarray(value)
  if name == "img/embedding/kernel" and value.ndim == 4 and len(shape) == 2:
    return value.reshape(-1, value.shape[-1])
  if name == "img/pos_embedding" and value.ndim == 3 and value.shape[0] == 1 \
      and len(shape) == 3 and shape[0] == shape[1]:
    g = shape[0]
    return resample_posemb(value, (1, g * g, shape[2])).reshape(shape)
  return None


def _naflex_mismatch(name, value, shape, path):
  """A NaFlex checkpoint into a fixed-resolution model: one message naming both."""
  if name == "img/embedding/kernel" and np.ndim(value) == 2 and len(shape) == 4:
    return (f"{path} holds a NaFlex image tower (img/embedding/kernel {tuple(np.shape(value))}, "
            "a dense patch embedding) but config key `model.image_model` is 'vit' (a "
            "convolution): set model.image_model='proj.image_text.naflex_vit' to use it")
  return None


def _put(value, like):
  """`value` (host numpy) as a global array with `like`'s shape, dtype and sharding. From a
  callback, so each process fills only its own devices' shards."""
  value = np.asarray(value, dtype=like.dtype)
  return jax.make_array_from_callback(like.shape, like.sharding, lambda index: value[index])


def load_init_params(path, init_params, *, dont_load=()):
  """`init_params` (fresh init, real arrays) with the weights at `path` in their place.

  Returns a tree of init_params' structure, each array on its init counterpart's sharding.
  ValueError names the first few params that are missing from `path` (and not in
  `dont_load`) or whose shapes differ (other than a resampled image position embedding).
  """
  patterns = [re.compile(p) for p in dont_load]
  loaded = _read_params(path)
  flat, treedef = jax.tree_util.tree_flatten_with_path(init_params)
  # Scanned (`encoderblock`, leading depth axis) and per-layer (`encoderblock_N`) blocks are the
  # same weights: bring the file's blocks to the model's layout before matching names.
  from siglip_jax.interop import big_vision
  loaded = big_vision.match_layout(loaded, [mesh_lib.path_str(k) for k, _ in flat])
  out, missing, mismatched, resampled, kept = [], [], [], [], []
  for key_path, init in flat:
    name = mesh_lib.path_str(key_path)
    if any(p.fullmatch(name) for p in patterns):
      out.append(init)
      kept.append(name)
      continue
    if name not in loaded:
      missing.append(name)
      out.append(init)
      continue
    value = loaded[name]
    switched = to_naflex(name, value, tuple(init.shape))
    if switched is not None and switched.shape == tuple(init.shape):
      resampled.append(f"{name} {value.shape} -> {switched.shape} (fixed resolution -> NaFlex)")
      value = switched
    wrong_tower = _naflex_mismatch(name, value, tuple(init.shape), path)
    if wrong_tower:
      raise ValueError(wrong_tower)
    if tuple(value.shape) != tuple(init.shape):
      if _is_image_posemb(name):
        try:
          value = resample_posemb(value, init.shape)
          resampled.append(f"{name} {loaded[name].shape} -> {tuple(init.shape)}")
        except ValueError:
          mismatched.append(f"{name}: {tuple(loaded[name].shape)} in {path} vs "
                            f"{tuple(init.shape)} in the model")
          out.append(init)
          continue
      else:
        mismatched.append(f"{name}: {tuple(value.shape)} in {path} vs {tuple(init.shape)} in "
                          "the model")
        out.append(init)
        continue
    out.append(_put(value, init))
  problems = []
  if missing:
    problems.append(f"{len(missing)} model params not in {path} (add them to "
                    f"model_load.dont_load to keep their fresh init): {', '.join(missing[:5])}")
  if mismatched:
    problems.append(f"{len(mismatched)} params of another shape: {'; '.join(mismatched[:5])}")
  if problems:
    raise ValueError(f"model_init={path} does not fit the model:\n  " + "\n  ".join(problems))
  unused = sorted(set(loaded) - {mesh_lib.path_str(k) for k, _ in flat})
  if unused:
    _log.warning("model_init: %d params of %s are not in the model and were not loaded: %s",
                 len(unused), path, ", ".join(unused[:5]))
  for line in resampled:
    _log.info("model_init: resampled %s", line)
  if kept:
    _log.info("model_init: kept the fresh init of %d params (dont_load)", len(kept))
  return jax.tree_util.tree_unflatten(treedef, out)


def check_source(path):
  """Raises ConfigError naming `model_init` unless `path` looks like weights we can read: a
  big_vision `.npz` file, or a siglip_jax workdir / checkpoint folder holding a checkpoint.
  Cheap (no arrays are read), so a wrong path fails before anything compiles."""
  from siglip_jax import experiment, paths
  path = str(path)
  problem = None
  if not epath.Path(path).exists():
    problem = "no such file or folder"
  elif epath.Path(path).is_file():
    if not path.endswith(".npz"):
      problem = "a file must be a big_vision .npz checkpoint"
  else:
    step_dir = os.path.basename(path.rstrip("/")).isdigit() and epath.Path(
        paths.join(path, "state")).is_dir()
    directory = path if epath.Path(path).is_dir() and not epath.Path(
        paths.join(path, "checkpoints")) else paths.join(path, "checkpoints")
    if not step_dir and not checkpoint.committed_steps(directory):
      problem = ("not a checkpoint: expected a siglip_jax workdir (with checkpoints/<step>/), "
                 "one checkpoints/<step>/ folder or a big_vision .npz")
  if problem:
    raise experiment.ConfigError(f"config key `model_init`: {path}: {problem}")


def continue_schedule(config):
  """`optim.schedule.continue_init`: the schedule of the run `model_init` comes from, from the
  step of that checkpoint on, stretched over this run's total_steps (SigLIP 2 switches to
  NaFlex at 90% and stretches the last 10% 3.75x), its peak lr included, so the first update
  here uses the learning rate the source had reached. Resolved in place, said in the log."""
  sched = dict(config.optim.schedule)
  if not sched.get("continue_init") or "source_total_steps" in sched:
    return
  from siglip_jax import checkpoint_read, experiment
  if not config.model_init or str(config.model_init).endswith(".npz"):
    raise experiment.ConfigError("config key `optim.schedule.continue_init` needs model_init to "
                                 "be a siglip_jax workdir or checkpoint (its run's schedule)")
  source = checkpoint_read.read(config.model_init)
  optim_cfg = source.config.get("optim") or {}
  total = int(source.config.get("total_steps") or 0)
  if not optim_cfg or source.step >= total:
    raise experiment.ConfigError(f"config key `optim.schedule.continue_init`: the run of "
                                 f"{config.model_init} has no schedule left to continue (step "
                                 f"{source.step} of {total})")
  config.optim.lr = float(optim_cfg["lr"])
  config.optim.schedule = {**dict(optim_cfg.get("schedule") or {}), "continue_init": True,
                           "source_total_steps": total, "offset_steps": int(source.step)}
  _log.info("optim.schedule: continuing %s from its step %d of %d, stretched over %d steps",
            config.model_init, source.step, total, config.total_steps)
