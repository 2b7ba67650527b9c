"""What every entry point shares: flags and user mistakes as one `error:` line, exit status 2.

`run(main)` is `absl.app.run` with a flag parser that turns a bad flag, a config file that does
not load and an override of a config key that does not exist (`--config.input.batchsize=8`:
named with the nearest existing key) into one line. Inside `main`, `user_errors()` does the
same for `errors.UserError` and for the operating system's answers a user can act on (disk
full, read-only or missing folders, a file where a folder should be). Anything else is a bug
and keeps its traceback.
"""
import contextlib
import errno
import importlib.util
import logging
import os
import sys
import warnings

from absl import app, flags

EXIT_USER_ERROR = 2
# OS errors that describe the user's environment, not a bug.
_USER_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.ENOTDIR: "not a folder",
                errno.EISDIR: "is a folder", errno.ENOENT: "no such file or folder",
                errno.EEXIST: "already exists", errno.ENAMETOOLONG: "name too long"}


def fail(message):
  """Prints `error: message` as one line on stderr and exits with status 2."""
  print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def describe_os_error(e):
  """'what happened: path' for an OSError a user can act on, else None."""
  what = _USER_ERRNOS.get(getattr(e, "errno", None))
  if what is None:
    return None
  where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
  return f"{what}{': ' + where if where else ''}"


def _os_error_in(e):
  """The OSError an exception is, or was raised from (orbax wraps its writers' errors)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and describe_os_error(e):
      return e
    if "No space left on device" in str(e):
      return OSError(errno.ENOSPC, "No space left on device")
    e = e.__cause__ or e.__context__
  return None


@contextlib.contextmanager
def user_errors(*extra):
  """Turns user mistakes raised inside into one `error:` line (see the module docstring)."""
  from siglip_jax import errors
  try:
    yield
  except (errors.UserError, *extra) as e:
    fail(e)
  except Exception as e:  # pylint: disable=broad-except
    os_error = _os_error_in(e)
    if os_error is None:
      raise
    fail(describe_os_error(os_error))


def run(main):
  """`absl.app.run(main)` with flag and config-override errors as one line."""
  def main_without_user_tracebacks(argv):
    for handler in logging.getLogger().handlers:
      handler.addFilter(_drop_user_error_tracebacks)
    warnings.showwarning = _show_warning
    return main(argv)
  app.run(main_without_user_tracebacks, flags_parser=_parse_flags)


def _show_warning(message, category, filename, lineno, file=None, line=None):
  """Our own warnings (what an export will not do) as one `warning:` line; others as Python
  shows them."""
  del line
  if filename.startswith(os.path.dirname(os.path.abspath(__file__))):
    print("warning: " + " ".join(str(message).split()), file=file or sys.stderr, flush=True)
  else:
    print(warnings.formatwarning(message, category, filename, lineno).rstrip(),
          file=file or sys.stderr, flush=True)


def _drop_user_error_tracebacks(record):
  """Libraries log their background threads' failures with a traceback (orbax's async saves on
  a full disk); for a user-fixable OS error the message is enough. Keeps every record."""
  exc = record.exc_info[1] if record.exc_info else None
  if exc is not None and _os_error_in(exc) is not None:
    record.exc_info, record.exc_text = None, None
  return True


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    fail(_config_override_problem(argv) or f"{_first_line(e)}")


def _first_line(e):
  text = str(e).strip()
  if isinstance(e, KeyError) and len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    text = text[1:-1].replace("\\n", "\n")   # KeyError's repr of its message
  return text.splitlines()[0] if text else type(e).__name__


# ------------------------------------------------------------------ config overrides

def _config_file_arg(argv):
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a[len("--config="):]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _overrides(argv):
  for a in argv:
    if a.startswith("--config.") and len(a) > len("--config."):
      yield a[len("--config."):].partition("=")[0]


def load_config_file(spec):
  """`path[:arg]` -> the config its `get_config` returns (ml_collections' convention)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  if module_spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"--config={spec}: no such config file")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _has_key(node, dotted):
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def _config_override_problem(argv):
  """The message for a failed parse caused by the config file or an override, or None."""
  spec = _config_file_arg(argv)
  if spec is None:
    return None
  try:
    config = load_config_file(spec)
  except Exception as e:  # pylint: disable=broad-except
    return f"--config={spec} does not load: {type(e).__name__}: {_first_line(e)}"
  from siglip_jax import config_defaults
  for key in _overrides(argv):
    if not _has_key(config, key):
      known = config_defaults.known_keys() | set(config_defaults.dotted_keys(config))
      near = config_defaults.nearest(key, known)
      return f"config key `{key}` is unknown" + (f"; did you mean `{near}`?" if near else "")
  return None
