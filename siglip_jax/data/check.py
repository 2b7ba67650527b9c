r"""Reads every record of a data set once and reports what training would skip, and why.

    python -m siglip_jax.data.check --shards='/data/laion/{00000..00999}.tar'   # or a glob
    python -m siglip_jax.data.check --dir=/data/my_folder     # captions.jsonl or a prepared set

Prints ONE JSON object on stdout, `{"records": N, "usable": M, "skipped": {"<reason>": n}}`
(the first bad records are named on stderr), so a data set can be checked before a pod is
reserved. A record is judged exactly as the loader judges it (`Preprocessor.check`: caption,
then a full decode), so `usable` is what training will use.
"""
import json
import os
import sys
from concurrent import futures

from absl import app, flags

from siglip_jax.data import preprocess as pp
from siglip_jax.data import sources

_SHOW = 20   # bad records named on stderr


def open_source(shards="", directory=""):
  if bool(shards) == bool(directory):
    raise ValueError("give exactly one of --shards=GLOB or --dir=DIR")
  if shards:
    return sources.WebDatasetSource(shards)
  if sources.is_prepared(directory):
    return sources.ArrayRecordSource(directory)
  return sources.FolderSource(directory)


def verdicts(source, start, stop, image_size=224):
  """[(index, key, reason or None)] for records [start, stop)."""
  pre = pp.Preprocessor(image_size=image_size)
  out = []
  for i in range(start, stop):
    rec = source[i]
    try:
      pre.check(rec)
      out.append((i, rec.get("key", str(i)), None))
    except pp.BadRecord as e:
      out.append((i, rec.get("key", str(i)), e.reason))
  return out


def scan(source, *, image_size=224, workers=0, chunk=256):
  """Yields (index, key, reason or None) for every record, in order; parallel over processes."""
  n = len(source)
  workers = workers or os.cpu_count() or 1
  ranges = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
  if workers == 1 or len(ranges) <= 1:
    for s, e in ranges:
      yield from verdicts(source, s, e, image_size)
    return
  with futures.ProcessPoolExecutor(workers) as pool:
    # map() keeps order; the source is pickled to each worker (an index, no file handles).
    for part in pool.map(verdicts, *zip(*[(source, s, e, image_size) for s, e in ranges])):
      yield from part


def summarize(results, stream=sys.stderr):
  records, skipped, shown = 0, {}, 0
  for _, key, reason in results:
    records += 1
    if reason is not None:
      skipped[reason] = skipped.get(reason, 0) + 1
      if shown < _SHOW:
        shown += 1
        print(f"bad record {key}: {reason}", file=stream)
  return {"records": records, "usable": records - sum(skipped.values()),
          "skipped": dict(sorted(skipped.items()))}


def _define_flags():
  # Defined only when run as a program: `prepare` imports this module and has flags of its own.
  flags.DEFINE_string("shards", "", "WebDataset tar shards: a glob, or several joined by ','.")
  flags.DEFINE_string("dir", "", "A folder with captions.jsonl, or a set written by prepare.")
  flags.DEFINE_integer("image_size", 224, "Decode as training at this size would (JPEG draft "
                       "scaling); the verdicts do not depend on it.")
  flags.DEFINE_integer("workers", 0, "Processes (0: one per CPU core).")


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    source = open_source(f.shards, f.dir)
  except (ValueError, OSError) as e:
    sys.exit(f"error: {e}")
  report = summarize(scan(source, image_size=f.image_size, workers=f.workers))
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
