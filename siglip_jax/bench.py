r"""Training speed: the training step itself, timed on synthetic data, as one JSON line.

    python -m siglip_jax.bench --config=configs/siglip_b16_224.py --batch=256 \
        [--steps=20] [--warmup=3] [--xla_flags_preset=gpu_fast] [--config.KEY=VALUE ...]
    python -m siglip_jax.bench --config=configs/demo.py --batch=512 --microbatches=1,8 \
        [--repeats=5] [--steps=20] [--warmup=3]

What is timed is `trainer.build(config)["train_step"]`: the same jitted, donated, sharded step
that `siglip_jax.train` runs, so a speed-up here is a speed-up there. The batches are generated
on the devices beforehand (already placed with the batch sharding), so the figure is the step
and nothing else; `perf/data_wait_s` in training says whether the input pipeline keeps up.

Reported: pairs/s and the step time over `--steps` steps after `--warmup` untimed ones (the first
compiles), analytic model TFLOP/s per device (`siglip_jax.flops`: 3x the forward matmuls, no
credit for remat recompute), MFU against a bf16 matmul measured in the same process (8192^3 on
GPU: the ceiling this card reaches today, not the data-sheet peak, which is reported beside it),
and the peak device memory. With SILC/TIPS configured, `pairs_per_s` is the step after their
switch (teacher and views included) and `pairs_per_s_before_switch` the step before it.
`hw_tflops_per_device` / `gflop_per_pair_hw` count hardware FLOPs instead
(`flops.hw_train_flops_per_pair`: remat's recompute, gradient caching's extra tower forward).
`--batch` is the global batch; with `input.microbatches` = K (`--config.input.microbatches=K`)
the line also gives `microbatches` and `micro_batch` (the global batch / K).

`--microbatches=K1,K2,...` compares gradient caching's Ks at the same micro-batch instead: then
`--batch` is the micro-batch, each K's global batch K times it, and the Ks are timed interleaved
`--repeats` times each (siglip_jax/bench_compare.py; its `cost_ratio` is the time per pair of
each K over that of the smallest).

XLA flags are the benchmark's business, not the library's: `--xla_flags_preset=gpu_fast` adds the
flags below to XLA_FLAGS before JAX starts, and the JSON line records what was set.
"""
import json
import math
import os
import sys
import time

from absl import flags, logging
from ml_collections import config_flags

from siglip_jax import cli

# Flags that exist in XLA since 2024 and are documented to help GPU training (JAX's "GPU
# performance tips", NVIDIA JAX-Toolbox). An unknown flag aborts XLA at start-up, so only
# long-lived ones are listed; removed ones (e.g. --xla_gpu_enable_async_all_gather) are not.
XLA_FLAG_PRESETS = {
    "none": (),
    "gpu_fast": (
        # Reorders independent work so copies/collectives overlap compute (JAX-Toolbox's images
        # set it by default).
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        # cuBLAS for plain GEMMs: the autotuner otherwise also tries Triton tiles, which rarely
        # beat cuBLAS on H100 bf16 GEMMs of these shapes and cost compile time.
        "--xla_gpu_enable_triton_gemm=false",
    ),
}
# Let XLA use most of the card (JAX preallocates 75% by default; B/16 at batch 512 needs more).
DEFAULT_MEM_FRACTION = "0.95"


def apply_preset(name, env=os.environ):
  """Adds the preset's flags to XLA_FLAGS (and the memory fraction); True if anything changed."""
  before = (env.get("XLA_FLAGS"), env.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))
  extra = [f for f in XLA_FLAG_PRESETS[name]
           if f.split("=")[0] not in env.get("XLA_FLAGS", "")]  # the user's own setting wins
  if extra:
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", "").strip(), *extra]).strip()
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION)
  return before != (env.get("XLA_FLAGS"), env.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))


