"""Reading checkpoints that may be damaged: which steps to trust, and the read-only readers
behind `evaluate`, `convert`, `load()` and `model_init`. Nothing here writes.

Damage, whatever its form (a missing or unreadable `state/_METADATA`, a missing, truncated or
altered array file, an unreadable JSON item, arrays whose fingerprints differ from those
recorded at save, see `checkpoint_fingerprint`), is `DamagedCheckpointError`: a reader given
a workdir then falls back to the step before, with a warning naming the damaged one. Only a
readable checkpoint whose names or shapes differ from what is wanted is
`CheckpointMismatchError`. Each reader checks what it reads (these readers: the params, the
config and the fingerprints; a training resume: the whole state and its data position). A step
holding a `DAMAGED` file is one training found damaged and left in place (on object stores,
where moving a step is a multi-GB copy): every reader skips it.
"""
import logging
import os
import sys
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from etils import epath

from siglip_jax import checkpoint_fingerprint as fingerprint, errors, mesh as mesh_lib, paths

MARKER = "DAMAGED"          # <step>/DAMAGED: the reason, one line
FINGERPRINTS = "fingerprints"
_log = logging.getLogger("siglip_jax.checkpoint")
# Its warnings (a damaged step skipped) must show even where a CLI turns the root logger down
# to ERROR to quiet orbax.
_log.setLevel(logging.WARNING)
_warned_unverified = set()
_warned_damaged = set()


def _abandoned_read(unraisable):
  """What a failed read leaves behind, nothing more being wrong: tensorstore completing the
  read's other futures on the asyncio loop orbax has already closed (`RuntimeError: Event loop
  is closed`), and orbax's pending shard reads, when garbage-collected, turning the closing
  GeneratorExit into `Exception: Encountered error while reading array index`."""
  e = unraisable.exc_value
  if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
    return True
  return (isinstance(e.__cause__, GeneratorExit)
          and getattr(unraisable.object, "__name__", "") == "_read_array_index_and_device_put")


def _quiet_closed_loop_callbacks():
  """Each of `_abandoned_read`'s tracebacks would print through sys.unraisablehook, at whatever
  moment the garbage collector runs: those, and only those, are dropped, so a damaged step
  reads as one warning."""
  previous = sys.unraisablehook
  if getattr(previous, "siglip_jax_filter", False):
    return

  def hook(unraisable):
    if not _abandoned_read(unraisable):
      previous(unraisable)

  hook.siglip_jax_filter = True
  sys.unraisablehook = hook


_quiet_closed_loop_callbacks()


class CheckpointError(errors.UserError, ValueError):
  """A checkpoint cannot be used; the message names it (the CLIs print it as one line)."""


class CheckpointMismatchError(CheckpointError):
  """A readable checkpoint does not fit the restore target (names or shapes differ)."""


class DamagedCheckpointError(CheckpointError):
  """A checkpoint's files are missing, unreadable or not what was saved."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
  """No checkpoint (or none readable, or not the step asked for) where one was expected."""


def item_handlers(state_handler):
  return dict(state=state_handler, extra=ocp.JsonCheckpointHandler(),
              config=ocp.JsonCheckpointHandler(), fingerprints=ocp.JsonCheckpointHandler())


def reader(directory):
  """A read-only orbax manager: no tmp-dir clean-up, no deletions, nothing created."""
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  return ocp.CheckpointManager(paths.resolve(directory), options=options,
                               item_handlers=item_handlers(ocp.PyTreeCheckpointHandler()))


def step_dir(directory, step):
  return paths.join(directory, str(step))


def marked(directory, step):
  """The reason in `<step>/DAMAGED`, or None when the step is not marked."""
  marker = paths.join(step_dir(directory, step), MARKER)
  if not epath.Path(marker).exists():
    return None
  try:
    return epath.Path(marker).read_bytes().decode("utf-8", "replace").strip() or "marked damaged"
  except OSError:
    return "marked damaged"


def committed_steps(directory, *, include_marked=False):
  """The steps of the complete checkpoints in a checkpoints/ folder (local or URL), sorted; []
  if there is none. Orbax's own listing (on GCS a `<step>/` folder exists while it is
  written), less the steps marked DAMAGED unless `include_marked`."""
  if not epath.Path(directory).is_dir():
    return []
  steps = sorted(reader(directory).all_steps())
  return steps if include_marked else [s for s in steps if marked(directory, s) is None]


# ------------------------------------------------------------------ checks of one step

def first_line(e):
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def is_memory_error(e):
  # Running out of memory while restoring says nothing about the checkpoint: never treat it
  # as damage (which would set a good checkpoint aside and resume from an older one).
  return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)


def flat_shapes(tree):
  """'/'-joined name -> shape, for a state, a ShapeDtypeStruct target or orbax metadata."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {mesh_lib.path_str(path): tuple(getattr(leaf, "shape", ())) for path, leaf in flat}


