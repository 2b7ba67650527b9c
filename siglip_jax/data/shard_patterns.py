"""Shard patterns as WebDataset and img2dataset write them -> the list of shard files.

    /data/cc12m/{00000..01242}.tar          brace range, zero padding kept
    /data/{laion,coyo}/*.tar                brace list, then a glob
    /data/a/*.tar,/data/b/{0..9}.tar        several patterns joined by ','
    gs://bucket/cc12m/{00000..01242}.tar    any URL scheme etils.epath reads (gs://, s3://, ...)

Braces are expanded by the `braceexpand` package (what WebDataset itself uses), then each result
is globbed (`*`, `?`, `[...]`): locally with `glob`, for a URL through `etils.epath` (see
`siglip_jax.paths`). A ',' inside braces belongs to a brace list; only a ',' outside all braces
separates patterns. Every pattern must match at least one file (else the error names it);
names a brace range lists that do not exist are warned about (a range with holes is how a crawl
with failed shards looks), never silently dropped.
"""
import glob as glob_lib
import logging
import os

from braceexpand import braceexpand

from etils import epath

from siglip_jax import paths

_log = logging.getLogger(__name__)
_GLOB_CHARS = frozenset("*?[")


def split_patterns(patterns):
  """'a/{x,y}.tar,b/*.tar' -> ['a/{x,y}.tar', 'b/*.tar']: splits at commas outside braces."""
  if not isinstance(patterns, str):
    return [p for part in patterns for p in split_patterns(part)]
  out, depth, start = [], 0, 0
  for i, ch in enumerate(patterns):
    if ch == "{":
      depth += 1
    elif ch == "}":
      depth = max(0, depth - 1)
    elif ch == "," and depth == 0:
      out.append(patterns[start:i])
      start = i + 1
  out.append(patterns[start:])
  return [p.strip() for p in out if p.strip()]


def _has_glob(name):
  return any(c in _GLOB_CHARS for c in name)


def _glob_local(pattern):
  pattern = os.path.expanduser(pattern)
  names = glob_lib.glob(pattern) if _has_glob(pattern) else [pattern]
  # Regular files only (os.path.isfile follows symlinks): never a FIFO or a device.
  return [os.path.abspath(p) for p in names if os.path.isfile(p)]


class _RemoteLister:
  """URL globs through epath; literal URLs checked with one listing per folder (a brace range
  of 1,243 names is one request, not 1,243)."""

  def __init__(self):
    self._listings = {}

  def _names_in(self, folder):
    if folder not in self._listings:
      try:
        self._listings[folder] = {p.name for p in epath.Path(folder).iterdir()}
      except FileNotFoundError:
        self._listings[folder] = set()
    return self._listings[folder]

  def __call__(self, pattern):
    try:
      return self._match(pattern)
    except KeyError:   # etils' answer to a scheme it has no backend for
      raise ValueError(f"{pattern}: unknown URL scheme {pattern.split('://')[0]}://") from None

  def _match(self, pattern):
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    if not _has_glob(rest):
      folder, name = pattern.rsplit("/", 1)
      return [pattern] if name in self._names_in(folder) else []
    # The bucket (first part) is never a glob; the root is everything before the first glob.
    first = next(i for i, p in enumerate(parts) if _has_glob(p))
    if first == 0:
      raise ValueError(f"{pattern}: a glob in the bucket name is not supported")
    root = paths.resolve(f"{scheme}://" + "/".join(parts[:first]))
    # No per-match is_dir(): that would be one request a shard; a folder that matches fails
    # when its index is read (counted there).
    return [os.fspath(p) for p in root.glob("/".join(parts[first:]))]


def expand(patterns):
  """Patterns (a string as above, or a list of them) -> sorted unique shard paths (local
  paths made absolute, URLs as they are). Raises FileNotFoundError naming every pattern that
  matches nothing, ValueError for unbalanced braces."""
  remote = _RemoteLister()
  found, empty, missing = set(), [], []
  for pattern in split_patterns(patterns):
    matched = 0
    try:
      expanded = list(braceexpand(pattern))
    except ValueError as e:
      raise ValueError(f"shard pattern {pattern!r}: {e}") from None
    for name in expanded:
      hits = remote(name) if paths.is_remote(name) else _glob_local(name)
      if not hits and not _has_glob(name) and len(expanded) > 1:
        missing.append(name)
      matched += len(hits)
      found.update(hits)
    if not matched:
      empty.append(pattern)
  if empty:
    raise FileNotFoundError("no WebDataset shards match " + ", ".join(repr(p) for p in empty))
  if missing:
    _log.warning("%d shard name(s) that the patterns list do not exist and are left out: %s%s",
                 len(missing), ", ".join(missing[:5]), ", ..." if len(missing) > 5 else "")
  return sorted(found)
