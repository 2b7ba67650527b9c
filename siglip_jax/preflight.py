r"""Will this config fit? Compiles the train step on simulated CPU devices before a pod is rented.

    python -m siglip_jax.preflight --config=configs/siglip_b16_224.py --devices=8 --chip=H100 \
        [--config.KEY=VALUE ...]
    python -m siglip_jax.preflight --config=configs/siglip_b16_224.py --devices=8 --chip=H100 \
        --max_batch [--microbatches_for_max=16]     # the largest global batch that fits

Builds exactly what training builds (`trainer.build`: the configured mesh, sharding rules, loss
and donated train step) on N simulated CPU devices, compiles it from abstract inputs (nothing is
allocated, so a pod-sized model is checked on a laptop) and reports per device:

- params, optimizer state: from the state's shardings (each leaf's shard shape x item size);
- batch: the per-device slice of the global batch;
- activations: XLA's scratch for the step (activations kept for the backward pass, gradients,
  workspace), `compiled.memory_analysis().temp_size_in_bytes`, times `--activation_scale`;
- outputs that do not reuse a donated input (the step's metrics).

With `input.microbatches = K` > 1 (gradient caching) the step keeps one micro-batch's
activations (global batch / K) plus the whole batch's embeddings and their gradients; the report
shows K and the micro-batch (`microbatches`, `micro_batch`, `per_device_micro_batch`).

The total is set against the chip's HBM (`--hbm_gib` replaces it: a what-if) times
`--usable_fraction` (runtimes reserve some: JAX on GPU preallocates 75% unless
XLA_PYTHON_CLIENT_MEM_FRACTION says more). Prints a table and one JSON line; exits 1 with the
reason when the config cannot fit or is invalid.

`--max_batch` also searches the largest global batch that fits, with K = 1 and with
K = `--microbatches_for_max` (the config's K when > 1) micro-batches, and ends the table with
e.g. `B/16 on 8 H100: 2,048 pairs fit with K=1; 32,768 with K=16`; the JSON gets
`"max_batch": {"1": {"global_batch": ..., "total_gib": ...}, "16": {...}}` (None: nothing fits).
Memory is affine in the batch for a given K, so each search fits a line through two compiles and
confirms its prediction with a third: 3 compiles per K when it holds (2 for K = 1 when the
config's K is 1: the report's compile is one of them), at most 5; each answer is a compiled size
that fits, within 1/32 of the largest (siglip_jax/preflight_search.py). The exit status still
judges the config as given.

The activation figure comes from XLA:CPU's buffer assignment for the same program, with three
corrections for what the CPU does differently from a GPU or TPU:
- XLA:CPU computes bfloat16 in float32 (its temp for a bf16 model equals the float32 model's,
  measured on a B/16-width model), so for a bf16/fp16 `model.dtype` the temp is halved
  (`--activation_scale`, default auto: 0.5 for 16-bit compute, 1 otherwise);
- cuDNN's fused attention keeps only q, k, v and the output for the backward pass; it does not
  lower on CPU, so it is stood in for by XLA attention under `jax.checkpoint`, which keeps the
  same;
- XLA:CPU removes the optimization barriers that keep rematerialization (`remat_policy`, the
  stand-in above) from being merged back into the forward pass, so preflight compiles with that
  pass off (`--xla_disable_hlo_passes=cse_barrier_expander`), as accelerators keep them.
Accelerator compilers still fuse and schedule differently: an estimate, not a promise.
The raw compiled figures are in the JSON line (`compiled_bytes`).
"""
import functools
import json
import math
import os
import re
import sys
import time

from absl import flags, logging
from ml_collections import config_flags

from siglip_jax import cli

# HBM per chip (GiB) and dense bf16 peak (TFLOP/s, per chip) from the vendors' spec sheets.
CHIPS = {"v4": (32, 275), "v5e": (16, 197), "v5p": (95, 459), "v6e": (32, 918),
         "H100": (80, 989), "H200": (141, 989)}
GIB = 1024 ** 3


def chip_spec(name):
  """(canonical name, HBM GiB, bf16 TFLOP/s) for a chip name in any case."""
  for key, (hbm, tflops) in CHIPS.items():
    if key.lower() == str(name).lower():
      return key, hbm, tflops
  raise ValueError(f"--chip={name!r} is unknown; use one of {', '.join(CHIPS)}")


# XLA:CPU drops optimization barriers before CSE, which merges a rematerialized forward with the
# original: remat (and the fused-attention stand-in) then saves nothing in its buffer assignment
# (a 6-block MLP: 247 MB temp with or without jax.checkpoint). Accelerator compilers keep them;
# with this pass off the CPU keeps them too (80 MB) and still computes the same values.
KEEP_REMAT_PASS = "cse_barrier_expander"


