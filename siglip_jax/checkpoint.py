"""Checkpoints: orbax `CheckpointManager`, async saves, exact resume, preemption.

Layout: `DIR/checkpoints/<step>/` holds three orbax items:
  state/   the whole TrainState (params, optimizer state, step, RNG key data, bad_step), sharded
  extra/   JSON beside it, e.g. {"data_position": 120}
  config/  the run's config as JSON, so a checkpoint says how it was made
Orbax writes each step into `<step>.orbax-checkpoint-tmp*` and renames it when complete, so a
process killed mid-write leaves only a tmp dir, which the manager ignores and removes at start-up.
On GCS (`gs://` workdirs) orbax writes into `<step>/` directly and marks a finished step with a
`commit_success.txt` file instead; its step listing counts only committed steps either way.
DIR may be a local folder (made absolute) or a URL, kept as it is (see `siglip_jax.paths`).
"""
import json
import logging
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from siglip_jax import mesh as mesh_lib, paths

_ITEMS = ("state", "extra", "config")
_log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the restore target (names or shapes differ)."""


class NonFiniteStateError(ValueError):
  """save() was handed weights that are not finite: refused, so a resume never loads them."""


@jax.jit
def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _flat_shapes(tree):
  """'/'-joined name -> shape, for a state, a ShapeDtypeStruct target or orbax metadata."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {mesh_lib.path_str(path): tuple(getattr(leaf, "shape", ())) for path, leaf in flat}


def _describe_mismatch(saved, wanted, limit=5):
  """Lines naming the first few names that are missing, unexpected or of another shape;
  params first, as the optimizer state's names repeat them."""
  order = lambda name: (not name.startswith("params/"), name)
  lines = []
  shape = [f"{k}: checkpoint {saved[k]} vs config {wanted[k]}"
           for k in sorted(saved.keys() & wanted.keys(), key=order) if saved[k] != wanted[k]]
  for label, names in (("shape differs", shape),
                       ("not in the checkpoint", sorted(wanted.keys() - saved.keys(), key=order)),
                       ("only in the checkpoint", sorted(saved.keys() - wanted.keys(), key=order))):
    if names:
      more = [f"    ... and {len(names) - limit} more"] if len(names) > limit else []
      lines += [f"  {label} ({len(names)}):"] + [f"    {n}" for n in names[:limit]] + more
  return lines


def _first_line(e):
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _is_memory_error(e):
  # Running out of memory while restoring says nothing about the checkpoint: never treat it
  # as damage (which would move a good checkpoint aside and resume from an older one).
  return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)


