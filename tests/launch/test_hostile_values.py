"""Hostile values through the launchers. Every train argument and environment setting reaches
the process that uses it byte for byte: through the remote shell for TPU VMs (a stand-in
gcloud runs each --command in bash, as sshd does), through srun's argv and output pattern for
SLURM, through the processes local.sh starts, and through the YAML and Kubernetes' own $(VAR)
expansion for k8s. Nothing in a value is ever executed, and a value that cannot be represented
is refused with one error line naming it."""
import importlib.util
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

_spec = importlib.util.spec_from_file_location(
    "_siglip_tests_conftest", os.path.join(os.path.dirname(__file__), "..", "conftest.py"))
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)
REPO = _conftest.REPO

# One of each class that a shell or YAML treats specially. PWN is replaced by a folder that
# must stay empty: each payload creates a file there if it ever runs.
HOSTILE = ["two words", "it's", 'say "hi"', "back\\slash", "$(touch PWN/dollar_paren)",
           "${HOME}", "`touch PWN/backtick`", "a; touch PWN/semicolon", "x && touch PWN/and",
           "> PWN/redirect", "line1\nline2", "*", "[ab]?", "~", "{a,b}", "tab\there", "",
           " lead", "-n", "$$", "!", "#", "é 😀"]
# What YAML and Kubernetes read specially on top.
HOSTILE_K8S = HOSTILE + [
    "$(JAX_COORDINATOR_PORT)", "$$(X)", "${IMAGE}", "${TRAIN_ARGS}", "# no comment", "k: v",
    "- item", "[a, b]", "{a: b}", "&anchor", "*alias", "!tag", "%YAML", "@at", "null", "true",
    "010", "\x01\x1f\x7f", "\r\n", "nel\x85 ls\u2028 ps\u2029 bom\ufeff \ufffe\uffff \x9f",
    "\\u0041", "trailing "]


def _hostile(values, pwn):
  return [v.replace("PWN", str(pwn)) for v in values]


def _pwn_dir(tmp_path):
  pwn = tmp_path / "pwned"
  pwn.mkdir()
  return pwn