def synthetic_batches(config, sharding, vocab, n=2, objectives=()):
  """`n` distinct batches made on the devices with the batch sharding (nothing crosses PCIe
  during the timed loop). Images in [-1, 1], tokens in [1, vocab); what the objectives read
  (the LocCa decoder's passes) from their `synthetic_batch`."""
  import jax
  import jax.numpy as jnp
  b, size, length = config.input.batch_size, config.input.image_size, config.input.text_len

  from siglip_jax import naflex_config
  naflex = naflex_config.is_naflex(config)
  if naflex:   # the longest length, every patch real, on the squarest grid that fills it
    n = max(naflex_config.seq_lens(config))
    b, p = naflex_config.batch_sizes(config)[n], naflex_config.patch_size(config)
    h = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)

  def make(key):
    ki, kt, ko = jax.random.split(key, 3)
    if naflex:
      batch = {"patches": jax.random.uniform(ki, (b, n, p * p * 3), jnp.float32, -1.0, 1.0),
               "patch_mask": jnp.ones((b, n), jnp.int32),
               "spatial_shapes": jnp.tile(jnp.array([[h, n // h]], jnp.int32), (b, 1))}
    else:
      batch = {"image": jax.random.uniform(ki, (b, size, size, 3), jnp.float32, -1.0, 1.0)}
    batch["text"] = jax.random.randint(kt, (b, length), 1, vocab, jnp.int32)
    for o, k in zip(objectives, jax.random.split(ko, max(len(objectives), 1))):
      batch.update(o.synthetic_batch(k, b, vocab))
    return batch

  make = jax.jit(make, out_shardings=sharding)
  return [make(jax.random.key(i)) for i in range(n)]


def prepare_step(parts, config, before_switch=False):
  """(train_step, state, batches) of the configured step: every objective on (SILC/TIPS after
  their switch), or with `before_switch` the step before it."""
  import jax
  objs = parts["objectives"]
  if before_switch:
    objs = [o for o in objs if not o.uses_teacher]
  train_step = parts["train_step_at"](0) if before_switch else parts["train_step"]
  batches = synthetic_batches(config, parts["batch_sharding"], parts["vocab_size"],
                              objectives=objs)
  state = parts["init"](jax.random.key(config.seed), batches[0])
  if parts["switch"] is not None and not before_switch:
    state = parts["switch"](state)
  return train_step, state, batches


def run_steps(train_step, state, batches, n, metrics=None, start=0):
  """`n` steps (dispatch runs ahead; one sync at the end, so timing it times the device work);
  returns (state, metrics)."""
  import jax
  for i in range(n):
    state, metrics = train_step(state, batches[(start + i) % len(batches)])
  jax.block_until_ready((state, metrics))
  return state, metrics


def timed_steps(train_step, state, batches, n):
  """(state, metrics, seconds per step) of `n` steps."""
  t0 = time.perf_counter()
  state, metrics = run_steps(train_step, state, batches, n)
  return state, metrics, (time.perf_counter() - t0) / n


def time_train_step(parts, config, steps, warmup, before_switch=False):
  """(compile_s, step_s, last loss, peak memory bytes or None) of the configured step (see
  `prepare_step`)."""
  import jax
  train_step, state, batches = prepare_step(parts, config, before_switch)
  state, metrics, compile_s = timed_steps(train_step, state, batches, 1)  # compile + one step
  state, metrics = run_steps(train_step, state, batches, warmup - 1, metrics, start=1)
  state, metrics, step_s = timed_steps(train_step, state, batches, steps)
  loss = float(jax.device_get(metrics["train/loss"]))
  peak = peak_memory_bytes()
  del state, batches
  return compile_s, step_s, loss, peak


def peak_memory_bytes():
  """(bytes, source): the devices' `peak_bytes_in_use`, else the process's peak RSS (CPU
  devices live in host memory)."""
  import jax
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
      stats = {}
    if "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  if peaks:
    return max(peaks), "device_peak"
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host_rss_peak"


def matmul_tflops(n, reps=10):
  """TFLOP/s of a jitted bf16 n x n x n matmul on random data on the first device: the mean of
  `reps` back-to-back calls after 3 warm-ups (as the anchor's figure was taken), i.e. what this
  card reaches today on the easiest workload there is."""
  import jax
  import jax.numpy as jnp
  dev = jax.devices()[0]
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(ka, (n, n), jnp.bfloat16), dev)
  b = jax.device_put(jax.random.normal(kb, (n, n), jnp.bfloat16), dev)
  mm = jax.jit(jnp.dot)
  for _ in range(3):
    jax.block_until_ready(mm(a, b))
  t0 = time.perf_counter()
  outs = [mm(a, b) for _ in range(reps)]  # queued back to back: no host gap between them
  jax.block_until_ready(outs)
  return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def timed_shape(config):
  """(global batch, image size, NaFlex length or None) of the batches `synthetic_batches` makes:
  a NaFlex run is timed at its longest length."""
  from siglip_jax import naflex_config
  if not naflex_config.is_naflex(config):
    return config.input.batch_size, config.input.image_size, None
  seq_len = max(naflex_config.seq_lens(config))
  patch = naflex_config.patch_size(config)
  return naflex_config.batch_sizes(config)[seq_len], (seq_len * patch, patch), seq_len


def flops_per_pair(parts, config):
  """(model, hardware) train FLOPs per pair of the timed step (`siglip_jax.flops`)."""
  from siglip_jax import flops
  b, image_size, _ = timed_shape(config)
  kw = dict(image_size=image_size, text_len=config.input.text_len, global_batch=b,
            objectives=parts["objectives"])
  return (flops.train_flops_per_pair(parts["model"], **kw),
          flops.hw_train_flops_per_pair(parts["model"], microbatches=microbatches(config),
                                        **kw))


def microbatches(config):
  return int(config.input.get("microbatches", 1))


def environment(config, preset, note):
  """The fields every JSON line ends with: where, what and how it ran."""
  import jax
  img = config.model.image
  return {
      "platform": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      "devices": jax.device_count(), "dtype": config.model.get("dtype"),
      "attention_impl": config.model.get("attention_impl"),
      "remat": img.get("remat_policy"), "scan": img.get("scan"),
      "xla_flags_preset": preset, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
      "jax": jax.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "argv": sys.argv[1:], "note": note,
  }


def run(config, *, batch=0, steps=20, warmup=3, matmul_size=0, preset="none"):
  """The benchmark as a dict (the JSON line's fields)."""
  import jax
  from siglip_jax import experiment, flops, objectives, trainer
  if batch:
    config.input.batch_size = batch
  platform = jax.default_backend()
  note = experiment.portable_attention(config, platform)
  parts = trainer.build(config)
  before = {}
  if parts["switch"] is not None:   # SILC/TIPS: the step before their switch, timed too
    objectives.set_switch_step(parts["objectives"], 1)
    _, step_s, _, _ = time_train_step(parts, config, steps, warmup, before_switch=True)
    before = {"pairs_per_s_before_switch": round(config.input.batch_size / step_s, 2),
              "step_s_before_switch": round(step_s, 5)}
  compile_s, step_s, loss, (peak, mem_source) = time_train_step(parts, config, steps, warmup)
  n = matmul_size or (1024 if platform == "cpu" else 8192)
  mm = matmul_tflops(n)
  b, _, seq_len = timed_shape(config)
  per_pair, hw_per_pair = flops_per_pair(parts, config)
  pairs_per_s = b / step_s
  tflops = per_pair * pairs_per_s / jax.device_count() / 1e12
  peak_spec = flops.peak_tflops(jax.devices()[0].device_kind,
                                config.get("peak_tflops", 0.0) or 0.0)
  k = microbatches(config)
  return {
      "pairs_per_s": round(pairs_per_s, 2), "step_s": round(step_s, 5), "batch": b,
      "microbatches": k, "micro_batch": b // k,
      "tflops_per_device": round(tflops, 3), "mfu": round(tflops / mm, 4),
      "hw_tflops_per_device": round(hw_per_pair * pairs_per_s / jax.device_count() / 1e12, 3),
      "matmul_tflops": round(mm, 2), "matmul_size": n,
      "mfu_vs_spec_peak": round(tflops / peak_spec, 4) if peak_spec else None,
      "spec_peak_tflops": peak_spec, "gflop_per_pair": round(per_pair / 1e9, 2),
      "gflop_per_pair_hw": round(hw_per_pair / 1e9, 2),
      "peak_mem_gib": round(peak / 2 ** 30, 3), "mem_source": mem_source,
      "compile_s": round(compile_s, 1), "steps": steps, "warmup": warmup,
      "loss": loss if math.isfinite(loss) else str(loss),
      **before, **({"seq_len": seq_len} if seq_len else {}),
      **environment(config, preset, note),
  }


# Set by _define_flags().
_CONFIG = _BATCH = _STEPS = _WARMUP = _PRESET = _MATMUL = _MICROBATCHES = _REPEATS = None


def _define_flags():
  """Flags exist only when this module runs as a program, so tests and other modules can
  import it (absl refuses a flag name defined twice in one process)."""
  global _CONFIG, _BATCH, _STEPS, _WARMUP, _PRESET, _MATMUL, _MICROBATCHES, _REPEATS
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (a .py file).",
                                            lock_config=False)
  _BATCH = flags.DEFINE_integer("batch", 0, "Global batch (default: the config's); with "
                                "--microbatches, the micro-batch.")
  _STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (per run with --microbatches).")
  _WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first one compiles; "
                                 "with --microbatches, before every timed run).")
  _PRESET = flags.DEFINE_enum("xla_flags_preset", "none", list(XLA_FLAG_PRESETS),
                              "XLA flags to add before JAX starts.")
  _MATMUL = flags.DEFINE_integer("matmul_size", 0,
                                 "Side of the bf16 reference matmul (0: 8192 on GPU/TPU, 1024 "
                                 "on CPU).")
  _MICROBATCHES = flags.DEFINE_string(
      "microbatches", "", "Comma list of input.microbatches values K to compare at the same "
      "micro-batch (--batch), timed interleaved (default: none, the config's own K alone).")
  _REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs of each K with --microbatches.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # absl's INFO lines (backend probing) are noise here
  if _CONFIG.value is None:
    cli.fail("--config is required (e.g. --config=configs/siglip_b16_224.py)")
  if _STEPS.value < 1 or _WARMUP.value < 1:
    cli.fail("--steps and --warmup must be at least 1 (the first step compiles)")
  from siglip_jax import bench_compare
  try:
    ks = bench_compare.parse_microbatches(_MICROBATCHES.value)
  except ValueError as e:
    cli.fail(e)
  if ks and _REPEATS.value < 1:
    cli.fail("--repeats must be at least 1")
  # XLA reads its flags once, when JAX starts a backend: restart if something beat us to it.
  if apply_preset(_PRESET.value) and "jax" in sys.modules:
    os.execv(sys.executable, [sys.executable, "-m", "siglip_jax.bench", *sys.argv[1:]])
  with cli.user_errors():
    if ks:
      result = bench_compare.compare(_CONFIG.value, ks, batch=_BATCH.value, steps=_STEPS.value,
                                     warmup=_WARMUP.value, repeats=_REPEATS.value,
                                     preset=_PRESET.value)
    else:
      result = run(_CONFIG.value, batch=_BATCH.value, steps=_STEPS.value,
                   warmup=_WARMUP.value, matmul_size=_MATMUL.value, preset=_PRESET.value)
  print(json.dumps(result), flush=True)
  bad = bench_compare.non_finite_losses(result)
  if bad:  # a skipped (non-finite) update times nothing useful
    sys.exit(f"error: the loss was {bad}; the timing above is not a training step's")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
