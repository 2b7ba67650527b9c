"""Test-wide set-up: 8 simulated CPU devices (set before JAX is imported anywhere), and helpers
to run the CLI entry points as a user would, in subprocesses with a clean device setting."""
import contextlib
import os
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the session's processes: the many tiny training subprocesses compile
# the same programs (JAX keys the cache on the program, devices and flags, so a hit is exact).
# A run's own environment may name another cache.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="siglip_jax_test_xla_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
# On CPU the tests compile hundreds of tiny programs whose run time is negligible, and LLVM's
# optimisation passes are about half of each compile (a tiny train step: 7.9 s -> 4-5 s). The
# HLO passes, and so what is computed, are the same; JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the
# suite with the default passes. Inherited by every subprocess the tests start.
if os.environ["JAX_PLATFORMS"] == "cpu":
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A demo small enough to compile and train a few steps in seconds on 2 cores.
TINY_DEMO = [
    "--config=configs/demo.py",
    "--config.input.batch_size=16",
    "--config.model.image.depth=1", "--config.model.image.width=32",
    "--config.model.image.mlp_dim=64", "--config.model.image.num_heads=2",
    "--config.model.text.depth=1", "--config.model.text.width=32",
    "--config.model.text.mlp_dim=64", "--config.model.text.num_heads=2",
    "--config.model.out_dim=(None,32)",
    "--config.evals.shapes.every_steps=0",
    "--config.optim.schedule.warmup_steps=2",
]


def cli_env(devices=1, **extra):
  """Environment for a subprocess with `devices` CPU devices."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("SIGLIP_JAX_")}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.update({k: str(v) for k, v in extra.items()})
  return env


def run_module(module, args, *, devices=1, timeout=300, check=True, env=None):
  """Runs `python -m module args` from the repo root; returns the CompletedProcess."""
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                        env=env or cli_env(devices), capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{module} {' '.join(args)} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc


@contextlib.contextmanager
def read_only(path):
  """`path` made read-only: modes (a-w) and, for root, whom modes do not stop, a read-only bind
  mount where the system allows one. Yields whether writes are really refused."""
  subprocess.run(["chmod", "-R", "a-w", path], check=True)
  mounted = False
  if os.geteuid() == 0:
    if subprocess.run(["mount", "--bind", path, path], capture_output=True).returncode == 0:
      mounted = True
      if subprocess.run(["mount", "-o", "remount,bind,ro", path],
                        capture_output=True).returncode != 0:
        subprocess.run(["umount", path], check=True)
        mounted = False
  try:
    yield mounted or os.geteuid() != 0
  finally:
    if mounted:
      subprocess.run(["umount", path], check=True)
    subprocess.run(["chmod", "-R", "u+w", path], check=True)


@pytest.fixture
def repo():
  return REPO


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """One tiny demo run shared by the evaluation and observability tests (evaluate CLI, metric
  names, TensorBoard events, profiler trace, notebook): 6 steps on 2 devices, logged every 2
  steps, checkpoints at 3 and 6, a profiler trace of steps 2..3; each batch in 2 micro-batches
  (gradient caching), which none of its readers should notice. Returns {"workdir", "stdout"}."""
  workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
  proc = run_module("siglip_jax.train", TINY_DEMO + [
      f"--workdir={workdir}", "--config.total_steps=6", "--config.log_every_steps=2",
      "--config.checkpoint.every_steps=3", "--config.profile_steps=2,3",
      "--config.input.microbatches=2"], devices=2)
  return {"workdir": workdir, "stdout": proc.stdout}


# A tiny SigLIP 2 demo (sigmoid loss + LocCa decoder on scenes, SILC + TIPS after update 10 of
# 12) on 2 devices, evaluated at the end: the runs of test_resume and the run test_locca_run
# reads. Short: `siglip2_run` saves every step (a second or two a save here).
SIGLIP2_STEPS = 12
TINY_SIGLIP2 = [
    "--config=configs/siglip2_demo.py",
    "--config.model.image.depth=1", "--config.model.text.depth=1",
    "--config.model.image.width=32", "--config.model.text.width=32",
    "--config.model.image.mlp_dim=64", "--config.model.text.mlp_dim=64",
    "--config.model.out_dim=(None, 32)",
    "--config.model.image.num_heads=2", "--config.model.text.num_heads=2",
    "--config.input.batch_size=16", "--config.input.image_size=32",
    "--config.optim.schedule.warmup_steps=2",
    "--config.evals.scenes.every_steps=0", "--config.evals.scenes.num_heldout=16",
    "--config.evals.scenes.num_unseen=16", "--config.evals.scenes.num_probe_train=32",
    f"--config.total_steps={SIGLIP2_STEPS}", "--config.log_every_steps=1"]
SIGLIP2_DEVICES = 2


@pytest.fixture(scope="session")
def siglip2_run(tmp_path_factory):
  """One uninterrupted TINY_SIGLIP2 run, checkpointed at every step (all kept): test_resume's
  reference (its restarts must end where it ends) and the trained run test_locca_run reads
  (metrics, evaluate, load, exports). Returns the workdir (a pathlib.Path)."""
  workdir = tmp_path_factory.mktemp("siglip2_run") / "run"
  run_module("siglip_jax.train", TINY_SIGLIP2 + [
      f"--workdir={workdir}", "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=30"],
      devices=SIGLIP2_DEVICES)
  return workdir


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: runs training or CLI subprocesses (deselect with "
                          "-m 'not slow' for the fast subset)")
  config.addinivalue_line("markers", "accelerator: also run on a GPU/TPU (models, losses, step, "
                          "checkpoints, export): JAX_PLATFORMS=cuda pytest -m accelerator")


# Markers by module (one table, so a new test file is placed in one line): `slow` holds what
# trains or runs CLI subprocesses, `accelerator` what the GPU issue also runs on a device.
SLOW_MODULES = {
    "test_multiprocess.py", "test_resume.py", "test_scripts.py", "test_cli_errors.py",
    "test_evaluate_cli.py", "test_bench.py", "test_webdataset_train.py", "test_notebook.py",
    "test_load_convert.py", "test_checkpoint_damage.py", "test_workdir_lease.py",
    "test_tensorboard.py", "test_check.py", "test_preflight.py", "test_remote_workdir.py",
    "test_perf.py", "test_hostile_values.py", "test_locca_step.py", "test_locca_run.py",
    "test_microbatch.py",
}
ACCELERATOR_MODULES = {
    "test_numerics.py", "test_param_layout.py", "test_losses.py", "test_ring_loss.py",
    "test_step.py", "test_checkpoint.py", "test_checkpoint_fingerprint.py", "test_hf.py",
    "test_big_vision.py", "test_chunked_xent.py", "test_locca.py", "test_mesh.py",
    "test_loss_row_chunk.py",
}


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    name = item.path.name
    if name in SLOW_MODULES:
      item.add_marker(pytest.mark.slow)
    if name in ACCELERATOR_MODULES:
      item.add_marker(pytest.mark.accelerator)
