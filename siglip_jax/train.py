r"""Trains a SigLIP / CLIP model.

    python -m siglip_jax.train --config=configs/demo.py --workdir=DIR [--config.KEY=VALUE ...]

Rerunning the same command on the same DIR resumes from its latest complete checkpoint.
"""
from absl import flags, logging
from ml_collections import config_flags

from siglip_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (a .py file).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  if _CONFIG.value is None:
    cli.fail("--config is required (e.g. --config=configs/demo.py)")
  if not _WORKDIR.value:
    cli.fail("--workdir is required")
  # Imported here so `--help` and flag errors answer before JAX starts.
  from siglip_jax import checkpoint, distributed, trainer
  with cli.user_errors(trainer.TrainingError, checkpoint.CheckpointMismatchError):
    distributed.initialize()
    trainer.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
