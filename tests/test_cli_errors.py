"""Every user mistake the CLIs can meet gives ONE `error:` line naming it, exit status 2, and no
traceback; a run shorter than its warm-up is a smoke run, not a mistake; a silent restart or a
resume with nothing left to train is said out loud."""
import contextlib
import json
import os
import shutil
import subprocess

import pytest

from cli_cases import assert_one_line_error, run_cases
from conftest import TINY_DEMO, read_only

TRAIN = "siglip_jax.train"


@contextlib.contextmanager
def small_disk(path, size="600k"):
  """A tiny tmpfs at `path` (root only), so that a checkpoint write runs out of space."""
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                          path], capture_output=True).returncode != 0:
    pytest.skip("mounting a small tmpfs needs root")
  try:
    yield path
  finally:
    subprocess.run(["umount", path], check=True)


def _tiny(workdir, *extra):
  return TINY_DEMO + [f"--workdir={workdir}", *extra]


def test_user_mistakes_are_one_line(tmp_path):
  afile = tmp_path / "a_file"
  afile.write_text("not a folder")
  not_ckpt = tmp_path / "not_a_checkpoint"
  not_ckpt.mkdir()
  (not_ckpt / "notes.txt").write_text("hello")
  wd = str(tmp_path / "wd")
  bad_data = tmp_path / "bad_data"
  bad_data.mkdir()
  (bad_data / "captions.jsonl").write_text(json.dumps({"image": "gone.jpg", "caption": "x"}))
  cases = [  # (args, words the one error line must hold)
      (["--config.foo=1"], ["`foo`", "unknown"]),
      (["--config.input.batchsize=8"], ["`input.batchsize`", "`input.batch_size`"]),
      (["--config.model.image.widht=32"], ["`model.image.widht`", "`model.image.width`"]),
      (["--config.input.image_size=0"], ["`input.image_size`"]),
      (["--config.input.image_size=-32"], ["`input.image_size`"]),
      (["--config.input.text_len=0"], ["`input.text_len`"]),
      (["--config.model.image.width=31"], ["`model.image.num_heads`", "31"]),
      (["--config.model.image.width=30"], ["`model.out_dim`", "30"]),
      (["--config.optim.name=adamz"], ["`optim.name`", "adamz"]),
      (["--config.model_init=/no/such/run"], ["`model_init`", "/no/such/run"]),
      ([f"--config.model_init={not_ckpt}"], ["`model_init`", "not a checkpoint"]),
      ([f"--config.model_init={afile}"], ["`model_init`", ".npz"]),
      (["--config.input.tokenizer=/no/such.model"], ["`input.tokenizer`", "/no/such.model"]),
      (["--config.input.data=folder", f"--config.input.dir={bad_data}"], ["usable"]),
      (["--config.total_steps=abc"], ["total_steps"]),
      (["--no_such_flag=1"], ["no_such_flag"]),
      # The objectives (SigLIP 2): a name that does not exist, bad weights and fractions,
      # a decoder on captionless data, a decoder text too short for a box.
      (["--config.objectives.lcoca.weight=1"], ["`objectives.lcoca.weight`",
                                                "`objectives.locca.weight`"]),
      (["--config.objectives.locca.weight=-1"], ["`objectives.locca.weight`"]),
      (["--config.objectives.locca.start_fraction=1.5"],
       ["`objectives.locca.start_fraction`"]),
      (["--config.objectives.locca.weight=1", "--config.input.data=synthetic"],
       ["`objectives.locca`", "synthetic"]),
      (["--config.objectives.locca.weight=1", "--config.input.decoder_len=4"],
       ["`input.decoder_len`"]),
      # SILC/TIPS: a crop larger than the image, no local crop, a mask ratio outside (0, 1),
      # SILC on a tower without a pooled output.
      (["--config.objectives.silc.weight=1", "--config.objectives.silc.local_size=64"],
       ["`objectives.silc.local_size`", "larger"]),
      (["--config.objectives.tips.weight=1", "--config.objectives.teacher.global_size=40"],
       ["`objectives.teacher.global_size`", "larger"]),
      (["--config.objectives.silc.weight=1", "--config.objectives.silc.n_local=0"],
       ["`objectives.silc.n_local`"]),
      (["--config.objectives.tips.weight=1", "--config.objectives.tips.mask_ratio=1.0"],
       ["`objectives.tips.mask_ratio`"]),
      (["--config.objectives.silc.weight=1", "--config.model.image.pool_type=none"],
       ["`model.image.pool_type`"]),
      # Gradient caching: no micro-batch at all; a batch of 16 in 3.
      (["--config.input.microbatches=0"], ["`input.microbatches`", ">= 1"]),
      (["--config.input.microbatches=3"], ["`input.microbatches`", "16", "3"]),
  ]
  runs = [(TRAIN, _tiny(wd, *args), None) for args, _ in cases]
  runs += [(TRAIN, TINY_DEMO + [f"--workdir={afile}"], None),
           (TRAIN, TINY_DEMO + ["--workdir=nosuchscheme://bucket/run"], None),
           ("siglip_jax.evaluate", [f"--workdir={not_ckpt}"], None),
           ("siglip_jax.evaluate", [f"--workdir={tmp_path / 'missing'}"], None),
           ("siglip_jax.convert", ["--src=/no/such", "--to=hf", f"--out={tmp_path / 'o'}"], None),
           ("siglip_jax.convert", [f"--src={not_ckpt}", "--to=xx", f"--out={tmp_path / 'o'}"],
            None),
           ("siglip_jax.bench", ["--config=configs/demo.py", "--config.input.batchsiz=4"], None),
           ("siglip_jax.preflight", ["--config=configs/demo.py", "--config.optim.nam=x"], None),
           ("siglip_jax.bench", ["--config=configs/demo.py", "--config.input.microbatches=-2"],
            None)]
  needles = [n for _, n in cases] + [
      ["is a file"], ["nosuchscheme://"], ["checkpoint"], ["checkpoint"], ["/no/such"],
      ["--to"], ["`input.batchsiz`", "`input.batch_size`"], ["`optim.nam`", "`optim.name`"],
      ["`input.microbatches`", "-2"]]
  results = run_cases(runs)
  for (module, args, _), words, result in zip(runs, needles, results):
    print(module, args[-1], "->", (result["stderr"].strip().splitlines() or [""])[-1])
    assert_one_line_error(result, *words)


