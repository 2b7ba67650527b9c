"""Joins `jax.distributed` from the environment, once, before anything touches a device.

- Explicit (localhost, tests, `launch/local.sh`): SIGLIP_JAX_COORDINATOR=host:port,
  SIGLIP_JAX_NUM_PROCESSES, SIGLIP_JAX_PROCESS_ID (optionally SIGLIP_JAX_LOCAL_DEVICES).
- Clusters: JAX's own auto-detection (TPU pod metadata, SLURM_* variables, Kubernetes/GKE
  JobSet env), used when one of them is present.
- Otherwise a single process: nothing to join.
On CPU the cross-process collectives need gloo; a process that cannot reach the coordinator
fails within SIGLIP_JAX_INIT_TIMEOUT seconds (default 120) instead of hanging.
"""
import os

import jax

_CLUSTER_HINTS = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                  "JOBSET_NAME", "JAX_COORDINATOR_ADDRESS")


def _int_env(name):
  value = os.environ.get(name)
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def explicit_settings(env=os.environ):
  if "SIGLIP_JAX_COORDINATOR" not in env:
    return None
  return dict(coordinator_address=env["SIGLIP_JAX_COORDINATOR"],
              num_processes=_int_env("SIGLIP_JAX_NUM_PROCESSES"),
              process_id=_int_env("SIGLIP_JAX_PROCESS_ID"))


def initialize():
  """Joins the job if the environment describes one; returns the process count."""
  if jax.distributed.is_initialized():
    return jax.process_count()
  settings = explicit_settings()
  cluster = any(k in os.environ for k in _CLUSTER_HINTS)
  if settings is None and not cluster:
    return 1
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or settings is not None:
    # CPU devices talk across processes through gloo (the default is none).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeout = int(os.environ.get("SIGLIP_JAX_INIT_TIMEOUT", "120"))
  kwargs = dict(settings or {}, initialization_timeout=timeout)
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # name what failed; the raw error is a long gRPC message
    where = kwargs.get("coordinator_address", "auto-detected")
    raise RuntimeError(f"could not join the distributed job (coordinator {where}, "
                       f"timeout {timeout}s): {str(e).splitlines()[0] if str(e) else e!r}") from e
  return jax.process_count()
