"""`python -m siglip_jax.bench` on a tiny config on CPU: one JSON line with the promised fields."""
import importlib
import json
import os

from conftest import TINY_DEMO, run_module

KEYS = {"pairs_per_s", "step_s", "batch", "tflops_per_device", "mfu", "matmul_tflops",
        "matmul_size", "gflop_per_pair", "peak_mem_gib", "mem_source", "compile_s", "steps",
        "warmup", "loss", "platform", "device_kind", "devices", "xla_flags_preset", "xla_flags",
        "jax", "date", "argv", "microbatches", "micro_batch", "hw_tflops_per_device",
        "gflop_per_pair_hw"}


def test_bench_tiny_config_prints_one_json_line():
  args = [*TINY_DEMO, "--batch=8", "--steps=2", "--warmup=1", "--matmul_size=256",
          "--xla_flags_preset=none"]
  proc = run_module("siglip_jax.bench", args, devices=2)
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stdout
  r = json.loads(lines[0])
  assert KEYS <= set(r), KEYS - set(r)
  assert r["batch"] == 8 and r["devices"] == 2 and r["platform"] == "cpu"
  assert r["microbatches"] == 1 and r["micro_batch"] == 8
  assert r["hw_tflops_per_device"] == r["tflops_per_device"]   # the demo: no remat, K = 1
  assert r["pairs_per_s"] > 0 and r["step_s"] > 0 and r["matmul_tflops"] > 0
  assert abs(r["pairs_per_s"] * r["step_s"] - 8) < 0.1
  assert 0 < r["mfu"] and isinstance(r["loss"], float)
  assert r["peak_mem_gib"] > 0


def test_gpu_fast_preset_goes_to_xla_flags_not_the_library():
  from siglip_jax import bench
  env = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
  assert bench.apply_preset("gpu_fast", env)
  flags = env["XLA_FLAGS"].split()
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
  assert "--xla_gpu_enable_triton_gemm=true" in flags            # the user's own setting wins
  assert "--xla_gpu_enable_triton_gemm=false" not in flags
  assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == bench.DEFAULT_MEM_FRACTION
  # The library itself sets no XLA flags.
  importlib.import_module("siglip_jax.trainer")
  assert "latency_hiding" not in os.environ.get("XLA_FLAGS", "")


def test_b16_config_is_big_visions_siglip_b16_and_its_variants_load():
  import importlib.util

  import jax
  import jax.numpy as jnp
  import numpy as np

  from conftest import REPO
  from siglip_jax import experiment
  spec = importlib.util.spec_from_file_location(
      "b16", os.path.join(REPO, "configs/siglip_b16_224.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for variant in ("L/16", "So400m/14", "g/14"):
    experiment.check_config(module.get_config(variant))
  c = module.get_config()
  experiment.check_config(c)
  assert (c.input.image_size, c.input.text_len, c.model.text.vocab_size) == (224, 64, 32000)
  assert (c.model.dtype, c.model.attention_impl) == ("bfloat16", "cudnn")
  assert experiment.portable_attention(c, "cpu") and c.model.attention_impl == ""
  model, _ = experiment.make_model(c, 1000)
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 64), jnp.int32)))["params"]
  # big_vision's SigLIP B/16 224 (reference/big_vision_siglip_b16_224_params.json)
  assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)) == 203_155_970


def test_microbatches_flag_parsing():
  import pytest

  from siglip_jax import bench_compare
  assert bench_compare.parse_microbatches("") == () and bench_compare.parse_microbatches(None) == ()
  assert bench_compare.parse_microbatches("1,8") == (1, 8)
  assert bench_compare.parse_microbatches(" 8, 1,8 ") == (8, 1)
  for bad in ("0,8", "a", "1,,8", "-1"):
    with pytest.raises(ValueError, match="--microbatches"):
      bench_compare.parse_microbatches(bad)


def test_summarize_medians_and_cost_ratio():
  from siglip_jax import bench_compare
  runs = {1: [1.0, 3.0, 2.0], 8: [20.0, 16.0, 17.0]}
  out = bench_compare.summarize(runs, {1: 512, 8: 4096}, {1: (10e9, 10e9), 8: (10e9, 13e9)})
  one, eight = out["per_k"]["1"], out["per_k"]["8"]
  assert (one["step_s_median"], eight["step_s_median"]) == (2.0, 17.0)
  assert one["time_per_pair_s_median"] == 2.0 / 512 and one["pairs_per_s"] == 256.0
  assert eight["step_s_runs"] == [20.0, 16.0, 17.0] and eight["global_batch"] == 4096
  assert out["cost_ratio"] == {"8_vs_1": round((17.0 / 4096) / (2.0 / 512), 4)}
  assert out["hw_flop_ratio"] == {"8_vs_1": 1.3}
  assert eight["gflop_per_pair_hw"] == 13.0
  assert bench_compare.non_finite_losses({"per_k": {"1": {"loss": 1.0}, "8": {"loss": "nan"}}}
                                         ) == "nan (K=8)"
  assert bench_compare.non_finite_losses({"loss": 0.5}) == ""


def test_compare_builds_each_k_at_the_same_micro_batch_and_interleaves(monkeypatch):
  """bench_compare.compare with the build and the step faked: no compilation, the bookkeeping
  only (which global batch each K gets, the order of the runs, the fields)."""
  import importlib.util

  from conftest import REPO
  from siglip_jax import bench, bench_compare, trainer
  spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "configs/demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.input.microbatches = 3        # the comparison's own Ks win
  calls = []

  def prepare_step(parts, cfg):
    k = cfg.input.microbatches
    def step(state, batch):
      calls.append(k)
      return state + 1, {"train/loss": 0.5}
    return step, 0, [None]
  monkeypatch.setattr(trainer, "build", lambda cfg: {"k": cfg.input.microbatches})
  monkeypatch.setattr(bench, "prepare_step", prepare_step)
  monkeypatch.setattr(bench, "flops_per_pair",
                      lambda parts, cfg: (1e9, 1e9 + (parts["k"] > 1) * 0.5e9))
  r = bench_compare.compare(config, (1, 4), batch=32, steps=2, warmup=1, repeats=3)
  # One first (compiling) step per K, then each round: K=1 then K=4, warmup + steps each.
  assert calls == [1, 4] + ([1] * 3 + [4] * 3) * 3
  assert r["micro_batch"] == 32 and r["microbatches"] == [1, 4] and r["repeats"] == 3
  assert r["per_k"]["1"]["global_batch"] == 32 and r["per_k"]["4"]["global_batch"] == 128
  assert len(r["per_k"]["4"]["step_s_runs"]) == 3 and r["per_k"]["4"]["loss"] == 0.5
  assert set(r["cost_ratio"]) == {"4_vs_1"} and r["hw_flop_ratio"] == {"4_vs_1": 1.5}
  assert r["per_k"]["4"]["hw_tflops_per_device"] >= 0 and "device_kind" in r
  assert config.input.batch_size == 32 and config.input.microbatches == 3   # copies built
  json.dumps(r)
