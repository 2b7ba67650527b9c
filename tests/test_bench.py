"""`python -m siglip_jax.bench` on a tiny config on CPU: one JSON line with the promised fields."""
import json
import os

from conftest import TINY_DEMO, run_module

KEYS = {"pairs_per_s", "step_s", "batch", "tflops_per_device", "mfu", "matmul_tflops",
        "matmul_size", "gflop_per_pair", "peak_mem_gib", "mem_source", "compile_s", "steps",
        "warmup", "loss", "platform", "device_kind", "devices", "xla_flags_preset", "xla_flags",
        "jax", "date", "argv"}


def test_bench_tiny_config_prints_one_json_line():
  args = [*TINY_DEMO, "--batch=8", "--steps=2", "--warmup=1", "--matmul_size=256",
          "--xla_flags_preset=none"]
  proc = run_module("siglip_jax.bench", args, devices=2)
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stdout
  r = json.loads(lines[0])
  assert KEYS <= set(r), KEYS - set(r)
  assert r["batch"] == 8 and r["devices"] == 2 and r["platform"] == "cpu"
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
  import siglip_jax.trainer  # noqa: F401
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