def _all_processes_agree(ok):
  """With several processes, every one must restore the same step: True only if all did."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok, np.int32))))


class Checkpointer:
  """Saves and restores `DIR/checkpoints/<step>/`; see the module docstring."""

  def __init__(self, workdir, ckpt_cfg, *, config=None):
    # A local workdir is made absolute; a URL (gs://b/x) is kept: gs://b/x/checkpoints.
    self.directory = os.fspath(paths.resolve(workdir) / "checkpoints")
    self.every_steps = int(ckpt_cfg.every_steps)
    keep, keep_every = int(ckpt_cfg.keep), int(ckpt_cfg.get("keep_every", 0) or 0)
    # LatestN(0) would delete the checkpoint just written: at least one is always kept.
    keep_policies = [policies.LatestN(max(keep, 1))]
    if keep_every > 0:   # every keep_every-th step for good (steps that are checkpointed at all)
      keep_policies.append(policies.EveryNSteps(keep_every))
    save_policies = [policies.PreemptionCheckpointingPolicy()]
    if self.every_steps > 0:
      save_policies.append(policies.FixedIntervalPolicy(self.every_steps))
    options = ocp.CheckpointManagerOptions(
        # Decisions are ours (should_save, `force=True`: the last step is always saved); the
        # policy documents the same rule for orbax's own tools.
        save_decision_policy=policies.AnySavePolicy(save_policies),
        preservation_policy=policies.AnyPreservationPolicy(keep_policies),
        cleanup_tmp_directories=True,   # tmp dirs of saves killed mid-write
        enable_async_checkpointing=True)
    self._mngr = ocp.CheckpointManager(
        paths.resolve(self.directory), options=options, item_handlers=dict(
            state=ocp.StandardCheckpointHandler(), extra=ocp.JsonCheckpointHandler(),
            config=ocp.JsonCheckpointHandler()))
    self._config = json.loads(config.to_json_best_effort()) if config is not None else {}
    self._preempted = threading.Event()
    self._previous_handler = None
    self._install_sigterm_handler()

  # ---------------------------------------------------------------- preemption

  def _install_sigterm_handler(self):
    # With several processes, JAX's preemption sync manager (started by jax.distributed) owns
    # SIGTERM through a native handler and agrees on one step for all processes; a Python
    # handler would replace it, so processes could not agree. One process: a flag is enough.
    if jax.process_count() > 1:
      if not jax.config.jax_enable_preemption_service:
        _log.warning("jax_enable_preemption_service is off: SIGTERM will not save a checkpoint")
      return
    try:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    except ValueError:   # not the main thread: Python allows handlers only there
      _log.warning("Checkpointer made off the main thread: SIGTERM will not save a checkpoint")

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._preempted.set()   # only a flag: the loop saves at the end of its current step

  def reached_preemption(self, step) -> bool:
    """True once a preemption notice (SIGTERM) came: save at `step`, wait, and stop."""
    if jax.process_count() > 1:
      return self._mngr.reached_preemption(step)   # the same step on every process
    return self._preempted.is_set()

  # ---------------------------------------------------------------- saving

  def should_save(self, step, last=False) -> bool:
    return bool(last) or (self.every_steps > 0 and step % self.every_steps == 0)

  def save(self, step, state, extra):
    """Starts an async save of `state` (returns once it is copied off the devices)."""
    bad = getattr(state, "bad_step", None)
    params = getattr(state, "params", state)
    if (bad is not None and int(jax.device_get(bad))) or not bool(_all_finite(params)):
      raise NonFiniteStateError(f"refusing to save step {step}: the weights are not finite")
    if step in self._mngr.all_steps():   # already on disk (a resumed run at its saved step)
      _log.info("checkpoint step %d already exists; not saved again", step)
      return False
    return self._mngr.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        extra=ocp.args.JsonSave(dict(extra)),
        config=ocp.args.JsonSave(self._config)))

  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    try:
      self._mngr.wait_until_finished()
      self._mngr.close()
    finally:
      if self._previous_handler is not None:
        signal.signal(signal.SIGTERM, self._previous_handler)
        self._previous_handler = None

  # ---------------------------------------------------------------- restoring

  def latest_step(self):
    """The newest committed checkpoint's step, or None (restore() checks it is readable)."""
    self._mngr.reload()   # another process or an earlier run may have written since
    return self._mngr.latest_step()

  def _check_fits(self, step, target):
    meta = self._mngr.item_metadata(step)["state"]
    saved, wanted = _flat_shapes(getattr(meta, "tree", meta)), _flat_shapes(target)
    lines = _describe_mismatch(saved, wanted)
    if lines:
      raise CheckpointMismatchError(
          f"checkpoint {paths.join(self.directory, str(step))} does not fit this config "
          "(were model or optimizer settings changed?):\n" + "\n".join(lines))

  def _restore_step(self, step, target):
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
    return out.state, dict(out.extra or {})

  def restore(self, target, step=None):
    """-> (state placed on `target`'s shardings, extra dict).

    `target`: a tree of jax.ShapeDtypeStruct with `.sharding` (today's mesh, whatever the mesh
    that saved it). With `step=None` the latest readable checkpoint: a damaged one is reported,
    moved to `DIR/checkpoints.damaged/`, and the one before it used. A checkpoint that does not
    fit `target` raises ValueError before anything is read, moved or written.
    """
    self._mngr.reload()
    if step is not None:
      self._check_fits(step, target)
      return self._restore_step(step, target)
    steps = sorted(self._mngr.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    damaged = []
    for s in steps:
      try:
        meta_ok = True
        self._check_fits(s, target)
      except CheckpointMismatchError:
        raise   # bad input, not damage: report it and touch nothing
      except Exception as e:  # unreadable metadata
        meta_ok, error = False, e
      result = None
      if meta_ok:
        try:
          result = self._restore_step(s, target)
        except Exception as e:
          if _is_memory_error(e):
            raise
          error = e
      if _all_processes_agree(result is not None):
        self._set_aside(damaged, s)
        return result
      damaged.append((s, error if result is None else RuntimeError("another process failed")))
    raise RuntimeError(f"no readable checkpoint in {self.directory} (nothing was moved): "
                       + "; ".join(f"step {s}: {_first_line(e)}" for s, e in damaged))

  def _set_aside(self, damaged, used_step):
    """Reports damaged checkpoints newer than the one used, and moves them out of the way
    (kept, not deleted) so this run can save those steps again."""
    if not damaged:
      return
    aside = self.directory + ".damaged"
    for s, e in damaged:
      _log.warning("checkpoint step %d in %s is damaged (%s); resuming from step %d; "
                   "moved it to %s", s, self.directory, _first_line(e), used_step, aside)
      if jax.process_index() == 0:
        paths.makedirs(aside)
        dest = paths.join(aside, str(s))
        if paths.exists(dest):
          dest += f".{int(time.time())}"
        paths.move(paths.join(self.directory, str(s)), dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("siglip_jax.checkpoint.set_aside")
    self._mngr.reload()


# ------------------------------------------------------------------ reading for other modules

def _locate(path):
  """A workdir, its checkpoints/ folder or one step folder -> (checkpoints dir, step)."""
  path = os.fspath(paths.resolve(path))   # absolute if local; a URL as it is
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit() and paths.isdir(paths.join(path, "state")):
    return os.path.dirname(path), int(base)
  directory = paths.join(path, "checkpoints")
  if not paths.isdir(directory):
    directory = path
  step = _reader(directory).latest_step() if paths.isdir(directory) else None
  if step is None:
    raise FileNotFoundError(f"no siglip_jax checkpoint at {path} (expected a workdir with "
                            "checkpoints/<step>/ or one checkpoints/<step>/ folder)")
  return directory, step


def committed_steps(directory):
  """The steps of the complete checkpoints in a checkpoints/ folder (local or URL), sorted; []
  if there is none. Orbax's own listing: on GCS a `<step>/` folder exists while it is written."""
  return sorted(_reader(directory).all_steps()) if paths.isdir(directory) else []


def _reader(directory):
  # Read-only: no tmp-dir clean-up, no deletions, nothing created.
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  return ocp.CheckpointManager(paths.resolve(directory), options=options, item_handlers=dict(
      state=ocp.PyTreeCheckpointHandler(), extra=ocp.JsonCheckpointHandler(),
      config=ocp.JsonCheckpointHandler()))


def read_params(path):
  """A checkpoint's params (workdir = latest, or one step folder) as {name: np.ndarray}."""
  directory, step = _locate(path)
  mngr = _reader(directory)
  meta = mngr.item_metadata(step)["state"]
  params_meta = getattr(meta, "tree", meta)["params"]
  restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                        params_meta)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"params": params_meta}, restore_args={"params": restore_args},
      partial_restore=True)))
  flat = jax.tree_util.tree_flatten_with_path(out.state["params"])[0]
  return {mesh_lib.path_str(p): np.asarray(v) for p, v in flat}


def read_config(path):
  """The config a checkpoint was trained with, as a dict (JSON), or {} if it has none."""
  directory, step = _locate(path)
  out = _reader(directory).restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return dict(out.config or {})
