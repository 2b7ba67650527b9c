"""`python -m siglip_jax.bench --microbatches=1,8 [--repeats=5]`: what gradient caching costs.

Each K in the list (`input.microbatches`) is built at the SAME micro-batch (`--batch`, default
the config's `input.batch_size`; NaFlex: each length's batch), so its global batch is K times
it, and compiled once (its first step); then the Ks are timed interleaved, K1, K2, K1, K2, ...
for `repeats` rounds, each run `--warmup` untimed steps then `--steps` timed ones, so a slow
spell of the host weighs on every K alike. All states and batches stay alive meanwhile.

One JSON line: per K (`per_k`) its global batch, the median step time, the median time per
pair, pairs/s at the median, every run's step time, model and hardware FLOPs per pair
(`siglip_jax.flops.hw_train_flops_per_pair`: pass 1's extra tower forward with K > 1); and
`cost_ratio` {"K_vs_Kmin": time per pair of K / that of the smallest K} for every other K,
beside `hw_flop_ratio`, the same ratio of hardware FLOPs per pair (what a compute-bound
device would show). With SILC/TIPS the step after their switch is timed.
"""
import copy
import math
import statistics


def parse_microbatches(spec):
  """"1,8" -> (1, 8) (order kept, repeats dropped), "" -> () (no comparison)."""
  spec = str(spec or "").strip()
  if not spec:
    return ()
  try:
    ks = [int(p) for p in spec.split(",")]
  except ValueError:
    ks = []
  if not ks or any(k < 1 for k in ks):
    raise ValueError(f"--microbatches: expected a comma list of integers >= 1 (e.g. 1,8); got "
                     f"{spec!r}")
  return tuple(dict.fromkeys(ks))


def config_for(config, k):
  """A copy of `config` with K = `k` micro-batches of its own batch (every batch times k)."""
  c = copy.deepcopy(config)
  c.input.microbatches = int(k)
  c.input.batch_size = int(config.input.batch_size) * k
  by_len = config.input.get("batch_size_by_len")
  if by_len:
    c.input.batch_size_by_len = tuple((n, int(b) * k) for n, b in by_len)
  return c


def summarize(runs, global_batches, flops=None):
  """The comparison's fields from `runs` {K: [seconds per step of each run]},
  `global_batches` {K: B} and `flops` {K: (model, hardware) FLOPs per pair} (optional)."""
  per_k = {}
  for k, times in runs.items():
    b, step_s = global_batches[k], statistics.median(times)
    per_k[k] = {"global_batch": b, "step_s_median": round(step_s, 5),
                "time_per_pair_s_median": step_s / b, "pairs_per_s": round(b / step_s, 2),
                "step_s_runs": [round(t, 5) for t in times]}
    if flops:
      per_k[k].update(gflop_per_pair=round(flops[k][0] / 1e9, 3),
                      gflop_per_pair_hw=round(flops[k][1] / 1e9, 3))
  k0 = min(runs)
  ratio = lambda f: {f"{k}_vs_{k0}": round(f(k) / f(k0), 4)  # noqa: E731
                     for k in sorted(runs) if k != k0}
  out = {"per_k": {str(k): v for k, v in per_k.items()},
         "cost_ratio": ratio(lambda k: per_k[k]["time_per_pair_s_median"])}
  if flops:
    out["hw_flop_ratio"] = ratio(lambda k: flops[k][1])
  return out


def compare(config, ks, *, batch=0, steps=20, warmup=3, repeats=5, preset="none"):
  """The comparison as a dict (the JSON line's fields); see the module docstring."""
  import jax
  from siglip_jax import bench, experiment, trainer
  if batch:
    config.input.batch_size = batch
  note = experiment.portable_attention(config, jax.default_backend())
  runs = {}
  for k in ks:   # build and compile every K first: the timed rounds compile nothing
    cfg = config_for(config, k)
    parts = trainer.build(cfg)
    train_step, state, batches = bench.prepare_step(parts, cfg)
    state, metrics, compile_s = bench.timed_steps(train_step, state, batches, 1)
    runs[k] = dict(config=cfg, step=train_step, state=state, batches=batches, metrics=metrics,
                   compile_s=compile_s, times=[], flops=bench.flops_per_pair(parts, cfg))
  for _ in range(repeats):
    for k in ks:
      r = runs[k]
      r["state"], r["metrics"] = bench.run_steps(r["step"], r["state"], r["batches"], warmup,
                                                 r["metrics"])
      r["state"], r["metrics"], step_s = bench.timed_steps(r["step"], r["state"],
                                                           r["batches"], steps)
      r["times"].append(step_s)
  b = {k: bench.timed_shape(r["config"])[0] for k, r in runs.items()}
  out = summarize({k: r["times"] for k, r in runs.items()}, b,
                  {k: r["flops"] for k, r in runs.items()})
  for k, r in runs.items():
    loss = float(jax.device_get(r["metrics"]["train/loss"]))
    entry = out["per_k"][str(k)]
    entry.update(
        loss=loss if math.isfinite(loss) else str(loss), compile_s=round(r["compile_s"], 1),
        hw_tflops_per_device=round(r["flops"][1] * entry["pairs_per_s"]
                                   / jax.device_count() / 1e12, 4))
  _, _, seq_len = bench.timed_shape(config)
  return {"mode": "microbatch_compare", "micro_batch": b[ks[0]] // ks[0],
          "microbatches": list(ks), "repeats": repeats, "steps": steps, "warmup": warmup,
          **out, **({"seq_len": seq_len} if seq_len else {}),
          **bench.environment(config, preset, note)}


def non_finite_losses(result):
  """The non-finite losses of a bench result (either mode) as a string, or ""."""
  if "per_k" in result:
    losses = {f"K={k}": v["loss"] for k, v in result["per_k"].items()}
  else:
    losses = {"": result.get("loss")}
  bad = [f"{v} ({k})" if k else str(v) for k, v in losses.items() if isinstance(v, str)]
  return ", ".join(bad)
