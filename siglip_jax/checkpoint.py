"""Checkpoints: orbax `CheckpointManager`, async saves, verified resume, preemption.

Layout: `DIR/checkpoints/<step>/` holds four orbax items:
  state/         the whole TrainState (params, optimizer state, step, RNG key data, bad_step)
  extra/         JSON beside it, e.g. {"data_position": 120}
  config/        the run's config as JSON, so a checkpoint says how it was made
  fingerprints/  JSON: per array its shape and sums over its bits (`checkpoint_fingerprint`),
                 computed on the devices at save and checked at every restore
Orbax writes each step into `<step>.orbax-checkpoint-tmp*` and renames it when complete, so a
process killed mid-write leaves only a tmp dir, which the manager ignores and removes at start-up.
On GCS (`gs://` workdirs) orbax writes into `<step>/` directly and marks a finished step with a
`commit_success.txt` file instead; its step listing counts only committed steps either way.
DIR may be a local folder (made absolute) or a URL, kept as it is (see `siglip_jax.paths`).

A damaged step (see `checkpoint_read`) is skipped at resume with a warning naming it: moved to
`DIR/checkpoints.damaged/` locally, marked with a `DAMAGED` file in place on an object store.
`maybe_save` is the one place that decides when to save. Every wait is bounded
(`save_timeout_s`), and a failed async save is raised, never only logged.
"""
import json
import logging
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from etils import epath

from siglip_jax import checkpoint_fingerprint as fingerprint, checkpoint_read as read, paths
# The readers and errors other modules use live in checkpoint_read; here under their old names.
from siglip_jax.checkpoint_read import (  # noqa: F401
    CheckpointError, CheckpointMismatchError, DamagedCheckpointError, NoCheckpointError,
    committed_steps, read_config, read_params)

SAVE_TIMEOUT_S = 1200   # orbax's own default for an async save
_log = logging.getLogger(__name__)


class NonFiniteStateError(ValueError):
  """save() was handed weights that are not finite: refused, so a resume never loads them."""


class CheckpointSaveError(RuntimeError):
  """An async save failed or did not finish in time; the step is not committed."""


