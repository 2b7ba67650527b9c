"""The cluster launchers: their dry runs, shellcheck, their real control flow against stand-in
gcloud / srun / scontrol programs, and a SLURM-shaped job that joins jax.distributed through
JAX's own SLURM auto-detection and trains 2 demo steps on localhost."""
import importlib.util
import json
import os
import random
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest

_spec = importlib.util.spec_from_file_location(
    "_siglip_tests_conftest", os.path.join(os.path.dirname(__file__), "..", "conftest.py"))
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)
REPO, TINY_DEMO, cli_env = _conftest.REPO, _conftest.TINY_DEMO, _conftest.cli_env

SCRIPTS = ["launch/tpu_vm.sh", "launch/slurm.sbatch", "launch/k8s/render.sh", "launch/local.sh"]
TRAIN = ["--config=configs/siglip_b16_224.py", "--workdir=gs://bucket/runs/b16",
         "--config.mesh=(('data', -1),)", "--config.input.batch_size=4096"]


def _bash(script, args, env, timeout=60, check=True):
  proc = subprocess.run(["bash", os.path.join(REPO, script), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc


def _clean_env(**extra):
  """This environment without SLURM/TPU/k8s variables a CI machine might carry."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "TPU_", "SIGLIP_JAX_", "KUBERNETES_"))}
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _commands(stdout):
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def _executable(path, text):
  path.write_text(textwrap.dedent(text))
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


@pytest.mark.parametrize("script", [s for s in SCRIPTS + ["benchmarks/gpu_run.sh"]
                                    if os.path.exists(os.path.join(REPO, s))])
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
  proc = subprocess.run(["shellcheck", "-x", script], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS[:3])
def test_header_lists_environment(script):
  text = open(os.path.join(REPO, script)).read()
  assert "Environment variables read:" in text and "--dry-run" in text


# ------------------------------------------------------------------------------------- SLURM

def test_slurm_dry_run_prints_srun():
  env = _clean_env(NNODES=2, GPUS_PER_NODE=4, PYTHON="/opt/py/bin/python", REPO_DIR="/code")
  out = _bash("launch/slurm.sbatch", ["--dry-run", *TRAIN], env).stdout
  [srun] = [c for c in _commands(out) if c[0] == "srun"]
  assert srun[:6] == ["srun", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
                      "--kill-on-bad-exit=1", "--cpu-bind=none"]
  assert "--chdir=/code" in srun and "--output=/code/logs/slurm/JOBID/task_%t.log" in srun
  i = srun.index("/opt/py/bin/python")
  assert srun[i:] == ["/opt/py/bin/python", "-m", "siglip_jax.train", *TRAIN]
  assert "scontrol requeue" in out


def test_slurm_header_requeues_on_sigterm():
  head = [l for l in open(os.path.join(REPO, "launch/slurm.sbatch")) if l.startswith("#SBATCH")]
  assert "#SBATCH --requeue\n" in head and "#SBATCH --signal=B:TERM@120\n" in head


def test_slurm_refuses_to_run_outside_slurm():
  proc = _bash("launch/slurm.sbatch", TRAIN, _clean_env(), check=False)
  assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr


def test_slurm_sigterm_passes_on_and_requeues(tmp_path):
  """SIGTERM to the batch script reaches srun (which forwards it to the tasks), then the job is
  requeued with scontrol."""
  bin_ = tmp_path / "bin"
  bin_.mkdir()
  _executable(bin_ / "srun", f"""\
      #!{sys.executable}
      import signal, sys, time
      open("{tmp_path}/srun_started", "w").close()
      def term(*_):
        open("{tmp_path}/srun_got_term", "w").close()
        sys.exit(0)
      signal.signal(signal.SIGTERM, term)
      time.sleep(60)
      """)
  _executable(bin_ / "scontrol", f"""\
      #!/bin/sh
      echo "$@" >> {tmp_path}/scontrol_calls
      """)
  env = _clean_env(PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=4242,
                   LOG_DIR=tmp_path / "logs", GPUS_PER_NODE=2)
  proc = subprocess.Popen(["bash", "launch/slurm.sbatch", *TRAIN], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 30
  while not (tmp_path / "srun_started").exists() and time.time() < deadline:
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 143, err
  assert (tmp_path / "srun_got_term").exists(), err
  assert (tmp_path / "scontrol_calls").read_text().split() == ["requeue", "4242"]


def _free_slurm_port():
  """A port in JAX's SLURM range [61440, 65535] that is free on both IPv4 and IPv6."""
  for _ in range(200):
    port = random.randint(61440, 65535)
    try:
      for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::")):
        with socket.socket(family) as s:
          s.bind((host, port))
      return port
    except OSError:
      continue
  pytest.skip("no free port in JAX's SLURM port range")


def test_jax_reads_the_slurm_variables(monkeypatch):
  """What JAX's SLURM detector derives, from exactly the variables the end-to-end test sets."""
  from jax._src.clusters import slurm_cluster
  for k, v in dict(SLURM_JOB_ID="28675", SLURM_STEP_NODELIST="node[003-004],gpu7",
                   SLURM_NTASKS="16", SLURM_PROCID="9", SLURM_LOCALID="1").items():
    monkeypatch.setenv(k, v)
  cluster = slurm_cluster.SlurmCluster
  assert cluster.is_env_present()
  # port = 61440 + job id mod 4096; host = the step's first node
  assert cluster.get_coordinator_address(None, None) == f"node003:{61440 + 28675 % 4096}"
  assert (cluster.get_process_count(), cluster.get_process_id(),
          cluster.get_local_process_id()) == (16, 9, 1)


def test_slurm_job_joins_through_jax_autodetection_and_trains(tmp_path):
  """launch/slurm.sbatch, run as SLURM would run it, with a stand-in srun that starts its tasks
  on this machine with the SLURM_* variables srun sets: two processes join jax.distributed
  through JAX's own SLURM auto-detection (coordinator localhost:61440 + job id % 4096) and
  train 2 demo steps."""
  port = _free_slurm_port()
  job_id = 7 * 4096 + (port - 61440)
  bin_ = tmp_path / "bin"
  bin_.mkdir()
  _executable(bin_ / "srun", f"""\
      #!{sys.executable}
      # Stand-in for srun on one node: --ntasks-per-node tasks with srun's per-task variables.
      import os, signal, subprocess, sys
      args, opts = sys.argv[1:], {{}}
      while args and args[0].startswith("--"):
        key, _, value = args.pop(0)[2:].partition("=")
        opts[key] = value
      n = int(opts["ntasks-per-node"]) * int(opts.get("nodes", 1))
      procs = []
      for task in range(n):
        env = dict(os.environ, SLURM_NTASKS=str(n), SLURM_PROCID=str(task),
                   SLURM_LOCALID=str(task), SLURM_NODEID="0", SLURM_STEP_ID="0",
                   SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES="1")
        log = open(opts["output"].replace("%t", str(task)), "a")
        procs.append(subprocess.Popen(args, cwd=opts["chdir"], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
      signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs])
      sys.exit(max(p.wait() for p in procs))
      """)
  workdir, logs = tmp_path / "workdir", tmp_path / "logs"
  env = cli_env(1, PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=job_id,
                SLURM_JOB_NUM_NODES=1, SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=REPO,
                GPUS_PER_NODE=2, PYTHON=sys.executable, LOG_DIR=logs,
                SIGLIP_JAX_INIT_TIMEOUT=120)
  env = {k: v for k, v in env.items() if not k.startswith(("TPU_", "KUBERNETES_"))}
  args = [*TINY_DEMO, "--config.total_steps=2", "--config.log_every_steps=1",
          f"--workdir={workdir}"]
  proc = subprocess.run(["bash", "launch/slurm.sbatch", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=400)
  task_logs = [(logs / str(job_id) / f"task_{t}.log") for t in range(2)]
  text = [p.read_text() if p.exists() else "" for p in task_logs]
  assert proc.returncode == 0, f"{proc.stderr}\n--- task 0\n{text[0][-3000:]}\n--- task 1\n" \
                               f"{text[1][-3000:]}"
  assert "2 devices x 2 processes" in text[0]
  steps = [json.loads(l)["step"] for l in open(workdir / "metrics.jsonl") if "train/loss" in l]
  assert steps == [1, 2]


# ------------------------------------------------------------------------------------ TPU VM

TPU_ENV = dict(TPU_NAME="sig-v5e", ZONE="us-west4-a", ACCELERATOR_TYPE="v5litepod-64", SPOT=1,
               PROJECT="proj", SHIP="git", REPO_URL="https://example.com/siglip_jax.git",
               GIT_REF="abc123")


def test_tpu_dry_run_prints_every_step():
  out = _bash("launch/tpu_vm.sh", ["--dry-run", "--", *TRAIN], _clean_env(**TPU_ENV)).stdout
  cmds = _commands(out)
  create = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "queued-resources",
                                         "create"]]
  assert create == [["gcloud", "compute", "tpus", "queued-resources", "create", "sig-v5e",
                     "--node-id=sig-v5e", "--accelerator-type=v5litepod-64",
                     "--runtime-version=v2-alpha-tpuv5-lite", "--zone=us-west4-a",
                     "--project=proj", "--spot"]]
  ssh = [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and "ssh" in c]
  assert all("--worker=all" in c for c in ssh) and len(ssh) == 4
  remote = [next(a[len("--command="):] for a in c if a.startswith("--command=")) for c in ssh]
  assert "git clone -q -- https://example.com/siglip_jax.git siglip_jax" in remote[0]
  assert "checkout -q abc123" in remote[0]
  assert "jax[tpu]" in remote[1]
  assert "lsof -t -w /dev/accel*" in remote[2] and "rm -f /tmp/libtpu_lockfile" in remote[2]
  train = shlex.split(remote[3])
  i = train.index("siglip_jax.train")
  assert train[i - 2:i] == [".venv/bin/python", "-m"] and train[i + 1:] == TRAIN
  assert "--output-directory=logs/tpu/sig-v5e/attempt_1" in ssh[3]
  assert any(c[4] == "delete" and "--force" in c for c in cmds if len(c) > 4)


def test_tpu_refuses_a_local_workdir():
  args = ["--dry-run", "--", "--config=configs/demo.py", "--workdir=/tmp/run"]
  proc = _bash("launch/tpu_vm.sh", args, _clean_env(**TPU_ENV), check=False)
  assert proc.returncode == 2 and "not gs://" in proc.stderr


FAKE_GCLOUD = """\
    #!{python}
    # Stand-in for gcloud: a queued resource whose state lives in a file; the first training
    # run is preempted (ssh cut, slice SUSPENDED), later ones exit with TRAIN_RC.
    import os, sys
    d = {tmp!r}
    state_file, calls = os.path.join(d, "state"), os.path.join(d, "calls")
    args = sys.argv[1:]
    open(calls, "a").write(" ".join(args[:5]) + "\\n")
    state = open(state_file).read() if os.path.exists(state_file) else "MISSING"
    if args[2:4] == ["queued-resources", "describe"]:
      if state == "MISSING":
        sys.exit(1)
      print(state)
    elif args[2:4] == ["queued-resources", "create"]:
      open(state_file, "w").write("ACTIVE")
    elif args[2:4] == ["queued-resources", "delete"]:
      os.remove(state_file)
    elif args[2:4] == ["tpu-vm", "ssh"]:
      out = [a.split("=", 1)[1] for a in args if a.startswith("--output-directory=")]
      if out:
        runs = len(os.listdir(os.path.dirname(out[0])))
        open(os.path.join(out[0], "0.log"), "w").write(f"run {{runs}}\\n")
        if runs == 1:
          open(state_file, "w").write("SUSPENDED")
          sys.exit(255)
        sys.exit(int(os.environ.get("TRAIN_RC", "0")))
    """


def _fake_gcloud(tmp_path):
  return _executable(tmp_path / "gcloud", FAKE_GCLOUD.format(python=sys.executable,
                                                             tmp=str(tmp_path)))


def test_tpu_resumes_after_preemption(tmp_path):
  gcloud = _fake_gcloud(tmp_path)
  env = _clean_env(**TPU_ENV, GCLOUD=gcloud, POLL_SECONDS=0, LOG_DIR=tmp_path / "logs")
  proc = _bash("launch/tpu_vm.sh", ["--", *TRAIN], env)
  calls = [line.split()[2:4] for line in (tmp_path / "calls").read_text().splitlines()]
  verbs = [c[1] for c in calls if c[1] in ("create", "delete")]
  assert verbs == ["create", "delete", "create"], calls      # recreated after the preemption
  for attempt in (1, 2):
    assert (tmp_path / f"logs/attempt_{attempt}/0.log").exists()
  assert "training completed (attempt 2)" in proc.stderr


def test_tpu_stops_on_a_real_failure(tmp_path):
  gcloud = _fake_gcloud(tmp_path)
  env = _clean_env(**TPU_ENV, GCLOUD=gcloud, POLL_SECONDS=0, LOG_DIR=tmp_path / "logs",
                   TRAIN_RC=3)
  proc = _bash("launch/tpu_vm.sh", ["--", *TRAIN], env, check=False)
  assert proc.returncode == 3 and "not a preemption" in proc.stderr
  assert not (tmp_path / "logs/attempt_3").exists()


# ---------------------------------------------------------------------------------- Kubernetes

def _render(kind, **extra):
  yaml = pytest.importorskip("yaml")
  env = _clean_env(IMAGE="ghcr.io/me/siglip_jax:1", NAME="b16", NAMESPACE="ml", **extra)
  out = _bash("launch/k8s/render.sh", [kind, "--dry-run", "--", *TRAIN], env).stdout
  assert "${" not in out
  return {d["kind"]: d for d in yaml.safe_load_all(out)}


def _pod(jobset):
  job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
  return job, job["template"]["spec"]


def test_k8s_gpu_jobset():
  docs = _render("gpu", NUM_NODES=4, GPUS_PER_NODE=8)
  job, pod = _pod(docs["JobSet"])
  assert (job["parallelism"], job["completions"], job["completionMode"]) == (4, 4, "Indexed")
  [c] = pod["containers"]
  assert c["command"] == ["python", "-m", "siglip_jax.train"] and c["args"] == TRAIN
  assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
  assert docs["JobSet"]["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": "b16"}
  # The headless service JAX's coordinator name resolves through, and the API reads its
  # Kubernetes auto-detection makes (pods and services: list; jobs: get).
  svc = docs["Service"]["spec"]
  assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
  assert svc["selector"] == {"jobset.sigs.k8s.io/jobset-name": "b16"}
  rules = {(g, r): set(rule["verbs"]) for rule in docs["Role"]["rules"]
           for g in rule["apiGroups"] for r in rule["resources"]}
  assert {"list"} <= rules[("", "pods")] and {"list"} <= rules[("", "services")]
  assert "get" in rules[("batch", "jobs")]
  assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"] == \
      docs["RoleBinding"]["subjects"][0]["name"]


def test_k8s_tpu_jobset():
  docs = _render("tpu", TPU_ACCELERATOR="tpu-v6e-slice", TPU_TOPOLOGY="4x4", NUM_HOSTS=4,
                 CHIPS_PER_HOST=4)
  job, pod = _pod(docs["JobSet"])
  assert job["parallelism"] == 4 and pod["nodeSelector"] == {
      "cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
      "cloud.google.com/gke-tpu-topology": "4x4"}
  assert pod["containers"][0]["resources"]["limits"]["google.com/tpu"] == 4
  assert pod["containers"][0]["args"] == TRAIN


def test_k8s_render_needs_an_image():
  proc = _bash("launch/k8s/render.sh", ["gpu", "--dry-run", "--", *TRAIN], _clean_env(),
               check=False)
  assert proc.returncode == 2 and "IMAGE" in proc.stderr
