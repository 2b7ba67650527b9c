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
    step_dir = os.path.basename(path.rstrip("/")).isdigit() and paths.isdir(
        paths.join(path, "state"))
    directory = path if epath.Path(path).is_dir() and not epath.Path(
        paths.join(path, "checkpoints")) else paths.join(path, "checkpoints")
    if not step_dir and not checkpoint.committed_steps(directory):
      problem = ("not a checkpoint: expected a siglip_jax workdir (with checkpoints/<step>/), "
                 "one checkpoints/<step>/ folder or a big_vision .npz")
  if problem:
    raise experiment.ConfigError(f"config key `model_init`: {path}: {problem}")