def _all_processes_agree(ok):
  """With several processes, every one must restore the same step: True only if all did."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok, np.int32))))


def _run_bounded(fn, timeout_s):
  """-> (finished, exception or None) of `fn()` run for at most `timeout_s` seconds, in a
  daemon thread: a call stuck on a stalled filesystem must not hold the caller."""
  outcome = []

  def run():
    try:
      fn()
    except BaseException as e:  # pylint: disable=broad-except
      outcome.append(e)

  runner = threading.Thread(target=run, name="siglip_jax-checkpoint-wait", daemon=True)
  runner.start()
  runner.join(timeout_s)
  return not runner.is_alive(), (outcome[0] if outcome else None)


_EXIT_GRACE_S = 30.0
_exit_watchdog = []


def _watch_exit():
  """Once a save has failed or timed out, its orbax writer threads may stay blocked in the
  filesystem forever, and the interpreter waits for such threads at exit. Armed here (once):
  a daemon thread that, `_EXIT_GRACE_S` after exit begins, ends a process still waiting."""
  if _exit_watchdog or not hasattr(threading, "_register_atexit"):   # CPython 3.9+
    return
  exiting = threading.Event()

  def watchdog():
    exiting.wait()
    time.sleep(_EXIT_GRACE_S)
    print("siglip_jax: exit is held up by a checkpoint save that failed or hangs; exiting "
          "without waiting for it", file=sys.stderr, flush=True)
    os._exit(1)

  _exit_watchdog.append(threading.Thread(target=watchdog, name="siglip_jax-exit-watchdog",
                                         daemon=True))
  _exit_watchdog[0].start()
  threading._register_atexit(exiting.set)   # pylint: disable=protected-access


class _KeepingMarked:
  """Orbax's preservation rules over the steps not marked DAMAGED; marked steps are left
  alone (a newer marked step must not count as one of the `keep` latest, or the good steps
  saved after a resume would be deleted to keep it)."""

  def __init__(self, inner, marked):
    self._inner, self._marked = inner, marked

  def should_preserve(self, checkpoints, *, context):
    keep = [True] * len(checkpoints)
    idx = [i for i, c in enumerate(checkpoints) if c.step not in self._marked]
    decided = self._inner.should_preserve([checkpoints[i] for i in idx], context=context)
    for i, k in zip(idx, decided):
      keep[i] = bool(k)
    return keep


class Checkpointer:
  """Saves and restores `DIR/checkpoints/<step>/`; see the module docstring."""

  def __init__(self, workdir, ckpt_cfg, *, config=None, save_timeout_s=SAVE_TIMEOUT_S):
    # A local workdir is made absolute; a URL (gs://b/x) is kept: gs://b/x/checkpoints.
    self.directory = os.fspath(paths.resolve(workdir) / "checkpoints")
    self.every_steps = int(ckpt_cfg.every_steps)
    self.save_timeout_s = float(save_timeout_s)
    keep, keep_every = int(ckpt_cfg.keep), int(ckpt_cfg.get("keep_every", 0) or 0)
    # LatestN(0) would delete the checkpoint just written: at least one is always kept.
    keep_policies = [policies.LatestN(max(keep, 1))]
    if keep_every > 0:   # every keep_every-th step for good (steps that are checkpointed at all)
      keep_policies.append(policies.EveryNSteps(keep_every))
    self._marked = set()   # steps marked DAMAGED (object stores)
    options = ocp.CheckpointManagerOptions(
        # No save decision policy: maybe_save decides and saves with `force=True`.
        preservation_policy=_KeepingMarked(policies.AnyPreservationPolicy(keep_policies),
                                           self._marked),
        cleanup_tmp_directories=True,   # tmp dirs of saves killed mid-write
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(timeout_secs=max(int(self.save_timeout_s), 1)))
    self._mngr = ocp.CheckpointManager(
        paths.resolve(self.directory), options=options,
        item_handlers=read.item_handlers(ocp.StandardCheckpointHandler()))
    self._config = json.loads(config.to_json_best_effort()) if config is not None else {}
    self._pending = None   # the step of the async save not yet waited for
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
    """True once a preemption notice (SIGTERM) came. With several processes this is JAX's
    preemption sync point (the same step on every process): ask it once per step."""
    if jax.process_count() > 1:
      return self._mngr.reached_preemption(step)
    return self._preempted.is_set()

  # ---------------------------------------------------------------- saving

  def maybe_save(self, step, state, extra, *, last=False, check=None) -> bool:
    """The one place that decides whether to save after `step`: every `every_steps`, the last
    step, and the step a preemption notice came at (asked here, once per step: call this at
    every step, on every process). `extra`: a dict or a function returning one (called only
    when saving); `check(state)` runs before a save. Returns True when the run must stop for
    preemption; the checkpoint is then committed."""
    preempted = self.reached_preemption(step)
    if not (preempted or last or (self.every_steps > 0 and step % self.every_steps == 0)):
      return False
    if check is not None:
      check(state)
    self.save(step, state, extra() if callable(extra) else extra)
    if preempted and not last:
      self.wait()
      return True
    return False

  def save(self, step, state, extra):
    """Starts an async save of `state` with its arrays' fingerprints (returns once the state
    is copied off the devices); False if the step is already on disk."""
    if self._pending is not None:
      self.wait()   # the previous save's failure surfaces here (orbax would wait for it too)
    exists = step in self._mngr.all_steps()
    if exists and read.marked(self.directory, step) is None:
      _log.info("checkpoint step %d already exists; not saved again", step)   # a resumed run
      return False
    record = fingerprint.record(state)   # on the devices, before the trainer donates `state`
    bad = getattr(state, "bad_step", None)
    finite = all(a["finite"] for n, a in record["arrays"].items()
                 if n.startswith("params/") or not hasattr(state, "params"))
    if (bad is not None and int(jax.device_get(bad))) or not finite:
      raise NonFiniteStateError(f"refusing to save step {step}: the weights are not finite")
    if exists:   # marked DAMAGED in place (object store): replaced by the new save
      _log.warning("deleting checkpoint step %d in %s, marked %s, to save that step again",
                   step, self.directory, read.MARKER)
      self._mngr.delete(step)
      self._marked.discard(step)
    saved = self._mngr.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(dict(extra)),
        config=ocp.args.JsonSave(self._config), fingerprints=ocp.args.JsonSave(record)))
    self._pending = step if saved else None
    return saved

  def wait(self, timeout_s=None):
    """Blocks until the last async save is committed, for at most `timeout_s` (default
    `save_timeout_s`); CheckpointSaveError if it failed or did not finish by then."""
    timeout_s = self.save_timeout_s if timeout_s is None else float(timeout_s)
    finished, error = _run_bounded(self._mngr.wait_until_finished, timeout_s)
    step, self._pending = self._pending, None
    where = f"checkpoint step {step} in {self.directory}"
    if not finished or error is not None:   # the save's own threads may never end
      _watch_exit()
    if not finished:
      raise CheckpointSaveError(f"{where}: the save did not finish within {timeout_s:.0f} s; "
                                "it is not committed")
    if error is not None:
      raise CheckpointSaveError(f"{where} was not saved: {read.first_line(error)}") from error
    if step is not None:   # orbax may log a failed commit and carry on: look at the disk
      self._mngr.reload()
      if step not in self._mngr.all_steps():
        raise CheckpointSaveError(f"{where} was not committed (see orbax's error above)")

  def close(self):
    """Waits (bounded) for the last save and raises its failure; closes orbax's manager (also
    bounded: its threads must end for the process to exit) and gives SIGTERM back."""
    failure = None
    try:
      self.wait()
    except CheckpointSaveError as e:
      failure = e
    try:
      # After a failed save orbax's close() waits for it again: a short bound then.
      finished, error = _run_bounded(self._mngr.close,
                                     self.save_timeout_s if failure is None else 10.0)
      if failure is None and (error is not None or not finished):
        raise CheckpointSaveError(f"closing the checkpoints in {self.directory}: "
                                  + (read.first_line(error) if error else "it did not finish"))
    finally:
      if self._previous_handler is not None:
        signal.signal(signal.SIGTERM, self._previous_handler)
        self._previous_handler = None
    if failure is not None:
      raise failure

  # ---------------------------------------------------------------- restoring

  def _steps(self):
    """Committed steps, newest first, less those marked DAMAGED (remembered in _marked)."""
    self._mngr.reload()   # another process or an earlier run may have written since
    steps = []
    for s in sorted(self._mngr.all_steps(), reverse=True):
      if s in self._marked or read.marked(self.directory, s) is not None:
        self._marked.add(s)
      else:
        steps.append(s)
    return steps

  def latest_step(self):
    """The newest committed checkpoint's step, or None (restore() checks it is readable)."""
    steps = self._steps()
    return steps[0] if steps else None

  def _restore_step(self, step, target):
    """-> (state, extra) of one step, verified; DamagedCheckpointError if it is damaged,
    CheckpointMismatchError (before any array is read) if it does not fit `target`."""
    reason = read.marked(self.directory, step)
    if reason is not None:
      self._marked.add(step)
      raise DamagedCheckpointError(f"marked {read.MARKER}: {reason}")
    error = out = record = None
    try:
      _, shapes = read.state_metadata(self._mngr, step)
      record = read.fingerprints(self._mngr, self.directory, step, shapes)
      read.check_fits(shapes, read.flat_shapes(target), read.step_dir(self.directory, step))
      out = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
    except CheckpointMismatchError:
      raise   # bad input, not damage: reported, nothing touched
    except DamagedCheckpointError as e:
      error = e
    except Exception as e:  # pylint: disable=broad-except
      if read.is_memory_error(e):
        raise
      error = DamagedCheckpointError(f"unreadable ({read.first_line(e)})")
    # Every process must restore the same step, and the check below is a collective.
    if not _all_processes_agree(error is None):
      raise error or DamagedCheckpointError("another process could not read it")
    read.verify(record, out.state)
    return out.state, dict(out.extra or {})

  def restore(self, target, step=None):
    """-> (state placed on `target`'s shardings, extra dict).

    `target`: a tree of jax.ShapeDtypeStruct with `.sharding` (today's mesh, whatever the mesh
    that saved it). With `step=None` the newest readable checkpoint: a damaged one is reported
    and set aside (see the module docstring), and the one before it used. A checkpoint that
    does not fit `target` raises CheckpointMismatchError before anything is read, moved or
    written; finding none readable raises NoCheckpointError, and moves nothing.
    """
    if step is not None:
      self._mngr.reload()
      return self._restore_step(step, target)
    steps = self._steps()
    if not steps:
      raise NoCheckpointError(f"no checkpoint in {self.directory}")
    damaged = []
    for s in steps:
      try:
        result = self._restore_step(s, target)
      except DamagedCheckpointError as e:
        damaged.append((s, e))
        continue
      self._set_aside(damaged, s)
      return result
    raise NoCheckpointError(f"no readable checkpoint in {self.directory} (nothing was moved): "
                            + "; ".join(f"step {s}: {e}" for s, e in damaged))

  def _set_aside(self, damaged, used_step):
    """Reports the damaged checkpoints newer than the one used and sets them aside, kept for
    inspection: moved to checkpoints.damaged/ (so this run can save those steps again), or, on
    an object store, where a move copies every byte, marked DAMAGED in place."""
    if not damaged:
      return
    main = jax.process_index() == 0
    for s, e in damaged:
      if paths.is_remote(self.directory):
        marker = paths.join(read.step_dir(self.directory, s), read.MARKER)
        action = f"; marked it {read.MARKER} ({marker})"
        if main:
          paths.resolve(marker).write_text(f"{e}\n")
        self._marked.add(s)
      else:
        aside = paths.join(self.directory + ".damaged", str(s))
        if epath.Path(aside).exists():
          aside += f".{int(time.time())}"
        action = f"; moved it to {aside}"
        if main:
          epath.Path(self.directory + ".damaged").mkdir(parents=True, exist_ok=True)
          epath.Path(read.step_dir(self.directory, s)).rename(aside)
      read.warn_damaged(self.directory, s, e, used_step, action)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("siglip_jax.checkpoint.set_aside")
    self._mngr.reload()