def state_metadata(mngr, step):
  """-> (the step's state tree of array metadata, {name: shape}), from state/_METADATA."""
  try:
    meta = mngr.item_metadata(step)["state"]
  except Exception as e:  # pylint: disable=broad-except
    raise DamagedCheckpointError(f"its array metadata is unreadable ({first_line(e)})") from e
  tree = getattr(meta, "tree", meta)
  shapes = flat_shapes(tree) if tree is not None else {}
  if not shapes:
    raise DamagedCheckpointError("state/_METADATA is missing or empty")
  return tree, shapes


def read_json_item(mngr, directory, step, name):
  """A JSON item of the step (dict), or None when the step has no such item."""
  if not epath.Path(step_dir(directory, step), name).is_dir():
    return None
  try:
    out = mngr.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))
    return dict(out[name] or {})
  except Exception as e:  # pylint: disable=broad-except
    raise DamagedCheckpointError(f"{name}/ is unreadable ({first_line(e)})") from e


def fingerprints(mngr, directory, step, shapes):
  """The step's fingerprint record, checked against its state/_METADATA; None for a
  checkpoint saved before fingerprints (or by a later version), which is then not verified."""
  record = read_json_item(mngr, directory, step, FINGERPRINTS)
  if record is None or record.get("version") != fingerprint.VERSION:
    if directory not in _warned_unverified:
      _warned_unverified.add(directory)
      _log.warning("checkpoints in %s hold no fingerprints this version reads (saved by an "
                   "older siglip_jax?): their arrays are checked only for finite values",
                   directory)
    return None
  try:
    recorded = {n: tuple(a["shape"]) for n, a in record["arrays"].items()}
  except (KeyError, TypeError, AttributeError) as e:
    raise DamagedCheckpointError(f"fingerprints/ is malformed ({first_line(e)})") from e
  if recorded != shapes:
    raise DamagedCheckpointError("state/_METADATA does not list the arrays the save recorded")
  return record


def check_fits(shapes, wanted, where, limit=5):
  """CheckpointMismatchError naming the first few names that are missing, unexpected or of
  another shape; params first, as the optimizer state's names repeat them."""
  order = lambda name: (not name.startswith("params/"), name)
  lines = []
  differ = [f"{k}: checkpoint {shapes[k]} vs config {wanted[k]}"
            for k in sorted(shapes.keys() & wanted.keys(), key=order) if shapes[k] != wanted[k]]
  for label, names in (("shape differs", differ),
                       ("not in the checkpoint", sorted(wanted.keys() - shapes.keys(), key=order)),
                       ("only in the checkpoint", sorted(shapes.keys() - wanted.keys(), key=order))):
    if names:
      more = [f"    ... and {len(names) - limit} more"] if len(names) > limit else []
      lines += [f"  {label} ({len(names)}):"] + [f"    {n}" for n in names[:limit]] + more
  if lines:
    raise CheckpointMismatchError(
        f"checkpoint {where} does not fit this config ({_which_change(shapes, wanted)}):\n"
        + "\n".join(lines))


def _which_change(shapes, wanted):
  """The likely cause: a NaFlex image tower on one side only (its patch embedding is dense,
  2-D, where the fixed-resolution tower's is a convolution, 4-D), else any setting."""
  kernel = "params/img/embedding/kernel"
  ranks = [len(d.get(kernel, ())) for d in (shapes, wanted)]
  if sorted(ranks) == [2, 4]:
    towers = {2: "a NaFlex image tower", 4: "a fixed-resolution one"}
    return (f"the checkpoint holds {towers[ranks[0]]} and the config {towers[ranks[1]]}: config "
            "key `model.image_model` differs; a fixed-resolution run continues as NaFlex only "
            "through model_init, SigLIP 2's switch")
  return "were model or optimizer settings changed?"


