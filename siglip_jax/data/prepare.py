r"""Turns WebDataset shards or a captioned folder into an ArrayRecord data set.

    python -m siglip_jax.data.prepare --src='/data/cc12m/*.tar' --out=/data/cc12m_ar
    python -m siglip_jax.data.prepare --src=/data/my_folder --out=/data/my_folder_ar
    python -m siglip_jax.data.prepare --tfds_name=ref_coco --text_key= --region_key=objects \
        --out=/data/ref_coco_ar     # boxes + referring expressions -> regions (LocCa)

Then train with `--config.input.data=folder --config.input.dir=/data/cc12m_ar`. Why: a tar
source has to index every shard's headers at start-up in every process; an ArrayRecord set is
indexed when written (files with `group_size:1`, so any record is one read), and bad records
are dropped here once (`--drop_bad`, the default) instead of being met and skipped in every
epoch. Writes `OUT/data-NNNNN-of-MMMMM.array_record` and `OUT/meta.json`; prints one JSON
summary line. A TFDS set (prepared as ArrayRecord, `tfds build NAME --file_format=array_record`)
is read with the field mapping of `input.*` (`--image_key`, `--text_key`, `--region_key`, ...);
records with regions keep them in the form of ../shared/design.md, "Regions and location
tokens" (boxes x0 y0 x1 y1; a TFDS box is ymin xmin ymax xmax: `--box_order=yxyx`), and bad
regions are dropped and counted (`skipped_regions`). Needs the `array_record` package (`pip install array-record`, or the [data]
extra; Grain depends on it on Linux).
"""
import json
import os

from absl import flags

from siglip_jax import cli
from siglip_jax.data import check, sources
from siglip_jax.data import regions as regions_lib

def _define_flags():
  # Only when run as a program: other CLIs in the package define flags of the same names.
  flags.DEFINE_string("src", None, "Tar shards (glob, ',' for several) or a folder with "
                      "captions.jsonl (or with *.tar shards).")
  flags.DEFINE_string("out", None, "Output folder (created; must not hold a data set).")
  flags.DEFINE_integer("records_per_file", 10_000, "Records per ArrayRecord file.")
  flags.DEFINE_bool("drop_bad", True, "Leave out the records training would skip.")
  flags.DEFINE_integer("workers", 0, "Processes for checking records (0: one a core).")
  flags.DEFINE_string("tfds_name", "", "A TFDS data set to convert instead of --src.")
  flags.DEFINE_string("tfds_data_dir", "", "Its data_dir (empty: TFDS's default).")
  flags.DEFINE_string("split", "train", "Its split.")
  flags.DEFINE_string("image_key", "image", "Its image field ('/' for nesting).")
  flags.DEFINE_string("text_key", "captions/text", "Its caption field; empty with "
                      "--region_key: the caption names the regions.")
  flags.DEFINE_string("region_key", "", "Its objects field ('objects' in ref_coco).")
  flags.DEFINE_string("region_box_key", "bbox", "An object's box field.")
  flags.DEFINE_string("region_caption_key", "refexp/raw", "An object's captions field.")
  flags.DEFINE_enum("box_order", "yxyx", sources.BOX_ORDERS, "The box field's corner order.")


def open_tfds(f):
  return sources.TfdsSource(f.tfds_name, split=f.split, data_dir=f.tfds_data_dir or None,
                            image_key=f.image_key, text_key=f.text_key,
                            region_key=f.region_key, region_box_key=f.region_box_key,
                            region_caption_key=f.region_caption_key, box_order=f.box_order)


def open_src(src):
  if os.path.isdir(src):
    if os.path.isfile(os.path.join(src, "captions.jsonl")):
      return sources.FolderSource(src)
    return sources.WebDatasetSource(os.path.join(src, "*.tar"))
  return sources.WebDatasetSource(src)


def prepare(source, out, *, records_per_file=10_000, drop_bad=True, workers=0):
  """Writes `source` to `out`; returns the summary dict."""
  from array_record.python import array_record_module   # optional dependency
  if os.path.exists(os.path.join(out, "meta.json")):
    raise FileExistsError(f"{out} already holds a data set (meta.json); choose another --out")
  os.makedirs(out, exist_ok=True)
  if drop_bad:
    results = check.scan(source, workers=workers)
  else:
    results = ((i, "", None, None) for i in range(len(source)))
  names, writer, in_file, written, skipped = [], None, 0, 0, {}
  regions = [0, 0]   # kept, dropped (bad: out of bounds, empty, inverted, blank caption)
  try:
    for i, _, reason, _ in results:
      if reason is not None:
        skipped[reason] = skipped.get(reason, 0) + 1
        continue
      if writer is None or in_file == records_per_file:
        if writer is not None:
          writer.close()
        names.append(f"data-{len(names):05d}.array_record")
        # group_size:1: every record its own chunk, so a random read decodes only that record.
        writer = array_record_module.ArrayRecordWriter(os.path.join(out, names[-1]),
                                                       "group_size:1")
        in_file = 0
      rec = source[i]
      carried = regions_lib.raw_regions(rec)
      good, bad = regions_lib.parse_regions(carried)
      regions[0], regions[1] = regions[0] + len(good), regions[1] + bad
      writer.write(sources.encode_record(rec, None if carried is None else good))
      in_file += 1
      written += 1
  finally:
    if writer is not None:
      writer.close()
  # Final names say how many files there are (the TFDS / ArrayRecord habit).
  final = [f"data-{k:05d}-of-{len(names):05d}.array_record" for k in range(len(names))]
  for old, new in zip(names, final):
    os.replace(os.path.join(out, old), os.path.join(out, new))
  summary = {"records": written + sum(skipped.values()), "written": written,
             "skipped": dict(sorted(skipped.items())), "regions": regions[0],
             "skipped_regions": regions[1], "out": os.path.abspath(out)}
  with open(os.path.join(out, "meta.json"), "w") as f:
    json.dump({"format": sources.ARRAY_RECORD_FORMAT, "files": final, "num_records": written,
               "dropped": summary["skipped"]}, f, indent=1)
  return summary


def main(argv):
  del argv
  f = flags.FLAGS
  if bool(f.src) == bool(f.tfds_name) or not f.out:
    cli.fail("--out and exactly one of --src, --tfds_name are required")
  with cli.user_errors(ValueError, OSError):
    source = open_tfds(f) if f.tfds_name else open_src(f.src)
    summary = prepare(source, f.out, records_per_file=f.records_per_file,
                      drop_bad=f.drop_bad, workers=f.workers)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
