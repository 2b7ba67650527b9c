"""Joins `jax.distributed` from the environment, once, before anything touches a device.

- Explicit (localhost, tests, `launch/local.sh`): SIGLIP_JAX_COORDINATOR=host:port,
  SIGLIP_JAX_NUM_PROCESSES, SIGLIP_JAX_PROCESS_ID; optionally SIGLIP_JAX_LOCAL_DEVICES
  (comma-separated local device ids this process uses, for GPUs).
- Clusters: `jax.distributed.initialize()`'s own auto-detection (Cloud TPU VMs and GKE TPU,
  SLURM under `srun`, Open MPI, Kubernetes JobSets), called when the environment shows a cluster
  (`CLUSTER_HINTS`: variables each of those sets). SIGLIP_JAX_CLUSTER=NAME passes one detector
  to JAX (`slurm`, `ompi`, `gcetpu`, `gketpu`, `k8s`, `mpi4py`), SIGLIP_JAX_CLUSTER=auto asks
  JAX to detect whatever the environment, SIGLIP_JAX_CLUSTER=none runs a single process.
- Otherwise a single process: nothing to join.
On CPU the cross-process collectives need gloo. A process that cannot join (coordinator down or
unreachable, a peer missing) stops within SIGLIP_JAX_INIT_TIMEOUT seconds (default 300, JAX's)
with one `error: ...` line, instead of hanging or aborting with a gRPC stack trace.
"""
import os
import socket
import sys
import threading

import jax

from siglip_jax import errors

DEFAULT_TIMEOUT = 300
# JAX's detection methods (`cluster_detection_method`), and environment variables that show one
# of them is around: JAX itself is then asked to read the job layout.
DETECTORS = ("slurm", "ompi", "mpi4py", "gcetpu", "gketpu", "k8s")
CLUSTER_HINTS = {
    "SLURM_STEP_NODELIST": "slurm",        # a task started by srun
    "OMPI_MCA_orte_hnp_uri": "ompi", "OMPI_COMM_WORLD_SIZE": "ompi",
    "TPU_WORKER_HOSTNAMES": "tpu", "MEGASCALE_COORDINATOR_ADDRESS": "tpu",
    "TPU_WORKER_ID": "tpu",
    "JOBSET_NAME": "k8s",
}
# JAX's own deadline comes this much after ours, so the clear message wins the race.
_JAX_DEADLINE_SLACK = 15


class DistributedError(errors.UserError, RuntimeError):
  """The environment describes a job this process cannot join; the message says why."""


def _int_env(env, name):
  value = env.get(name)
  try:
    return int(value)
  except (TypeError, ValueError):
    raise DistributedError(f"environment variable {name}={value!r} must be an integer "
                           "(SIGLIP_JAX_COORDINATOR is set, so it is needed)") from None


def explicit_settings(env=os.environ):
  """The SIGLIP_JAX_* job description, or None when SIGLIP_JAX_COORDINATOR is unset."""
  if not env.get("SIGLIP_JAX_COORDINATOR"):
    return None
  address = env["SIGLIP_JAX_COORDINATOR"]
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedError(f"SIGLIP_JAX_COORDINATOR={address!r} must be host:port")
  num = _int_env(env, "SIGLIP_JAX_NUM_PROCESSES")
  pid = _int_env(env, "SIGLIP_JAX_PROCESS_ID")
  if num < 1 or not 0 <= pid < num:
    raise DistributedError(f"SIGLIP_JAX_PROCESS_ID={pid} must be in [0, "
                           f"SIGLIP_JAX_NUM_PROCESSES={num})")
  settings = dict(coordinator_address=address, num_processes=num, process_id=pid)
  local = env.get("SIGLIP_JAX_LOCAL_DEVICES", "").strip()
  if local:
    try:
      settings["local_device_ids"] = [int(x) for x in local.split(",")]
    except ValueError:
      raise DistributedError(f"SIGLIP_JAX_LOCAL_DEVICES={local!r} must be comma-separated "
                             "integers") from None
  return settings


