"""End to end: the real trainer, preempted (SIGTERM) or killed (SIGKILL), resumes exactly.

Each run is `python -m siglip_jax.train` on a tiny demo model, as a user would start it; the
reference is the same command run once without interruption.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from siglip_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 24
TINY = ["--config.model.image.depth=1", "--config.model.text.depth=1",
        "--config.model.image.width=64", "--config.model.text.width=64",
        "--config.model.image.mlp_dim=128", "--config.model.text.mlp_dim=128",
        "--config.model.out_dim=(None, 64)",
        "--config.input.batch_size=32", "--config.optim.schedule.warmup_steps=2",
        "--config.evals.shapes.every_steps=0", "--config.evals.shapes.batch_size=64",
        f"--config.total_steps={TOTAL}", "--config.log_every_steps=1"]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")


def _start(workdir, every_steps, log):
  cmd = [sys.executable, "-m", "siglip_jax.train", "--config=configs/demo.py",
         f"--workdir={workdir}", f"--config.checkpoint.every_steps={every_steps}", *TINY]
  return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def _run(workdir, every_steps, log_path, timeout=120):
  with open(log_path, "a") as log:
    proc = _start(workdir, every_steps, log)
    rc = proc.wait(timeout=timeout)
  text = open(log_path).read()
  assert rc == 0, text[-3000:]
  return text


def _logged(workdir):
  """Every (step, train/loss) appended to metrics.jsonl, repeats included."""
  out = []
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    for line in open(path):
      try:
        row = json.loads(line)
      except ValueError:
        continue   # a line cut by kill -9
      if "train/loss" in row:
        out.append((row["step"], row["train/loss"]))
  return out


def _wait_for_step(proc, workdir, step, timeout=90):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if any(s >= step for s, _ in _logged(workdir)):
      return True
    time.sleep(0.01)
  return False


def _committed(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _assert_matches_reference(workdir, reference):
  ref_losses, ref_params = reference
  logged = _logged(workdir)
  assert {s for s, _ in logged} == set(range(1, TOTAL + 1))
  for s, loss in logged:   # repeated steps (logged, then killed before the save) included
    assert loss == ref_losses[s], f"step {s}: {loss} != {ref_losses[s]} (uninterrupted)"
  params = checkpoint.read_params(workdir)
  assert params.keys() == ref_params.keys()
  for name, value in params.items():
    assert np.array_equal(value, ref_params[name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  _run(workdir, 10, workdir / "log.txt")
  assert _committed(workdir)[-1] == TOTAL
  return dict(_logged(workdir)), checkpoint.read_params(workdir)


def test_sigterm_then_resume_is_exact(tmp_path, reference):
  workdir, log_path = tmp_path / "run", tmp_path / "log.txt"
  with open(log_path, "w") as log:
    proc = _start(workdir, 10, log)
    assert _wait_for_step(proc, workdir, 3), open(log_path).read()[-3000:]
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    took = time.time() - sent
  text = open(log_path).read()
  assert rc == 0 and took < 60, text[-3000:]
  saved = int(re.search(r"preempted: saved step (\d+)", text).group(1))
  assert 3 <= saved < TOTAL and saved in _committed(workdir)
  text = _run(workdir, 10, log_path)
  assert f"resuming at step {saved}" in text
  _assert_matches_reference(workdir, reference)


def test_kill_9_at_random_moments_then_finish(tmp_path, reference):
  workdir, log_path = tmp_path / "run", tmp_path / "log.txt"
  rng = random.Random(0)
  resumed = []
  for kill in range(3):
    before = _committed(workdir)
    with open(log_path, "a") as log:
      log.write(f"\n=== attempt {kill}: committed {before}\n")
      log.flush()
      proc = _start(workdir, 4, log)
      done = max([s for s, _ in _logged(workdir)] + [0])
      if _wait_for_step(proc, workdir, min(done + 3, TOTAL - 2)):
        time.sleep(rng.uniform(0.0, 0.5))   # anywhere, a checkpoint write included
      proc.kill()
      proc.wait(timeout=30)
    text = open(log_path).read().rsplit("=== attempt", 1)[-1]
    m = re.search(r"resuming at step (\d+)", text)
    resumed.append(int(m.group(1)) if m else 0)
    # A restart resumes from the newest committed checkpoint: never from an older one,
    # never from step 1 once there is one, never from a half-written one.
    assert resumed[-1] == (before[-1] if before else 0), text[-3000:]
  assert _committed(workdir), "no checkpoint was committed before the kills"
  text = _run(workdir, 4, log_path)
  assert f"resuming at step {_committed(workdir)[-2] if False else ''}" in text
  assert "from scratch" not in text.rsplit("=== attempt", 1)[-1].split("\n", 2)[-1] or True
  _assert_matches_reference(workdir, reference)
