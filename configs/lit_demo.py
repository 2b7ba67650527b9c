"""LiT on the demo set: lock a trained image tower, train the text tower against it.

    python -m siglip_jax.train --config=configs/lit_demo.py:IMAGE_RUN --workdir=DIR

IMAGE_RUN is a siglip_jax workdir, a checkpoint folder or a big_vision `.npz` whose image tower
is loaded (`model_init`); the text tower and the text head start fresh (`model_load.dont_load`)
and every `img/...` parameter is frozen: no update, no optimizer state.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402  (the demo's data, model and evaluators)


def get_config(arg=None):
  c = demo.get_config()
  c.model_init = arg or ""
  c.model_load.dont_load = ("txt/.*", "t", "b")
  c.optim.frozen = ("img/.*",)
  c.total_steps = 1000
  return c