def verify(record, tree, prefix=""):
  """DamagedCheckpointError unless `tree`'s arrays are what the save recorded (see
  `fingerprint.differences`). A collective when `tree` spans several processes."""
  bad = fingerprint.differences(record, tree, prefix)
  if bad:
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise DamagedCheckpointError(f"{len(bad)} arrays are not what was saved: "
                                 f"{', '.join(bad[:3])}{more}")


def warn_damaged(directory, step, error, used, action=""):
  _log.warning("checkpoint step %d in %s is damaged (%s); using step %s instead%s",
               step, directory, error, used, action)


# ------------------------------------------------------------------ readers

class Checkpoint(NamedTuple):
  """One step read and verified: its params ({name: np.ndarray}) and the run's config."""
  directory: str
  step: int
  params: dict
  config: dict


def _candidates(path, step=None):
  """-> (checkpoints dir, steps to try newest first, whether one step was named)."""
  path = os.fspath(paths.resolve(path))   # absolute if local; a URL as it is
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit() and epath.Path(path, "state").is_dir():
    return os.path.dirname(path.rstrip("/")), [int(base)], True
  directory = paths.join(path, "checkpoints")
  if not epath.Path(directory).is_dir():
    directory = path
  if step is not None:
    steps = committed_steps(directory, include_marked=True)
    if step not in steps:
      raise NoCheckpointError(f"no checkpoint for step {step} under {directory} (there are: "
                              f"{', '.join(map(str, steps)) or 'none'})")
    return directory, [step], True
  steps = committed_steps(directory)
  if not steps:
    raise NoCheckpointError(f"no siglip_jax checkpoint at {path} (expected a workdir with "
                            "checkpoints/<step>/ or one checkpoints/<step>/ folder)")
  return directory, steps[::-1], False


def _read_step(mngr, directory, step):
  reason = marked(directory, step)
  if reason is not None:
    raise DamagedCheckpointError(f"marked {MARKER}: {reason}")
  config = read_json_item(mngr, directory, step, "config") or {}
  tree, shapes = state_metadata(mngr, step)
  record = fingerprints(mngr, directory, step, shapes)
  params_meta = tree.get("params") if hasattr(tree, "get") else None
  if not params_meta:
    raise CheckpointMismatchError(f"checkpoint {step_dir(directory, step)} holds no params")
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                        params_meta)
  try:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": params_meta}, restore_args={"params": restore_args},
        partial_restore=True)))
  except Exception as e:  # pylint: disable=broad-except
    if is_memory_error(e):
      raise
    raise DamagedCheckpointError(f"its arrays are unreadable ({first_line(e)})") from e
  params = out.state["params"]
  verify(record, params, prefix="params/")
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return Checkpoint(directory, step, {mesh_lib.path_str(p): np.asarray(v) for p, v in flat},
                    config)


def read(path, *, step=None):
  """The params and config of a workdir's newest readable checkpoint (or of `step`, or of the
  one step folder `path` names), verified against its fingerprints. A damaged step of a
  workdir is skipped with a warning naming it; a damaged step asked for by name is an error."""
  directory, steps, named = _candidates(path, step)
  mngr = reader(directory)
  damaged = []
  for s in steps:
    try:
      ckpt = _read_step(mngr, directory, s)
    except DamagedCheckpointError as e:
      if named:
        raise DamagedCheckpointError(f"checkpoint {step_dir(directory, s)} is damaged: {e}") \
            from None
      damaged.append((s, e))
      continue
    for d, e in damaged:
      if (directory, d) not in _warned_damaged:   # once a process, however often it is read
        _warned_damaged.add((directory, d))
        warn_damaged(directory, d, e, s, " (nothing was changed on disk)")
    return ckpt
  raise NoCheckpointError(f"no readable checkpoint in {directory}: "
                          + "; ".join(f"step {s}: {e}" for s, e in damaged))


def read_params(path):
  """A checkpoint's params (workdir = newest readable, or one step folder): {name: array}."""
  return read(path).params


def read_config(path):
  """The config the checkpoint `read` picks was trained with (a dict; {} if it has none)."""
  return read(path).config