def _env(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "TPU_", "SIGLIP_JAX_", "KUBERNETES_"))}
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _bash(script, args, env, timeout=60, cwd=REPO):
  return subprocess.run(["bash", os.path.join(REPO, script), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _executable(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(textwrap.dedent(text))
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


def _recorder(path, record):
  """A stand-in interpreter that appends its argv, folder and environment to `record`."""
  return _executable(path, f"""\
      #!{sys.executable}
      import json, os, sys
      with open({str(record)!r}, "a") as f:
        f.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}})
                + "\\n")
      """)


def _records(record):
  return [json.loads(line) for line in open(record)]


def _refused(proc, name):
  """One `error:` line naming `name`, status 2."""
  assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "error:" in lines[0] and name in lines[0], proc.stderr


# ------------------------------------------------------------------------------------ TPU VM

EXEC_GCLOUD = """\
    #!{python}
    # Stand-in for gcloud on an ACTIVE slice of one worker whose home folder is {home!r}:
    # `tpu-vm ssh --command=C` runs C in bash there (what sshd does: $SHELL -c C), with stand-in
    # git and sudo first on PATH; `tpu-vm scp` copies the file into that home.
    import os, shutil, subprocess, sys
    home, stubs = {home!r}, {stubs!r}
    args = sys.argv[1:]
    if args[2:4] == ["queued-resources", "describe"]:
      print("ACTIVE")
    elif args[2:4] == ["tpu-vm", "scp"]:
      shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
    elif args[2:4] == ["tpu-vm", "ssh"]:
      [command] = [a[len("--command="):] for a in args if a.startswith("--command=")]
      out = [a[len("--output-directory="):] for a in args if a.startswith("--output-directory=")]
      log = open(os.path.join(out[0], "0.log"), "w") if out else None
      env = dict(os.environ, HOME=home, PATH=stubs + os.pathsep + os.environ["PATH"])
      sys.exit(subprocess.run(["bash", "-c", command], cwd=home, env=env, stdout=log).returncode)
    """

GIT_STUB = """\
    #!{python}
    # Stand-in for git on the worker: records its argv; `clone` makes the target folder.
    import json, os, sys
    open({calls!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")
    if "clone" in sys.argv:
      os.makedirs(sys.argv[-1])
    """


@pytest.mark.parametrize("ship", ["git", "copy"])
def test_tpu_values_reach_the_workers_literally(tmp_path, ship):
  """REMOTE_DIR, REPO_URL, GIT_REF, REMOTE_ENV, REMOTE_PYTHON and every train argument pass
  the remote shell unchanged; none of their payloads runs."""
  pwn = _pwn_dir(tmp_path)
  home, stubs = tmp_path / "home", tmp_path / "stubs"
  home.mkdir()
  _executable(stubs / "git", GIT_STUB.format(python=sys.executable,
                                             calls=str(tmp_path / "git_calls")))
  _executable(stubs / "sudo", "#!/bin/sh\nexit 0\n")
  gcloud = _executable(tmp_path / "gcloud", EXEC_GCLOUD.format(
      python=sys.executable, home=str(home), stubs=str(stubs)))
  python = _recorder(tmp_path / "py bin's ;*" / "python", tmp_path / "record")
  remote_dir = _hostile(["code dir/it's \"q\" $(touch PWN/dir) `touch PWN/dir2`; *\nx"], pwn)[0]
  repo_url = _hostile(["https://h/r.git?a=1&b=$(touch PWN/url) 'x'"], pwn)[0]
  git_ref = _hostile(["v1 $(touch PWN/ref);`x`'\""], pwn)[0]
  remote_env = _hostile(["XLA_FLAGS='--a=$(touch PWN/env) --b=*' OTHER=\"it's ;`x`\""], pwn)[0]
  train = ["--config=configs/demo.py", "--workdir=gs://b/r", *_hostile(HOSTILE, pwn)]
  env = _env(TPU_NAME="sig", ZONE="z", ACCELERATOR_TYPE="v5litepod-8", SHIP=ship,
             REPO_URL=repo_url, GIT_REF=git_ref, REMOTE_DIR=remote_dir, REMOTE_ENV=remote_env,
             REMOTE_PYTHON=python, SETUP_CMD="true", GCLOUD=gcloud, POLL_SECONDS=0,
             LOG_DIR=tmp_path / "logs")
  proc = _bash("launch/tpu_vm.sh", ["--", *train], env)
  assert proc.returncode == 0, proc.stderr
  [run] = _records(tmp_path / "record")
  assert run["argv"] == ["-m", "siglip_jax.train", *train]
  assert run["cwd"] == str(home / remote_dir)
  assert run["env"]["XLA_FLAGS"] == f"--a=$(touch {pwn}/env) --b=*"
  assert run["env"]["OTHER"] == "it's ;`x`" and run["env"]["PYTHONUNBUFFERED"] == "1"
  if ship == "git":
    clone, checkout = [json.loads(l) for l in open(tmp_path / "git_calls")]
    assert clone[0] == "clone" and clone[-2:] == [repo_url, remote_dir]
    assert checkout[:2] == ["-C", remote_dir] and checkout[-1] == git_ref
  else:
    assert (home / remote_dir / "launch" / "tpu_vm.sh").exists()
  assert os.listdir(pwn) == []


@pytest.mark.parametrize("name,value", [
    ("REMOTE_DIR", "/"), ("REMOTE_DIR", "../elsewhere"), ("REMOTE_DIR", "a/../../b"),
    ("REMOTE_DIR", "."), ("GIT_REF", "--upload-pack=touch PWN/x"), ("TPU_NAME", "--project=x"),
    ("QR_NAME", "a b"), ("MAX_RESTARTS", "a[$(touch PWN/x)]"), ("POLL_SECONDS", "1; touch x"),
    ("REMOTE_ENV", "no_assignment"), ("REMOTE_ENV", "A='unterminated"), ("REMOTE_ENV", "1A=x"),
    ("REMOTE_PYTHON", "X=1"), ("REMOTE_PYTHON", "-i")])
def test_tpu_refuses_what_it_cannot_pass_safely(tmp_path, name, value):
  pwn = _pwn_dir(tmp_path)
  env = _env(TPU_NAME="sig", ZONE="z", ACCELERATOR_TYPE="v4-8", SHIP="git", REPO_URL="u")
  env[name] = value.replace("PWN", str(pwn))
  _refused(_bash("launch/tpu_vm.sh", ["--dry-run", "--", "--workdir=gs://b/r"], env), name)
  assert os.listdir(pwn) == []


# ------------------------------------------------------------------------------------- SLURM

SRUN_STUB = """\
    #!{python}
    # Stand-in for srun: records its options, then runs the task command as srun does (exec,
    # no shell) in --chdir.
    import json, os, sys
    args, opts = sys.argv[1:], {{}}
    while args[0].startswith("--"):
      key, _, value = args.pop(0)[2:].partition("=")
      opts[key] = value
    open({opts!r}, "w").write(json.dumps(opts))
    os.chdir(opts["chdir"])
    os.execv(args[0], args)
    """


def _srun_filename(pattern, job, task):
  """srun's --output filename pattern (man srun, "filename pattern"): a backslash anywhere turns
  substitution off; otherwise %% is a %, and %<digits><letter> is replaced (%t: task rank)."""
  import re
  if "\\" in pattern:
    return pattern.replace("\\", "")
  values = {"t": str(task), "j": str(job), "%": "%"}
  return re.sub(r"%(\d*)([%AabjJNnstux])", lambda m: values.get(m[2], f"<{m[2]}>"), pattern)


def test_slurm_values_reach_the_tasks_literally(tmp_path):
  pwn = _pwn_dir(tmp_path)
  stubs = tmp_path / "bin"
  _executable(stubs / "srun", SRUN_STUB.format(python=sys.executable,
                                               opts=str(tmp_path / "opts")))
  python = _recorder(tmp_path / "py bin's ;*" / "python", tmp_path / "record")
  logs = tmp_path / "logs 100%j %t it's"
  train = ["--config=configs/demo.py", "--workdir=/w", *_hostile(HOSTILE, pwn)]
  env = _env(PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=77,
             PYTHON=python, LOG_DIR=logs, GPUS_PER_NODE=1, REPO_DIR=tmp_path)
  proc = _bash("launch/slurm.sbatch", train, env)
  assert proc.returncode == 0, proc.stderr
  [run] = _records(tmp_path / "record")
  assert run["argv"] == ["-m", "siglip_jax.train", *train] and run["cwd"] == str(tmp_path)
  opts = json.load(open(tmp_path / "opts"))
  assert _srun_filename(opts["output"], 77, 3) == f"{logs}/77/task_3.log"
  assert os.listdir(pwn) == []


@pytest.mark.parametrize("name,value", [
    ("MAX_REQUEUES", "x[$(touch PWN/x)]"), ("SLURM_RESTART_COUNT", "a[$(touch PWN/x)]"),
    ("LOG_DIR", "logs\\dir"), ("GPUS_PER_NODE", "8\n9"), ("PYTHON", "--export=NONE")])
def test_slurm_refuses_what_it_cannot_pass_safely(tmp_path, name, value):
  pwn = _pwn_dir(tmp_path)
  env = _env(**{name: value.replace("PWN", str(pwn))})
  _refused(_bash("launch/slurm.sbatch", ["--dry-run", "--workdir=/w"], env), name)
  assert os.listdir(pwn) == []


# ------------------------------------------------------------------------------------- local

def test_local_values_reach_the_processes_literally(tmp_path):
  """Train arguments and XLA_FLAGS words reach each process unchanged: a glob in a flag is not
  matched against the files of the current folder."""
  pwn = _pwn_dir(tmp_path)
  (tmp_path / "--xla_dump_to=dump_here").touch()  # what the glob below would match
  python = _recorder(tmp_path / "py bin's ;*" / "python", tmp_path / "record")
  train = ["--config=configs/demo.py", *_hostile(HOSTILE, pwn)]
  flags = "--xla_dump_to=dump* --xla_dump_hlo_pass_re=.*"
  env = _env(PYTHON=python, XLA_FLAGS=flags)
  proc = _bash("launch/local.sh", ["-n", "1", "-d", "2", "--port", "1", "--logdir",
                                   str(tmp_path / "logs it's"), "--", *train], env, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  [run] = _records(tmp_path / "record")
  assert run["argv"] == ["-m", "siglip_jax.train", *train] and run["cwd"] == str(tmp_path)
  assert run["env"]["XLA_FLAGS"] == f"{flags} --xla_force_host_platform_device_count=2"
  assert os.listdir(pwn) == []


@pytest.mark.parametrize("value", ["X=1", "-i"])
def test_local_refuses_a_python_env_would_misread(value):
  proc = _bash("launch/local.sh", ["-n", "1", "-d", "1", "--port", "1", "--dry-run", "--",
                                   "--workdir=/w"], _env(PYTHON=value))
  _refused(proc, "PYTHON")


# ---------------------------------------------------------------------------------- Kubernetes

def _k8s_expand(text, env):
  """Kubernetes' expansion of a container's command and args (third_party/forked/golang/
  expansion in kubernetes): $$ is a $, $(NAME) is NAME's value when the container defines it
  and kept as written otherwise, any other $ is kept."""
  out, i = [], 0
  while i < len(text):
    if text[i] == "$" and i + 1 < len(text):
      if text[i + 1] == "$":
        out.append("$")
        i += 2
        continue
      if text[i + 1] == "(" and ")" in text[i + 2:]:
        j = text.index(")", i + 2)
        name = text[i + 2:j]
        out.append(env.get(name, f"$({name})"))
        i = j + 1
        continue
      out.append(text[i:i + 2])
      i += 2
      continue
    out.append(text[i])
    i += 1
  return "".join(out)


def _render(kind, args, **extra):
  env = _env(**{"IMAGE": "ghcr.io/me/siglip_jax:1", "NAME": "b16", "NAMESPACE": "ml", **extra})
  return subprocess.run(["bash", os.path.join(REPO, "launch/k8s/render.sh"), kind, "--dry-run",
                         "--", *args], cwd=REPO, env=env, capture_output=True, timeout=60)


@pytest.mark.parametrize("kind", ["gpu", "tpu"])
def test_k8s_values_reach_the_container_literally(tmp_path, kind):
  """The rendered YAML, parsed by a YAML parser and expanded as the kubelet expands args, gives
  the training process exactly the train arguments; image and service account are kept."""
  yaml = pytest.importorskip("yaml")
  train = ["--config=configs/demo.py", *_hostile(HOSTILE_K8S, tmp_path)]
  image = 'reg/img:1" \n  evil: ${NAME} $(JAX_COORDINATOR_PORT)'
  account = "sa@p.iam\"\n x: ${TRAIN_ARGS}\\"
  proc = _render(kind, train, IMAGE=image, GCP_SERVICE_ACCOUNT=account)
  assert proc.returncode == 0, proc.stderr.decode()
  docs = {d["kind"]: d for d in yaml.safe_load_all(proc.stdout.decode())}
  assert sorted(docs) == ["JobSet", "Role", "RoleBinding", "Service", "ServiceAccount"]
  job = docs["JobSet"]["spec"]["replicatedJobs"][0]["template"]["spec"]
  [container] = job["template"]["spec"]["containers"]
  env = {e["name"]: e["value"] for e in container.get("env", [])}
  assert [_k8s_expand(a, env) for a in container["args"]] == train
  assert container["image"] == image
  annotations = docs["ServiceAccount"]["metadata"]["annotations"]
  assert annotations["iam.gke.io/gcp-service-account"] == account


@pytest.mark.parametrize("name,value", [
    ("NAMESPACE", "ml\nevil: 1"), ("NAMESPACE", "Ml"), ("TPU_TOPOLOGY", '4x4"'),
    ("TPU_ACCELERATOR", "a\nb: c"), ("MAX_RESTARTS", "010"), ("NAME", "a\nb"),
    ("train argument 2", b"--config.x=\xff\xfe"), ("IMAGE", b"img\xff")])
def test_k8s_refuses_what_it_cannot_represent(name, value):
  args = ["--config=configs/demo.py", "--workdir=gs://b/r"]
  env = {}
  if name.startswith("train argument"):
    args[1] = value
  else:
    env[name] = value
  env = {k: os.fsdecode(v) if isinstance(v, bytes) else v for k, v in env.items()}
  proc = _render("tpu", args, **env)
  proc.stderr = proc.stderr.decode(errors="replace")
  _refused(proc, name)
