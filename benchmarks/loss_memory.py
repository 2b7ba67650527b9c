"""Per-device scratch memory and step time of the contrastive losses' value_and_grad.

    python benchmarks/loss_memory.py [--per_device_batch=1024] [--dim=256] [--devices=2,4,8]

Simulated CPU devices (the host platform split into --devices' largest count), fixed per-device
batch: the ring loss's memory should stay flat as devices are added; the all-gather and plain
losses grow with the global batch. Prints a markdown table.
"""
import argparse
import os
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--per_device_batch", type=int, default=1024)
parser.add_argument("--dim", type=int, default=256)
parser.add_argument("--devices", default="2,4,8", help="comma-separated device counts")
parser.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up")
args = parser.parse_args()
DEVICE_COUNTS = [int(n) for n in args.devices.split(",")]

# Must be set before jax is imported: the host platform's device count is fixed at start-up.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                           f"device_count={max(DEVICE_COUNTS)}").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from siglip_jax import losses, mesh as mesh_lib  # noqa: E402

# (row label, loss.kind, bidirectional ring)
VARIANTS = [("sigmoid_ring", "sigmoid_ring", False),
            ("sigmoid_ring, bidirectional", "sigmoid_ring", True),
            ("sigmoid_gather", "sigmoid_gather", False), ("sigmoid", "sigmoid", False),
            ("softmax", "softmax", False)]


def measure(kind, bidirectional, n):
  mesh = mesh_lib.make_mesh([("data", n)], devices=jax.devices("cpu")[:n])
  loss = losses.make_loss_fn(kind, mesh, mesh_lib.batch_axes(mesh), bidirectional=bidirectional)
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, n * args.per_device_batch, args.dim)).astype(np.float32)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  zimg, ztxt = (jax.device_put(x, mesh_lib.batch_sharding(mesh)) for x in z)
  t, b = (jax.device_put(jnp.float32(v), mesh_lib.replicated(mesh)) for v in (10.0, -10.0))
  compiled = step.lower(zimg, ztxt, t, b).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(compiled(zimg, ztxt, t, b))  # warm-up
  times = []
  for _ in range(args.runs):
    start = time.perf_counter()
    jax.block_until_ready(compiled(zimg, ztxt, t, b))
    times.append(time.perf_counter() - start)
  return temp, float(np.median(times))


def main():
  print(f"per-device batch {args.per_device_batch}, d {args.dim}, value_and_grad w.r.t. "
        f"(zimg, ztxt, t, b), median of {args.runs} runs after a warm-up, jax {jax.__version__}\n")
  print("| loss | devices | global batch | temp MiB / device | step ms |")
  print("|---|---:|---:|---:|---:|")
  for label, kind, bidirectional in VARIANTS:
    for n in DEVICE_COUNTS:
      temp, seconds = measure(kind, bidirectional, n)
      print(f"| {label} | {n} | {n * args.per_device_batch} | {temp / 2**20:.1f} | "
            f"{seconds * 1e3:.0f} |", flush=True)


if __name__ == "__main__":
  main()