def detect_cluster(env=os.environ):
  """What to ask JAX to join: a detector name, "auto" (JAX detects), or None (single process)."""
  choice = env.get("SIGLIP_JAX_CLUSTER", "auto").strip().lower() or "auto"
  if choice == "none":
    return None
  if choice != "auto":
    if choice not in DETECTORS:
      raise DistributedError(f"SIGLIP_JAX_CLUSTER={choice!r} is unknown; use auto, none or "
                             f"one of {', '.join(DETECTORS)}")
    return choice
  if "SIGLIP_JAX_CLUSTER" in env:   # said explicitly: JAX's detection, whatever the hints
    return "auto"
  return "auto" if any(k in env for k in CLUSTER_HINTS) or os.path.exists("/dev/accel0") else None


def _first_line(e):
  text = str(e).strip()
  return text.splitlines()[0] if text else repr(e)


def _probe(address, timeout=1.0):
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  try:
    with socket.create_connection((host, int(port)), timeout=timeout):
      return True
  except (OSError, ValueError):
    return False


def _join_failure_message(settings, timeout):
  if "coordinator_address" not in settings:
    what = settings.get("cluster_detection_method", "auto-detected")
    return (f"could not join the distributed job the environment describes ({what}) within "
            f"{timeout}s: did every process start? (SIGLIP_JAX_INIT_TIMEOUT sets the wait; "
            "SIGLIP_JAX_CLUSTER=none runs a single process)")
  address, num, pid = (settings["coordinator_address"], settings["num_processes"],
                       settings["process_id"])
  if pid == 0:
    why = (f"this process runs the coordinator at {address}, but not all {num} processes "
           "joined it (did the others start, with the same SIGLIP_JAX_COORDINATOR?)")
  elif _probe(address):
    why = (f"the coordinator at {address} answers, but not all {num} processes joined it "
           "(did every process start, with the same process count?)")
  else:
    why = (f"nothing answers at the coordinator address {address}: is process 0 running, and "
           "is that address reachable from this host?")
  return (f"process {pid} of {num} could not join the distributed job within {timeout}s: "
          f"{why} (SIGLIP_JAX_INIT_TIMEOUT sets the wait)")


def _init_timeout(env):
  raw = env.get("SIGLIP_JAX_INIT_TIMEOUT", str(DEFAULT_TIMEOUT))
  try:
    timeout = int(float(raw))
  except ValueError:
    raise DistributedError(f"SIGLIP_JAX_INIT_TIMEOUT={raw!r} must be a number of seconds") \
        from None
  if timeout <= 0:
    raise DistributedError(f"SIGLIP_JAX_INIT_TIMEOUT={raw!r} must be positive")
  return timeout


def initialize(env=None):
  """Joins the job if the environment describes one; returns the process count.

  Call before anything touches a device. Raises DistributedError for a bad job description; a
  join that does not complete within SIGLIP_JAX_INIT_TIMEOUT seconds prints one `error: ...`
  line to stderr and exits the process with status 1 (the join is a blocking native call that
  Python cannot interrupt, and JAX's own deadline aborts with a core dump).
  """
  env = os.environ if env is None else env
  if jax.distributed.is_initialized():
    return jax.process_count()
  settings = explicit_settings(env)
  cluster = None if settings is not None else detect_cluster(env)
  if settings is None and cluster is None:
    return 1
  timeout = _init_timeout(env)
  explicit = settings is not None
  if not explicit:
    settings = {} if cluster == "auto" else dict(cluster_detection_method=cluster)
  if explicit or env.get("JAX_PLATFORMS", "").startswith("cpu"):
    # CPU devices talk across processes through gloo (the default is none).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

  # The join is a blocking native call that Python cannot interrupt, and JAX's own deadline
  # aborts with a core dump: a timer says what went wrong first.
  def give_up():
    print(f"error: {_join_failure_message(settings, timeout)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(**settings,
                               initialization_timeout=timeout + _JAX_DEADLINE_SLACK)
  except Exception as e:  # name what failed; the raw error is a long gRPC message
    where = settings.get("coordinator_address", "auto-detected")
    raise DistributedError(f"could not join the distributed job (coordinator {where}, "
                           f"timeout {timeout}s): {_first_line(e)}") from e
  finally:
    watchdog.cancel()
  return jax.process_count()
