r"""Converts a SigLIP model to HF transformers or to a big_vision `.npz`.

    python -m siglip_jax.convert --src=PATH --to=hf|big_vision --out=PATH [--overwrite]

`--src`: a training workdir (latest checkpoint), one `DIR/checkpoints/<step>/` folder, a
big_vision `.npz` or an HF SigLIP folder. `hf` writes a folder `SiglipModel.from_pretrained`
loads (with the tokenizer files when a SentencePiece model is known); `big_vision` writes an
`.npz` in the published layout (`params/...`, per-layer blocks), which big_vision and open_clip
read. Errors are one `error: ...` line and exit status 2.
"""
import os
import shutil
import sys

from absl import app, flags, logging

def _define_flags():
  # Only when run as a program: other CLIs in the package define flags of the same names.
  flags.DEFINE_string("src", None, "Workdir, checkpoint folder, big_vision .npz or HF folder.")
  flags.DEFINE_string("to", None, "Output format: hf or big_vision.")
  flags.DEFINE_string("out", None, "Output folder (hf) or .npz file (big_vision).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")


def convert(src, to, out, *, overwrite=False):
  """Reads `src`, writes `out` in format `to`; returns the spec (see interop.big_vision)."""
  from siglip_jax import inference
  from siglip_jax.data import tokenizer as tok
  from siglip_jax.interop import big_vision, hf
  if to not in ("hf", "big_vision"):
    raise ValueError(f"--to must be 'hf' or 'big_vision', not {to!r}")
  out = os.path.abspath(os.fspath(out))
  if os.path.lexists(out) and not overwrite:
    raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
  if os.path.abspath(os.fspath(src)) == out:
    raise ValueError("--out must differ from --src")
  if overwrite and os.path.isdir(out) and os.listdir(out) and not hf.is_hf_folder(out):
    # rmtree of whatever folder --out names would be one typo away from losing data.
    raise ValueError(f"refusing to replace {out}: it is a non-empty folder, not an HF SigLIP "
                     "export")
  source = inference.read_source(src)
  if to == "hf":
    hf.check_exportable(source.spec)   # before anything at `out` is touched
    tokenizer = tok.Tokenizer(source.tokenizer_path) if source.tokenizer_path else None
    # Written beside `out`, then moved into place: a failed export never leaves half a folder,
    # nor removes the old one.
    tmp = f"{out}.tmp{os.getpid()}"
    try:
      hf.save(source.params, source.spec, tmp, tokenizer)
      if os.path.isdir(out) and not os.path.islink(out):
        shutil.rmtree(out)
      elif os.path.lexists(out):
        os.remove(out)
      os.replace(tmp, out)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  else:
    if os.path.isdir(out):
      raise IsADirectoryError(f"{out} is a folder; --to=big_vision writes one .npz file")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    big_vision.save_npz(source.params, out)
  return source.spec


def main(argv):
  logging.set_verbosity(logging.ERROR)   # orbax warns that a read-only checkpoint is read-only
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  for name in ("src", "to", "out"):
    if not f[name].value:
      _fail(f"--{name} is required")
  try:
    spec = convert(f.src, f.to, f.out, overwrite=f.overwrite)
  except (ValueError, OSError) as e:
    _fail(str(e))
  i, t = spec["image"], spec["text"]
  print(f"wrote {f.out} ({f.to}): image {spec['image_size']}px/{i['patch_size'][0]} "
        f"width {i['width']} depth {i['depth']}; text len {spec['text_len']} vocab "
        f"{t['vocab_size']} width {t['width']} depth {t['depth']}")


def _fail(message):
  # One line, whatever the message: multi-line problem lists are joined.
  print("error: " + " ".join(str(message).split()), file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