def simulate_devices(n, env=os.environ):
  """Sets the environment for `n` CPU devices compiled as an accelerator would keep remat; True
  when it changed anything. Only works before JAX initializes its backends, hence the re-exec
  in `main`."""
  flags_ = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  disabled = re.search(r"--xla_disable_hlo_passes=(\S+)", flags_)
  if disabled is None:
    flags_ += f" --xla_disable_hlo_passes={KEEP_REMAT_PASS}"
  elif KEEP_REMAT_PASS not in disabled.group(1).split(","):
    flags_ = flags_.replace(disabled.group(0), f"{disabled.group(0)},{KEEP_REMAT_PASS}")
  want = f"{flags_.strip()} --xla_force_host_platform_device_count={n}".strip()
  changed = env.get("XLA_FLAGS") != want or env.get("JAX_PLATFORMS") != "cpu"
  env["XLA_FLAGS"], env["JAX_PLATFORMS"] = want, "cpu"
  return changed


def auto_activation_scale(config):
  """XLA:CPU keeps float32 where an accelerator keeps the 16-bit compute dtype."""
  dtype = str(config.model.get("dtype") or "float32")
  return 0.5 if dtype in ("bfloat16", "float16", "bf16", "fp16") else 1.0


def stand_in_for_fused_attention():
  """Makes `implementation="cudnn"` lower on CPU with the fused kernel's memory: XLA attention
  under jax.checkpoint saves q, k, v (not the [heads, q, k] probabilities) for the backward pass.
  The models look `jax.nn.dot_product_attention` up at call time, so patching it is enough; this
  process only compiles, so nothing computed here depends on the stand-in."""
  import jax
  original = getattr(jax.nn.dot_product_attention, "_preflight_original",
                     jax.nn.dot_product_attention)

  def attention(query, key, value, *args, implementation=None, **kwargs):
    if implementation != "cudnn":
      return original(query, key, value, *args, implementation=implementation, **kwargs)
    fused = jax.checkpoint(functools.partial(original, implementation="xla", **kwargs))
    return fused(query, key, value, *args)

  attention._preflight_original = original
  jax.nn.dot_product_attention = attention


def _with_shardings(abstract, shardings):
  import jax
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def per_device_bytes(abstract, shardings):
  """Bytes one device holds of a tree of ShapeDtypeStructs under the given shardings (the
  largest shard, which is every shard for the even splits these rules make)."""
  import jax
  sizes = jax.tree_util.tree_map(
      lambda a, s: math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize, abstract, shardings)
  return int(sum(jax.tree_util.tree_leaves(sizes)))


def abstract_batch(example, batch_sharding):
  """The train step's global batch (`parts["example"]`: image, text and what the objectives
  read) placed with the batch sharding."""
  import jax
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
          for k, v in example.items()}


