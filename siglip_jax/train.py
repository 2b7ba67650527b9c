r"""Trains a SigLIP / CLIP model.

    python -m siglip_jax.train --config=configs/demo.py --workdir=DIR [--config.KEY=VALUE ...]

Rerunning the same command on the same DIR resumes from its latest complete checkpoint.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (a .py file).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  # Imported here so `--help` and flag errors answer before JAX starts.
  from siglip_jax import checkpoint, distributed, experiment, trainer
  if _CONFIG.value is None:
    sys.exit("error: --config is required (e.g. --config=configs/demo.py)")
  if not _WORKDIR.value:
    sys.exit("error: --workdir is required")
  try:
    distributed.initialize()
    trainer.train(_CONFIG.value, _WORKDIR.value)
  except (experiment.ConfigError, trainer.TrainingError, distributed.DistributedError,
          checkpoint.CheckpointMismatchError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
