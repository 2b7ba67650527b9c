r"""Evaluates a training run's checkpoint, outside the training loop.

    python -m siglip_jax.evaluate --workdir=DIR [--config=configs/x.py] [--step=N]

Uses the newest readable checkpoint in DIR/checkpoints/ (a damaged newer one is skipped with a
warning naming it; nothing under DIR/checkpoints is written) or step N's, the model and input
settings the run saved beside it, and the run's own evaluators (`config.evals`), or those of
`--config` (whose `--config.evals...` overrides work as in training). Prints a short table, then the metrics as ONE
JSON object on the last line of stdout (`{"step": N, "<dataset>/<metric>": ...}`), and appends
them to DIR/metrics.jsonl (and DIR's TensorBoard events) under that checkpoint's step, so a
later evaluation sits on the run's curves. Shards over every device, like training. DIR may be
a URL (`gs://bucket/run`), as in training.
"""
import json
import math
import sys

from absl import flags, logging
from ml_collections import config_flags

from siglip_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional: a config whose `evals` replace the run's own.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")


def read_checkpoint(workdir, step=None):
  """The checkpoint to evaluate, read and verified (`checkpoint_read.read`): step N's, or the
  newest readable one; a damaged newer step is skipped with a warning naming it, and nothing
  under `workdir/checkpoints` is moved or written (a finished run may be read-only)."""
  from siglip_jax import checkpoint_read
  return checkpoint_read.read(workdir, step=step)


def run_config(ckpt, override=None):
  """The run's saved config (`ckpt`: a `checkpoint_read.Checkpoint`), with `override.evals` in
  place of its own when given."""
  import ml_collections
  from siglip_jax import checkpoint_read, experiment
  saved = ckpt.config
  if not saved and override is None:
    raise experiment.ConfigError(f"{checkpoint_read.step_dir(ckpt.directory, ckpt.step)} holds "
                                 "no config: pass --config=... (the run's)")
  config = ml_collections.ConfigDict(saved) if saved else ml_collections.ConfigDict(override)
  if override is not None:
    with config.unlocked():
      config.evals = ml_collections.ConfigDict(override.get("evals") or {})
  return config


def restore_params(ckpt, parts):
  """The checkpoint's params (no optimizer state), placed on the run's param shardings."""
  import jax
  from siglip_jax import checkpoint_read, mesh as mesh_lib
  flat = ckpt.params

  def place(path, leaf, sharding):
    name = mesh_lib.path_str(path)
    if name not in flat or tuple(flat[name].shape) != tuple(leaf.shape):
      got = tuple(flat[name].shape) if name in flat else "missing"
      raise checkpoint_read.CheckpointMismatchError(
          f"{checkpoint_read.step_dir(ckpt.directory, ckpt.step)}: parameter {name} is {got}, "
          f"the config wants {tuple(leaf.shape)}")
    return jax.device_put(flat[name].astype(leaf.dtype), sharding)

  return jax.tree_util.tree_map_with_path(
      place, parts["abstract_state"].params, parts["state_sharding"].params)


def evaluate(workdir, override=None, step=None):
  """-> (step, {name: value}); writes the metrics to workdir's metrics.jsonl (process 0)."""
  import jax
  from siglip_jax import experiment, metrics, trainer
  ckpt = read_checkpoint(workdir, step)
  config = run_config(ckpt, override)
  evaluators = experiment.make_evaluators(config)
  if not evaluators:
    raise experiment.ConfigError("config key `evals`: no evaluators configured")
  parts = trainer.build(config)
  params = restore_params(ckpt, parts)
  writer = metrics.make_writers(workdir, jax.process_index() == 0 and _can_write(workdir))
  try:
    results = trainer.run_evals(evaluators, config, parts, params, ckpt.step, writer,
                                force=True)
  finally:
    writer.close()
  return ckpt.step, results


def _can_write(workdir):
  """A finished run may sit on a read-only disk: evaluate it all the same, printing the metrics
  without appending them to its metrics.jsonl."""
  from siglip_jax import paths
  try:
    paths.check_writable(workdir)
    return True
  except paths.PathError as e:
    print(f"warning: {e}: the metrics are printed, not appended to metrics.jsonl",
          file=sys.stderr, flush=True)
    return False


def _json_value(v):
  v = float(v) if hasattr(v, "__float__") else v
  return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if not _WORKDIR.value:
    cli.fail("--workdir is required")
  from siglip_jax import checkpoint, distributed, metrics
  with cli.user_errors(FileNotFoundError, checkpoint.CheckpointMismatchError):
    distributed.initialize()
    step, results = evaluate(_WORKDIR.value, _CONFIG.value, _STEP.value)
  import jax
  if jax.process_index() == 0:
    print(metrics.summary_table(results))
    print(json.dumps({"step": step, **{k: _json_value(v) for k, v in sorted(results.items())}}),
          flush=True)


if __name__ == "__main__":
  cli.run(main)