def estimate(config, chip="H100", usable_fraction=0.9, activation_scale=-1.0, hbm_gib=None):
  """Per-device memory of the configured train step on this process's devices; a dict.
  `hbm_gib` replaces the chip's HBM (a what-if, and small fake chips in tests)."""
  import jax
  from siglip_jax import flops, mesh as mesh_lib, trainer
  chip, chip_hbm, peak_tflops = chip_spec(chip)
  hbm_gib = chip_hbm if hbm_gib is None or hbm_gib <= 0 else hbm_gib
  note = None
  if jax.default_backend() != "gpu" and config.model.get("attention_impl") == "cudnn":
    stand_in_for_fused_attention()
    note = "cuDNN attention stood in for by checkpointed XLA attention (same saved tensors)"
  scale = auto_activation_scale(config) if activation_scale < 0 else activation_scale
  parts = trainer.build(config)
  state, shard = parts["abstract_state"], parts["state_sharding"]
  params = per_device_bytes(state.params, shard.params)
  opt = per_device_bytes(state.opt_state, shard.opt_state)
  other = per_device_bytes(state, shard) - params - opt
  batch = abstract_batch(parts["example"], parts["batch_sharding"])
  batch_bytes = per_device_bytes(batch, {k: v.sharding for k, v in batch.items()})
  t0 = time.perf_counter()
  compiled = parts["train_step"].lower(_with_shardings(state, shard), batch).compile()
  compile_s = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  arg, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
  alias, temp = ma.alias_size_in_bytes, ma.temp_size_in_bytes
  fresh_out = max(out - alias, 0)  # outputs written to new buffers (donated state is reused)
  activations = int(temp * scale)
  total = params + opt + other + batch_bytes + activations + fresh_out
  usable = hbm_gib * usable_fraction
  usable_bytes = int(usable * GIB)
  mesh = parts["mesh"]
  batch_devices = mesh_lib.batch_size_divisor(mesh)
  global_batch, k = int(config.input.batch_size), int(config.input.get("microbatches", 1))
  # Analytic model FLOPs (siglip_jax.flops): XLA's cost analysis counts a scanned layer once
  # and cuDNN attention as zero, so it is not used here.
  step_flops = flops.train_flops_per_pair(
      parts["model"], image_size=config.input.image_size, text_len=config.input.text_len,
      global_batch=config.input.batch_size, objectives=parts["objectives"]
  ) * config.input.batch_size / jax.device_count()
  g = lambda x: round(x / GIB, 3)  # noqa: E731
  sig = lambda x: float(f"{x:.3g}")  # noqa: E731
  return {
      "chip": chip, "hbm_gib": hbm_gib, "usable_gib": round(usable, 3),
      "usable_bytes": usable_bytes,
      "devices": jax.device_count(), "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "model": config.model.image.get("variant") or "the model",
      "global_batch": global_batch, "batch_devices": batch_devices,
      "per_device_batch": global_batch // batch_devices,
      # Gradient caching (`input.microbatches`): activations are kept for one micro-batch.
      "microbatches": k, "micro_batch": global_batch // k,
      "per_device_micro_batch": global_batch // k // batch_devices,
      "params_gib": g(params), "opt_state_gib": g(opt), "other_state_gib": g(other),
      "batch_gib": g(batch_bytes), "activations_gib": g(activations),
      "activation_scale": scale, "fresh_output_gib": g(fresh_out),
      "total_gib": g(total), "fits": total <= usable_bytes,
      # What XLA's own buffer assignment says, for comparison with the figure above.
      "compiled": {"argument_gib": g(arg), "output_gib": g(out), "alias_gib": g(alias),
                   "temp_gib": g(temp), "total_gib": g(arg + out - alias + temp)},
      "tflop_per_device_step": sig(step_flops / 1e12),
      # The step time at 100% of the chip's bf16 peak: no run can beat it (at 40% MFU: x2.5).
      "min_step_s": sig(step_flops / (peak_tflops * 1e12)),
      "compile_s": round(compile_s, 1), "note": note,
      # Exact figures (the GiB above are rounded): what tests and scripts should compare.
      "per_device_bytes": {"params": params, "opt_state": opt, "other_state": other,
                           "batch": batch_bytes, "activations": activations,
                           "fresh_output": fresh_out,
                           "total": total},
      "compiled_bytes": {"argument": arg, "output": out, "alias": alias, "temp": temp,
                         "total": arg + out - alias + temp},
  }


def verdict(r):
  """None when it fits, else the one-line reason with the knobs that help."""
  if r["fits"]:
    return None
  big = max(("activations", r["activations_gib"]), ("parameters", r["params_gib"]),
            ("optimizer state", r["opt_state_gib"]), key=lambda kv: kv[1])
  k = r["microbatches"]
  batch = "lower input.batch_size"
  fit = (r.get("max_batch") or {}).get("1", {}).get("global_batch")
  if fit:
    batch += f" ({fit:,} fits)"
  if big[0] == "activations":
    # Gradient caching keeps one micro-batch's activations: the same step at a K-th of them.
    more = f"raise input.microbatches (now {k})" if k > 1 else "set input.microbatches=K"
    knobs = (f"{more} (gradient caching: activations of global batch / K), {batch}, enable "
             "remat (model.*.remat_policy=nothing_saveable), or add fsdp")
  else:
    knobs = (f"{batch}, add fsdp (mesh=(('data',-1),('fsdp',N)), sharding_rules=(('.*','fsdp'),)"
             "), or enable remat (model.*.remat_policy=nothing_saveable)")
  return (f"per-device total {r['total_gib']:.1f} GiB exceeds {r['chip']}'s {r['hbm_gib']} GiB "
          f"(usable {r['usable_gib']:.1f} GiB): activations {r['activations_gib']:.1f} GiB, params "
          f"{r['params_gib']:.1f} GiB, optimizer {r['opt_state_gib']:.1f} GiB; largest: "
          f"{big[0]} - {knobs}")


