r"""Converts a SigLIP model to HF transformers or to a big_vision `.npz`.

    python -m siglip_jax.convert --src=PATH --to=hf|big_vision --out=PATH [--overwrite]

`--src`: a training workdir (latest checkpoint), one `DIR/checkpoints/<step>/` folder, a
big_vision `.npz` or an HF SigLIP / SigLIP 2 folder. `hf` writes a folder that transformers'
`pipeline("zero-shot-image-classification")`, `AutoModel` and `AutoProcessor` load, with a
tokenizer that gives the ids the model was trained on (interop/hf_tokenizer.py): a SiglipModel,
or for a NaFlex model a Siglip2Model with its NaFlex processor (interop/hf_siglip2.py), which
`big_vision` refuses (interop/naflex_spec.py says why); `big_vision`
writes an `.npz` in the published layout (`params/...`, per-layer blocks), which big_vision and
open_clip read, and beside it `<name>.json` (big_vision's two_towers config and preprocessing)
and `<name>.model` (the SentencePiece model). docs/exports.md shows how each is used. Errors are
one `error: ...` line and exit status 2.
"""
import os
import shutil
import warnings

from absl import flags, logging

from siglip_jax import cli

def _define_flags():
  # Only when run as a program: other CLIs in the package define flags of the same names.
  flags.DEFINE_string("src", None, "Workdir, checkpoint folder, big_vision .npz or HF folder.")
  flags.DEFINE_string("to", None, "Output format: hf or big_vision.")
  flags.DEFINE_string("out", None, "Output folder (hf) or .npz file (big_vision).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")


def convert(src, to, out, *, overwrite=False):
  """Reads `src`, writes `out` in format `to`; returns the spec (see interop.big_vision).

  What of the export will not work as a user expects (an HF export at a text length other than
  the pipeline's 64) is a `UserWarning`."""
  from siglip_jax import inference
  from siglip_jax.interop import big_vision, hf, hf_siglip2, naflex_spec
  if to not in ("hf", "big_vision"):
    raise ValueError(f"--to must be 'hf' or 'big_vision', not {to!r}")
  out = os.path.abspath(os.fspath(out))
  beside = big_vision.sidecar_paths(out) if to == "big_vision" else ()
  if not overwrite:
    for path in (out, *beside):
      if os.path.lexists(path):
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
  if os.path.abspath(os.fspath(src)) in (out, *beside):
    raise ValueError("--out must differ from --src")
  if overwrite and os.path.isdir(out) and os.listdir(out) and not hf.is_hf_folder(out):
    # rmtree of whatever folder --out names would be one typo away from losing data.
    raise ValueError(f"refusing to replace {out}: it is a non-empty folder, not an HF SigLIP "
                     "export")
  if to == "big_vision" and os.path.isdir(out):
    raise IsADirectoryError(f"{out} is a folder; --to=big_vision writes one .npz file")
  source = inference.read_source(src)
  tokenizer = source.tokenizer()
  naflex = naflex_spec.is_naflex(source.spec)
  if to == "hf":
    hf.check_exportable(hf.sincos_as_table({}, source.spec)[1])   # before `out` is touched
    # Written beside `out`, then moved into place: a failed export never leaves half a folder,
    # nor removes the old one.
    tmp = f"{out}.tmp{os.getpid()}"
    try:
      (hf_siglip2 if naflex else hf).save(source.params, source.spec, tmp, tokenizer)
      if os.path.isdir(out) and not os.path.islink(out):
        shutil.rmtree(out)
      elif os.path.lexists(out):
        os.remove(out)
      os.replace(tmp, out)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    problems = hf.export_warnings(source.spec, tokenizer)
  else:
    naflex_spec.check_big_vision_export(source.spec)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    big_vision.save(source.params, source.spec, out, tokenizer)
    problems = []
    if tokenizer is not None and tokenizer.strip_punctuation:
      problems.append("big_vision's `tokenize` op cannot strip punctuation as this model's "
                      f"training did, so {os.path.basename(beside[0])} has no pp_txt")
  for problem in problems:
    warnings.warn(f"{out}: {problem}", UserWarning, stacklevel=2)
  return source.spec


def main(argv):
  logging.set_verbosity(logging.ERROR)   # orbax warns that a read-only checkpoint is read-only
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  for name in ("src", "to", "out"):
    if not f[name].value:
      cli.fail(f"--{name} is required")
  with cli.user_errors(ValueError, OSError):
    spec = convert(f.src, f.to, f.out, overwrite=f.overwrite)
  from siglip_jax.interop import big_vision
  print(f"wrote {f.out} ({f.to}): {big_vision.describe(spec)}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
