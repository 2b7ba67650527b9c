r"""Evaluates a training run's checkpoint, outside the training loop.

    python -m siglip_jax.evaluate --workdir=DIR [--config=configs/x.py] [--step=N]

Uses the latest checkpoint in DIR/checkpoints/ (or step N's), the model and input settings the run
saved beside it, and the run's own evaluators (`config.evals`), or those of `--config` (whose
`--config.evals...` overrides work as in training). Prints a short table, then the metrics as ONE
JSON object on the last line of stdout (`{"step": N, "<dataset>/<metric>": ...}`), and appends
them to DIR/metrics.jsonl (and DIR's TensorBoard events) under that checkpoint's step, so a
later evaluation sits on the run's curves. Shards over every device, like training. DIR may be
a URL (`gs://bucket/run`), as in training.
"""
import json
import math
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional: a config whose `evals` replace the run's own.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")


def checkpoint_step(workdir, step=None):
  """The step to evaluate: `step` if its checkpoint exists, else the latest committed one.

  Orbax's listing of committed steps: locally it renames `<step>.orbax-checkpoint-tmp*` to
  `<step>` once a save is complete; on GCS it marks `<step>/` with `commit_success.txt`."""
  from siglip_jax import checkpoint, paths
  directory = paths.join(workdir, "checkpoints")
  steps = checkpoint.committed_steps(directory)
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {directory}")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} under {directory} "
                            f"(there are: {', '.join(map(str, steps))})")
  return step


def run_config(ckpt_dir, override=None):
  """The run's saved config, with `override.evals` in place of its own when given."""
  import ml_collections
  from siglip_jax import checkpoint, experiment
  saved = checkpoint.read_config(ckpt_dir)
  if not saved and override is None:
    raise experiment.ConfigError(f"{ckpt_dir} holds no config: pass --config=... (the run's)")
  config = ml_collections.ConfigDict(saved) if saved else ml_collections.ConfigDict(override)
  if override is not None:
    with config.unlocked():
      config.evals = ml_collections.ConfigDict(override.get("evals") or {})
  return config


def restore_params(ckpt_dir, parts):
  """The checkpoint's params only (no optimizer state), placed on the run's param shardings."""
  import jax
  from siglip_jax import checkpoint, mesh as mesh_lib
  flat = checkpoint.read_params(ckpt_dir)

  def place(path, leaf, sharding):
    name = mesh_lib.path_str(path)
    if name not in flat or tuple(flat[name].shape) != tuple(leaf.shape):
      got = tuple(flat[name].shape) if name in flat else "missing"
      raise checkpoint.CheckpointMismatchError(
          f"{ckpt_dir}: parameter {name} is {got}, the config wants {tuple(leaf.shape)}")
    return jax.device_put(flat[name].astype(leaf.dtype), sharding)

  return jax.tree_util.tree_map_with_path(
      place, parts["abstract_state"].params, parts["state_sharding"].params)


def evaluate(workdir, override=None, step=None):
  """-> (step, {name: value}); writes the metrics to workdir's metrics.jsonl (process 0)."""
  import jax
  from siglip_jax import experiment, metrics, trainer
  step = checkpoint_step(workdir, step)
  from siglip_jax import paths
  ckpt_dir = paths.join(workdir, "checkpoints", str(step))
  config = run_config(ckpt_dir, override)
  evaluators = experiment.make_evaluators(config)
  if not evaluators:
    raise experiment.ConfigError("config key `evals`: no evaluators configured")
  parts = trainer.build(config)
  params = restore_params(ckpt_dir, parts)
  writer = metrics.make_writers(workdir, jax.process_index() == 0)
  try:
    results = trainer.run_evals(evaluators, config, parts, params, step, writer, force=True)
  finally:
    writer.close()
  return step, results


def _json_value(v):
  v = float(v) if hasattr(v, "__float__") else v
  return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from siglip_jax import checkpoint, distributed, experiment, metrics
  if not _WORKDIR.value:
    sys.exit("error: --workdir is required")
  try:
    distributed.initialize()
    step, results = evaluate(_WORKDIR.value, _CONFIG.value, _STEP.value)
  except (experiment.ConfigError, FileNotFoundError,
          checkpoint.CheckpointMismatchError, distributed.DistributedError) as e:
    sys.exit(f"error: {e}")
  import jax
  if jax.process_index() == 0:
    print(metrics.summary_table(results))
    print(json.dumps({"step": step, **{k: _json_value(v) for k, v in sorted(results.items())}}),
          flush=True)


if __name__ == "__main__":
  app.run(main)