def table(r):
  rows = [("parameters", r["params_gib"]), ("optimizer state", r["opt_state_gib"]),
          ("other state", r["other_state_gib"]), ("batch slice", r["batch_gib"]),
          (f"activations+grads (x{r['activation_scale']:g})", r["activations_gib"]),
          ("fresh outputs", r["fresh_output_gib"]),
          ("total", r["total_gib"]), (f"{r['chip']} usable", r["usable_gib"])]
  head = (f"preflight: {r['devices']} devices, mesh {r['mesh']}, global batch {r['global_batch']} "
          f"({r['per_device_batch']} per device), ")
  if r["microbatches"] > 1:
    head += (f"K={r['microbatches']} micro-batches of {r['micro_batch']} "
             f"({r['per_device_micro_batch']} per device), ")
  head += f"chip {r['chip']} ({r['hbm_gib']:g} GiB)"
  lines = [head, f"{'per device':<28}{'GiB':>10}{'MiB':>12}"]
  lines += [f"{name:<28}{value:>10.3f}{value * 1024:>12.1f}" for name, value in rows]
  lines.append(f"{'fits':<28}{'yes' if r['fits'] else 'NO':>10}")
  if r["note"]:
    lines.append(f"note: {r['note']}")
  if r.get("max_batch"):
    from siglip_jax import preflight_search
    lines.append(preflight_search.summary(r, r["max_batch"]))
  return "\n".join(lines)


_CONFIG = _DEVICES = _CHIP = _USABLE = _SCALE = None  # set by _define_flags()
_MAX_BATCH = _MICROBATCHES_FOR_MAX = _HBM_GIB = None


def _define_flags():
  """Flags exist only when this module runs as a program, so tests and other modules can
  import it (absl refuses a flag name defined twice in one process)."""
  global _CONFIG, _DEVICES, _CHIP, _USABLE, _SCALE, _MAX_BATCH, _MICROBATCHES_FOR_MAX, _HBM_GIB
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (a .py file).",
                                            lock_config=False)
  _DEVICES = flags.DEFINE_integer("devices", 8, "Number of simulated devices (the pod's chips).")
  _CHIP = flags.DEFINE_string("chip", "H100", f"One of {', '.join(CHIPS)} (case-insensitive).")
  _USABLE = flags.DEFINE_float("usable_fraction", 0.9,
                               "Fraction of HBM the run may use (runtime and fragmentation "
                               "take the rest).")
  _SCALE = flags.DEFINE_float("activation_scale", -1.0,
                              "Factor on XLA:CPU's temp; -1: 0.5 for a 16-bit model.dtype, else 1.")
  _MAX_BATCH = flags.DEFINE_boolean("max_batch", False,
                                    "Also find the largest global batch that fits, with K=1 and "
                                    "with K micro-batches (siglip_jax/preflight_search.py).")
  _MICROBATCHES_FOR_MAX = flags.DEFINE_integer(
      "microbatches_for_max", 16, "K for --max_batch's search with micro-batches (the config's "
      "input.microbatches when that is > 1).")
  _HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "HBM GiB per chip instead of --chip's (0: the "
                                "chip's); a what-if, and small fake chips in tests.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # absl's INFO lines (backend probing) are noise here
  if _CONFIG.value is None:
    cli.fail("--config is required (e.g. --config=configs/demo.py)")
  if _DEVICES.value < 1:
    cli.fail(f"--devices must be positive, got {_DEVICES.value}")
  try:
    chip_spec(_CHIP.value)
  except ValueError as e:
    cli.fail(e)
  # The device count is fixed when JAX starts its CPU backend: if something imported JAX
  # already, start over in a fresh interpreter with the environment set.
  if simulate_devices(_DEVICES.value) and "jax" in sys.modules:
    os.execv(sys.executable, [sys.executable, "-m", "siglip_jax.preflight", *sys.argv[1:]])
  from siglip_jax import experiment, naflex_config, preflight_search
  with cli.user_errors(ValueError):
    experiment.check_config(_CONFIG.value)
    if _MAX_BATCH.value and naflex_config.is_naflex(_CONFIG.value):
      raise ValueError("--max_batch searches input.batch_size; a NaFlex config's batches are "
                       "per length (input.batch_size_by_len): check them one by one")
    if _MAX_BATCH.value and _MICROBATCHES_FOR_MAX.value < 2:
      raise ValueError(f"--microbatches_for_max must be at least 2, got "
                       f"{_MICROBATCHES_FOR_MAX.value}")
    run = functools.partial(estimate, chip=_CHIP.value, usable_fraction=_USABLE.value,
                            activation_scale=_SCALE.value, hbm_gib=_HBM_GIB.value)
    report = run(_CONFIG.value)
    if _MAX_BATCH.value:
      print(table(report), flush=True)   # the config as it is, while the search compiles
      report["max_batch"] = preflight_search.max_batches(
          _CONFIG.value, report, run, _MICROBATCHES_FOR_MAX.value,
          log=lambda line: print(line, file=sys.stderr, flush=True))
      print(preflight_search.summary(report, report["max_batch"]))
    else:
      print(table(report))
  print(json.dumps(report), flush=True)
  reason = verdict(report)
  if reason:
    sys.exit(f"error: {reason}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
