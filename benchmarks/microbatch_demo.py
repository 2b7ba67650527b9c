"""Gradient caching on the demo as shipped: N train steps with K micro-batches against K = 1 (the
same data, model, optimizer): the losses of both and their largest relative difference. One
JSON line. (Memory: `python -m siglip_jax.preflight`, see docs/performance.md.)

    python benchmarks/microbatch_demo.py [--steps=20] [--k=4]

Figures: docs/performance.md, "Gradient caching".
"""
import argparse
import json
import sys
import time

import jax
import numpy as np

sys.path.insert(0, ".")
from siglip_jax import cli, trainer  # noqa: E402
from siglip_jax.data import pipeline  # noqa: E402


def losses(k, steps):
  config = cli.load_config_file("configs/demo.py")
  config.input.microbatches = k
  parts = trainer.build(config)
  batches = pipeline.make_batches(config, parts["batch_sharding"])
  try:
    _, batch, _ = next(batches)
    state = parts["init"](jax.random.key(config.seed), batch)
    out = []
    for _ in range(steps):
      state, metrics = parts["train_step"](state, batch)
      out.append(metrics["train/loss"])
      _, batch, _ = next(batches)
  finally:
    batches.close()
  return np.array(jax.device_get(out), np.float64)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--k", type=int, default=4)
  args = parser.parse_args()
  one, many = losses(1, args.steps), losses(args.k, args.steps)
  rel = np.abs(many - one) / np.abs(one)
  print(json.dumps({"steps": args.steps, "k": args.k, "devices": jax.device_count(),
                    "loss_k1": [round(float(x), 6) for x in one],
                    f"loss_k{args.k}": [round(float(x), 6) for x in many],
                    "max_rel_diff": float(rel.max()), "jax": jax.__version__,
                    "date": time.strftime("%Y-%m-%d")}))


if __name__ == "__main__":
  main()
