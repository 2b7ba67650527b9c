r"""Times a checkpoint save of a SigLIP-B/16-sized train state through siglip_jax.checkpoint.

    .venv/bin/python benchmarks/checkpoint_save.py [--out=/tmp/ckpt_bench] [--repeats=3]

The state has every parameter of big_vision's SigLIP B/16 (224 px, text B, vocab 32000; shapes
from /work/shared/reference/big_vision_siglip_b16_224_params.json or tests/models/'s copy) in
float32, plus AdamW's mu and nu: ~203M x 3 values, ~2.4 GB. No model is built. The values are
random (`--fill=random`, the default): zeros would compress to almost nothing and time only the
bookkeeping. Measured per save:
  blocking_s   until Checkpointer.save() returns (fingerprints and finite check of every array
               on the devices + device->host copy); training goes on after this. The first save
               also pays orbax's set-up.
  commit_s     until the checkpoint is committed on disk (save() + wait())
then the on-disk size of one step folder and a restore's time (which verifies the fingerprints),
and the fingerprints alone (`fingerprint_s`; `fingerprint_first_s` includes compiling). Prints one
JSON object.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from siglip_jax import checkpoint, checkpoint_fingerprint  # noqa: E402
from siglip_jax.step import TrainState  # noqa: E402

_REFERENCES = ("/work/shared/reference/big_vision_siglip_b16_224_params.json",
               os.path.join(os.path.dirname(__file__), "..", "tests", "models",
                            "big_vision_siglip_b16_224_params.json"))


def _shapes(path):
  for candidate in ([path] if path else _REFERENCES):
    if os.path.exists(candidate):
      with open(candidate) as f:
        return json.load(f)["params"]
  sys.exit(f"no parameter table found in {path or _REFERENCES}")


def _unflatten(flat):
  tree = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def make_state(shapes, fill):
  """TrainState with random (or zero) params and AdamW moments, built on the device.

  One small jit per distinct shape: a single jit over all ~450 arrays takes minutes to compile.
  """
  tx = optax.adamw(1e-3)
  scale = {"params": 0.02, "mu": 1e-3, "nu": 1e-6}

  def fresh(key, shape, kind):
    if fill == "zeros":
      return jnp.zeros(shape, jnp.float32)
    x = jax.random.normal(key, shape, jnp.float32) * scale[kind]
    return jnp.abs(x) if kind == "nu" else x   # moments as after some training: incompressible

  make = jax.jit(fresh, static_argnums=(1, 2))
  key = jax.random.key(0)
  names = sorted(shapes)
  def tree(kind, salt):
    return _unflatten({n: make(jax.random.fold_in(key, salt * len(names) + i), tuple(shapes[n]),
                                kind) for i, n in enumerate(names)})
  params = tree("params", 0)
  adam, *rest = jax.eval_shape(tx.init, params)   # structure only: the moments are made above
  opt_state = (adam._replace(count=jnp.zeros((), jnp.int32), mu=tree("mu", 1), nu=tree("nu", 2)),
               *rest)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                     rng=jax.random.key_data(key), bad_step=jnp.zeros((), jnp.int32))
  jax.block_until_ready(state)
  return state


def _du(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="/tmp/ckpt_bench", help="workdir (deleted first)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--fill", choices=("random", "zeros"), default="random")
  parser.add_argument("--params_json", default="")
  args = parser.parse_args()

  shutil.rmtree(args.out, ignore_errors=True)
  shapes = _shapes(args.params_json)
  state = make_state(shapes, args.fill)
  leaves = jax.tree_util.tree_leaves(state)
  n_params = sum(int(jnp.size(x)) for x in jax.tree_util.tree_leaves(state.params))
  state_bytes = sum(x.size * x.dtype.itemsize for x in leaves)

  cfg = ml_collections.ConfigDict(dict(every_steps=1, keep=2, keep_every=0))
  ckpt = checkpoint.Checkpointer(args.out, cfg)
  t0 = time.perf_counter()   # what save() computes on the devices first (see checkpoint_save)
  checkpoint_fingerprint.compute(state)   # the first call compiles one program per shape
  fingerprint_first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  checkpoint_fingerprint.compute(state)
  fingerprint_s = time.perf_counter() - t0
  runs = []
  for step in range(1, args.repeats + 1):
    t0 = time.perf_counter()
    ckpt.save(step, state.replace(step=jnp.array(step, jnp.int32)), {"data_position": step})
    t1 = time.perf_counter()
    ckpt.wait()
    t2 = time.perf_counter()
    runs.append(dict(step=step, blocking_s=round(t1 - t0, 3), commit_s=round(t2 - t0, 3)))
  size = _du(os.path.join(args.out, "checkpoints", str(args.repeats)))

  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  del state, leaves
  t0 = time.perf_counter()
  restored, _ = ckpt.restore(target)
  jax.block_until_ready(restored)
  restore_s = time.perf_counter() - t0
  ckpt.close()

  later = runs[1:] or runs
  load = os.getloadavg()
  mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  print(json.dumps(dict(
      params=n_params, state_gb=round(state_bytes / 1e9, 3), fill=args.fill,
      runs=runs,
      fingerprint_s=round(fingerprint_s, 3), fingerprint_first_s=round(fingerprint_first_s, 3),
      blocking_s_median=statistics.median(r["blocking_s"] for r in later),
      commit_s_median=statistics.median(r["commit_s"] for r in later),
      on_disk_gb=round(size / 1e9, 3), restore_s=round(restore_s, 2),
      machine=dict(cpus=os.cpu_count(), mem_gb=round(mem_gb, 1), loadavg_1m=round(load[0], 2),
                   devices=str(jax.devices()[0].platform), python=platform.python_version(),
                   jax=jax.__version__, orbax=ocp.__version__, git=git or None),
      date=time.strftime("%Y-%m-%d"))))


if __name__ == "__main__":
  main()