def test_truncated_safetensors_in_convert(tiny_run, tmp_path):
  from siglip_jax import convert
  hf_dir = str(tmp_path / "hf")
  convert.convert(tiny_run["workdir"], "hf", hf_dir)
  weights = os.path.join(hf_dir, "model.safetensors")
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) // 2)
  (result,) = run_cases([("siglip_jax.convert", [f"--src={hf_dir}", "--to=big_vision",
                                                 f"--out={tmp_path / 'x.npz'}"], None)])
  assert_one_line_error(result, "model.safetensors", "truncated")


def test_read_only_workdir_and_a_full_disk(tiny_run, tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  finished = str(tmp_path / "finished")
  shutil.copytree(tiny_run["workdir"], finished)
  before = sorted((p, os.path.getsize(os.path.join(r, p))) for r, _, fs in os.walk(finished)
                  for p in fs)
  with read_only(str(ro)) as really, read_only(finished):
    if not really:
      pytest.skip("cannot make a folder read-only here")
    train, evaluate = run_cases([
        (TRAIN, _tiny(str(ro / "run")), None),
        ("siglip_jax.evaluate", [f"--workdir={finished}"], None)], devices=2)
  assert_one_line_error(train, "read-only")
  # A finished run on a read-only disk is evaluated all the same; nothing is written.
  assert evaluate["rc"] == 0, evaluate["stderr"][-3000:]
  assert json.loads(evaluate["stdout"].strip().splitlines()[-1])["step"] == 6
  after = sorted((p, os.path.getsize(os.path.join(r, p))) for r, _, fs in os.walk(finished)
                 for p in fs)
  assert after == before
  with small_disk(str(tmp_path / "small")) as disk:
    (full,) = run_cases([(TRAIN, _tiny(os.path.join(disk, "run"), "--config.total_steps=4",
                                       "--config.checkpoint.every_steps=2"), None)])
  assert_one_line_error(full, "no space left")


def test_short_runs_restarts_and_no_ops_are_said(tiny_run, tmp_path):
  gone = str(tmp_path / "gone")
  shutil.copytree(tiny_run["workdir"], gone)
  shutil.rmtree(os.path.join(gone, "checkpoints"))
  lowered = str(tmp_path / "lowered")
  shutil.copytree(tiny_run["workdir"], lowered)
  smoke = str(tmp_path / "smoke")
  restart, noop, short = run_cases([
      (TRAIN, _tiny(gone, "--config.total_steps=1"), None),
      (TRAIN, _tiny(lowered, "--config.total_steps=4"), None),
      (TRAIN, _tiny(smoke, "--config.total_steps=2",
                    "--config.optim.schedule.warmup_steps=100"), None)], devices=2)
  for r in (restart, noop, short):
    assert r["rc"] == 0, r["stderr"][-3000:]
  assert "RESTARTS FROM SCRATCH" in restart["stderr"] and "step 6" in restart["stderr"]
  assert "nothing to train" in noop["stderr"] and "total_steps=4" in noop["stderr"]
  # The warm-up is clipped to the run, said once, and the run trains (lr > 0 at its steps).
  assert short["stderr"].count("shorter than the schedule's warm-up") == 1
  rows = [json.loads(l) for l in open(os.path.join(smoke, "metrics.jsonl"))]
  train_rows = [r for r in rows if "train/lr" in r]
  assert [r["step"] for r in train_rows] == [2] and train_rows[0]["train/lr"] > 0
