"""Multi-process training on one machine: `launch/local.sh`, `siglip_jax.distributed`, and the
bad-input checks of the sharded trainer, all through the CLI as a user runs it (the loss kinds
on a 4-device mesh: tests/test_step.py, in-process).

The two training runs (the tiny demo, 8 steps, 4 CPU devices in all) start together in one
module fixture and are waited on by the test that reads them, so their start-up and compiling
overlap.
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, TINY_DEMO, cli_env, run_module

LOCAL_SH = os.path.join(REPO, "launch", "local.sh")
STEPS = 8
TRAIN = [*TINY_DEMO, f"--config.total_steps={STEPS}", "--config.log_every_steps=1"]
TIMEOUT = 600


def _train_losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  rows = [r for r in rows if "train/loss" in r]
  return [r["step"] for r in rows], np.array([r["train/loss"] for r in rows])


class _Runs:
  """Training subprocesses started at once; `result(name)` waits for one and returns its workdir
  (raising with its output if it failed)."""

  def __init__(self, tmp):
    self.tmp, self.procs = tmp, {}

  def start(self, name, cmd, env):
    workdir = os.path.join(self.tmp, name)
    out = open(os.path.join(self.tmp, f"{name}.out"), "w")
    proc = subprocess.Popen([*cmd, f"--workdir={workdir}"], cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT)
    self.procs[name] = (proc, workdir, out)

  def result(self, name):
    proc, workdir, out = self.procs[name]
    rc = proc.wait(timeout=TIMEOUT)
    out.close()
    text = open(out.name).read()
    assert rc == 0, f"{name} failed ({rc}):\n{text[-5000:]}"
    return workdir

  def close(self):
    for proc, _, out in self.procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      out.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  r = _Runs(str(tmp_path_factory.mktemp("multiprocess")))
  train = [sys.executable, "-m", "siglip_jax.train", *TRAIN]
  r.start("one_process", [*train, "--config.loss.kind=sigmoid_ring"], cli_env(devices=4))
  r.start("two_processes", [LOCAL_SH, "-n", "2", "-d", "2", "--", *TRAIN[:],
                            "--config.loss.kind=sigmoid_ring"],
          cli_env(devices=1, PYTHON=sys.executable))
  # The same job with every array FSDP-sharded and each batch in 2 micro-batches (gradient
  # caching: the batch's embeddings and the ring loss span both processes).
  r.start("two_processes_fsdp_k2", [
      LOCAL_SH, "-n", "2", "-d", "2", "--", *TRAIN, "--config.loss.kind=sigmoid_ring",
      "--config.mesh=(('data', 2), ('fsdp', 2))", "--config.sharding_rules=(('.*', 'fsdp'),)",
      "--config.fsdp_min_size_mb=0", "--config.input.microbatches=2"],
      cli_env(devices=1, PYTHON=sys.executable))
  yield r
  r.close()


# --------------------------------------------------------------------------- acceptance

def test_two_processes_log_the_same_loss_as_one(runs):
  one = runs.result("one_process")
  two = runs.result("two_processes")
  steps_one, loss_one = _train_losses(one)
  steps_two, loss_two = _train_losses(two)
  # Only process 0 writes metrics: every step once, none twice.
  assert steps_one == steps_two == list(range(1, STEPS + 1))
  np.testing.assert_allclose(loss_two, loss_one, rtol=1e-4)
  assert np.all(np.isfinite(loss_one))
  logs = os.path.join(two, "logs")
  assert sorted(os.listdir(logs)) == ["process_0.log", "process_1.log"]
  log0, log1 = (open(os.path.join(logs, f"process_{i}.log")).read() for i in (0, 1))
  assert "4 devices x 2 processes" in log0 and f"[{STEPS}/{STEPS}]" in log0
  assert "[1/" not in log1 and "devices x" not in log1     # progress and summary: process 0 only
  assert len([f for f in os.listdir(two) if f.startswith("events.out.tfevents")]) <= 1


def test_two_processes_with_fsdp_and_micro_batches_log_the_same_loss_as_one(runs):
  steps_one, loss_one = _train_losses(runs.result("one_process"))
  steps_two, loss_two = _train_losses(runs.result("two_processes_fsdp_k2"))
  assert steps_one == steps_two == list(range(1, STEPS + 1))
  np.testing.assert_allclose(loss_two, loss_one, rtol=1e-4)
  assert loss_one[-1] < loss_one[0]


# --------------------------------------------------------------------------- the data

class _ProcessView:
  """A batch sharding as one process of a multi-process job sees it: only `devices` are its own."""

  def __init__(self, sharding, devices):
    self.sharding, self.devices = sharding, set(devices)

  def addressable_devices_indices_map(self, shape):
    return {d: i for d, i in self.sharding.devices_indices_map(shape).items()
            if d in self.devices}


@pytest.mark.parametrize("mesh_spec", [(("data", 4),), (("data", 2), ("fsdp", 2))])
def test_global_batch_is_the_same_examples_whatever_the_process_count(mesh_spec):
  """The demo set through the one loader: 1, 2 (two ways) or 4 processes each load only their
  rows, and together they hold the renderer's examples of the step's records."""
  import jax
  from siglip_jax import config_defaults, mesh as mesh_lib
  from siglip_jax.data import pipeline, preprocess, shapes, sources, tokenizer

  mesh = mesh_lib.make_mesh(mesh_spec, devices=jax.devices()[:4])
  sharding = mesh_lib.batch_sharding(mesh)
  config = config_defaults.base()
  config.input.update(dict(data="shapes", batch_size=8, image_size=16, text_len=16))
  global_batch, text_len, step = 8, 16, 3

  def loader(rows):
    return pipeline.StepLoader(sources.from_config(config), preprocess.from_config(config),
                               seed=config.seed, global_batch=global_batch, rows=rows, threads=2)

  records = loader(range(global_batch)).first_records(step * global_batch + np.arange(8))
  expected = shapes.ShapesDataset(seed=0, image_size=16).train_examples(records)
  expected_text = tokenizer.Tokenizer().encode(list(expected["text"]), text_len)
  devices = list(mesh.devices.flat)
  for groups in ([devices], [devices[:2], devices[2:]], [devices[0::2], devices[1::2]],
                 [[d] for d in devices]):
    image = np.zeros((global_batch, 16, 16, 3), np.int64) - 1
    text = np.full((global_batch, text_len), -1, np.int64)
    seen = []
    for group in groups:
      rows = pipeline.local_rows(_ProcessView(sharding, group), global_batch)
      host = loader(rows)(step)
      assert len(rows) == global_batch // len(groups)
      image[rows], text[rows] = host["image"], host["text"]
      seen.extend(rows.tolist())
    assert sorted(seen) == list(range(global_batch)), "each row loaded by exactly one process"
    np.testing.assert_array_equal(image, expected["image"])
    np.testing.assert_array_equal(text, expected_text)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("override, key", [
    ("--config.mesh=(('data', 3),)", "mesh"),
    ("--config.input.batch_size=18", "input.batch_size"),
    ("--config.sharding_rules=(('.*', 'fsdp:model'),)", "sharding_rules"),
])
def test_bad_input_is_one_error_line_before_compiling(tmp_path, override, key):
  t0 = time.monotonic()
  proc = run_module("siglip_jax.train", [*TRAIN, f"--workdir={tmp_path}", override],
                    devices=4, check=False, timeout=120)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2
  assert lines and lines[-1].startswith("error: ") and key in lines[-1], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert "[1/" not in proc.stdout                                   # no step ran
  assert not os.path.exists(tmp_path / "metrics.jsonl")
  assert time.monotonic() - t0 < 60


def test_unreachable_coordinator_fails_in_bounded_time(tmp_path):
  timeout = 5
  env = cli_env(devices=2, SIGLIP_JAX_COORDINATOR="127.0.0.1:1", SIGLIP_JAX_NUM_PROCESSES=2,
                SIGLIP_JAX_PROCESS_ID=1, SIGLIP_JAX_INIT_TIMEOUT=timeout)
  t0 = time.monotonic()
  proc = run_module("siglip_jax.train", [*TRAIN, f"--workdir={tmp_path}"], env=env,
                    check=False, timeout=timeout + 60)
  elapsed = time.monotonic() - t0
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert last.startswith("error: ") and "127.0.0.1:1" in last and "process 1 of 2" in last
  assert elapsed < timeout + 45, elapsed      # start-up (imports) plus the timeout


def test_bad_job_description_is_one_error_line(tmp_path):
  env = cli_env(devices=1, SIGLIP_JAX_COORDINATOR="127.0.0.1:1234", SIGLIP_JAX_NUM_PROCESSES=2,
                SIGLIP_JAX_PROCESS_ID=2)
  proc = run_module("siglip_jax.train", [*TRAIN, f"--workdir={tmp_path}"], env=env,
                    check=False, timeout=60)
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "SIGLIP_JAX_PROCESS_ID" in last


def test_settings_from_the_environment(monkeypatch):
  from siglip_jax import distributed
  assert distributed.explicit_settings({}) is None
  got = distributed.explicit_settings({
      "SIGLIP_JAX_COORDINATOR": "localhost:1234", "SIGLIP_JAX_NUM_PROCESSES": "4",
      "SIGLIP_JAX_PROCESS_ID": "3", "SIGLIP_JAX_LOCAL_DEVICES": "0,1"})
  assert got == dict(coordinator_address="localhost:1234", num_processes=4, process_id=3,
                     local_device_ids=[0, 1])
  for bad in ({"SIGLIP_JAX_COORDINATOR": "localhost"},
              {"SIGLIP_JAX_COORDINATOR": "localhost:1", "SIGLIP_JAX_NUM_PROCESSES": "two",
               "SIGLIP_JAX_PROCESS_ID": "0"}):
    with pytest.raises(distributed.DistributedError):
      distributed.explicit_settings(bad)
  # No cluster around (this machine): a single process; a forced detector must exist.
  assert distributed.detect_cluster({}) is None
  assert distributed.detect_cluster({"SIGLIP_JAX_CLUSTER": "none", "SLURM_JOB_ID": "1"}) is None
  assert distributed.detect_cluster({"SIGLIP_JAX_CLUSTER": "slurm"}) == "slurm"
  with pytest.raises(distributed.DistributedError, match="SIGLIP_JAX_CLUSTER"):
    distributed.detect_cluster({"SIGLIP_JAX_CLUSTER": "nonsense"})
  # A task started by srun (or Open MPI, a JobSet, a TPU pod): JAX's own detection is asked.
  slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[3-4]", "SLURM_NTASKS": "2",
           "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
  assert distributed.detect_cluster(slurm) == "auto"
  assert distributed.detect_cluster({"SLURM_JOB_ID": "77"}) is None   # salloc, not srun
  assert distributed.detect_cluster({"OMPI_COMM_WORLD_SIZE": "4"}) == "auto"
  assert distributed.detect_cluster({"SIGLIP_JAX_CLUSTER": "auto"}) == "auto"


def test_distributed_uses_only_public_jax():
  import siglip_jax.distributed as d
  with open(d.__file__) as f:
    assert "jax._src" not in f.read()


# --------------------------------------------------------------------------- the launcher

def test_launcher_passes_shellcheck():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
  proc = subprocess.run(["shellcheck", LOCAL_SH], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout


def test_launcher_dry_run_prints_the_commands(tmp_path):
  env = cli_env(devices=1, PYTHON=sys.executable,
                XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_foo=1")
  args = ["--config=configs/demo.py", f"--workdir={tmp_path}/w", "--config.model.out_dim=(None, 32)"]
  proc = subprocess.run([LOCAL_SH, "-n", "3", "-d", "2", "--dry-run", "--port", "4321", "--",
                         *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    words = shlex.split(line)
    assert "SIGLIP_JAX_COORDINATOR=127.0.0.1:4321" in words
    assert "SIGLIP_JAX_NUM_PROCESSES=3" in words and f"SIGLIP_JAX_PROCESS_ID={i}" in words
    assert "JAX_PLATFORMS=cpu" in words
    assert "XLA_FLAGS=--xla_cpu_foo=1 --xla_force_host_platform_device_count=2" in words
    start = words.index(sys.executable)
    assert words[start:start + 3 + len(args)] == [sys.executable, "-m", "siglip_jax.train", *args]
    assert words[-3:] == [f">>{tmp_path}/w/logs/process_{i}.log", "2>&1", "&"]
  assert not os.path.exists(tmp_path / "w"), "a dry run creates nothing"


@pytest.mark.parametrize("args, message", [
    (["-n", "0", "-d", "1", "--", "--workdir=x"], "-n NPROC"),
    (["-n", "2", "-d", "x", "--", "--workdir=x"], "-d DEVICES_PER_PROC"),
    (["-n", "2", "-d", "1", "--", "--config=c.py"], "--logdir"),
    (["-n", "2", "-d", "1"], "no train arguments"),
    (["-n", "2", "-d", "1", "--config=c.py"], "unknown option"),
])
def test_launcher_usage_errors(args, message):
  proc = subprocess.run([LOCAL_SH, *args], cwd=REPO, capture_output=True, text=True, timeout=30)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr


_FAKE_TRAIN = """#!/usr/bin/env bash
# Stands in for `python -m siglip_jax.train`: reports signals, fails on request.
trap 'echo "got TERM"; kill $sleeper 2>/dev/null; exit 0' TERM
trap 'echo "got INT"; kill $sleeper 2>/dev/null; exit 0' INT
echo "started $SIGLIP_JAX_PROCESS_ID of $SIGLIP_JAX_NUM_PROCESSES"
if [[ "${FAIL_PROCESS:-}" == "$SIGLIP_JAX_PROCESS_ID" ]]; then sleep 2; echo boom; exit 3; fi
sleep 60 & sleeper=$!
wait $sleeper
"""


def _fake_launch(tmp_path, extra_env=None, nproc=2):
  fake = tmp_path / "fake_python"
  fake.write_text(_FAKE_TRAIN)
  fake.chmod(0o755)
  env = cli_env(devices=1, PYTHON=str(fake), SIGLIP_JAX_KILL_GRACE=5, **(extra_env or {}))
  logdir = tmp_path / "logs"
  proc = subprocess.Popen([LOCAL_SH, "-n", str(nproc), "-d", "1", "--port", "1", "--logdir",
                           str(logdir), "--", "--workdir=unused"], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return proc, logdir


def _log(logdir, i):
  path = logdir / f"process_{i}.log"
  return path.read_text() if path.exists() else ""


def _wait_for(predicate, timeout=20):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.1)
  return False


def test_launcher_stops_the_others_when_a_process_fails(tmp_path):
  t0 = time.monotonic()
  proc, logdir = _fake_launch(tmp_path, {"FAIL_PROCESS": 1})
  out, err = proc.communicate(timeout=30)
  assert proc.returncode == 3, err
  assert time.monotonic() - t0 < 20
  assert "process 1 exited with status 3" in err and "boom" in err   # the failing log's tail
  assert "got TERM" in _log(logdir, 0)                                # the other was stopped
  assert "started 0 of 2" in out                                      # process 0 echoed


@pytest.mark.parametrize("sig, name", [(signal.SIGTERM, "TERM"), (signal.SIGINT, "INT"),
                                       (signal.SIGHUP, "TERM")])
def test_launcher_forwards_signals(tmp_path, sig, name):
  proc, logdir = _fake_launch(tmp_path)
  try:
    assert _wait_for(lambda: all("started" in _log(logdir, i) for i in (0, 1)))
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err
  for i in (0, 1):
    assert f"got {name}" in _log(logdir, i)


def test_a_signal_while_the_processes_start_reaches_every_one(tmp_path):
  """SIGTERM as soon as the first process runs, while the launcher still starts the others:
  each of them gets it (a signal handled mid-launch used to reach only those started so far,
  and the rest ran on: the launcher then waited for them)."""
  nproc = 8
  proc, logdir = _fake_launch(tmp_path, nproc=nproc)
  try:
    assert _wait_for(lambda: "started" in _log(logdir, 0), timeout=20)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  # Every process got it: one that was running handled it; one still starting was ended by it
  # (status 143, reported by the launcher) before it could; none ran on (30 s < its 60 s).
  assert proc.returncode in (0, 143), err
  logs = [_log(logdir, i) for i in range(nproc)]
  assert all("got TERM" in log for log in logs if "started" in log), logs
