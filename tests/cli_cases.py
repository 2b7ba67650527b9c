"""Runs many CLI invocations cheaply: one Python process imports the heavy packages once, then
forks a child per invocation that runs the entry point exactly as `python -m MODULE ARGS` would
(`runpy` with `__main__`, its own argv, stdout and stderr), and reports each child's exit status
and output. The parent never starts a JAX backend, so forking it is safe."""
import json
import subprocess
import sys
import textwrap

from conftest import REPO, cli_env

_DRIVER = textwrap.dedent(r"""
    import json, os, runpy, sys, tempfile
    import jax, flax, optax, orbax.checkpoint, ml_collections, absl.app  # noqa: F401 (warm-up)
    import siglip_jax.trainer, siglip_jax.experiment, siglip_jax.interop.hf  # noqa: F401
    cases = json.load(sys.stdin)
    results = []
    for module, argv, cwd in cases:
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            os.chdir(cwd)
            sys.argv = [module] + argv
            code = 0
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, int) and e.code is not None:
                    print(e.code, file=sys.stderr)
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode("utf-8", "replace"))
        results.append({"rc": rc, "stdout": texts[0], "stderr": texts[1]})
    print(json.dumps(results))
""")


def run_cases(cases, *, devices=1, timeout=600, env=None):
  """`cases`: [(module, [args], cwd or None)] -> [{"rc", "stdout", "stderr"}], in order."""
  payload = json.dumps([(m, list(a), c or REPO) for m, a, c in cases])
  proc = subprocess.run([sys.executable, "-c", _DRIVER], input=payload, cwd=REPO,
                        env=env or cli_env(devices), capture_output=True, text=True,
                        timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f"CLI case driver failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def error_lines(result):
  return [l for l in (result["stdout"] + result["stderr"]).splitlines() if l.startswith("error:")]


def assert_one_line_error(result, *needles):
  """rc 2, exactly one `error:` line (holding each needle), no traceback anywhere."""
  text = result["stdout"] + result["stderr"]
  lines = error_lines(result)
  assert result["rc"] == 2, f"rc {result['rc']}:\n{text[-3000:]}"
  assert len(lines) == 1, f"{len(lines)} error lines:\n{text[-3000:]}"
  assert "Traceback" not in text, text[-3000:]
  for needle in needles:
    assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
  return lines[0]
