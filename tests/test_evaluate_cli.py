"""python -m siglip_jax.evaluate on a tiny trained workdir: the run's own evaluators, step N, and
another config's zero-shot (folder of images) and retrieval (captions.jsonl) evaluators."""
import json
import os

import numpy as np
from PIL import Image

from conftest import run_module


def _last_json(stdout):
  return json.loads(stdout.strip().splitlines()[-1])


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_evaluate_latest_matches_training_final_eval(tiny_run):
  workdir = tiny_run["workdir"]
  before = _rows(workdir)
  proc = run_module("siglip_jax.evaluate", [f"--workdir={workdir}"], devices=2)
  out = _last_json(proc.stdout)
  assert out["step"] == 6
  names = {k for k in out if k.startswith("shapes/")}
  assert {"shapes/zeroshot_top1", "shapes/zeroshot_top1_unseen",
          "shapes/retrieval_i2t_r1", "shapes/retrieval_t2i_r5"} <= names
  rows = _rows(workdir)
  assert len(rows) == len(before) + 1 and rows[-1] == out     # appended under step 6
  # The same weights and data as the training run's last evaluation: the same numbers.
  trained = [r for r in before if r["step"] == 6 and "shapes/zeroshot_top1" in r][-1]
  for k in names:
    assert abs(trained[k] - out[k]) < 1e-6, k


def test_evaluate_step_and_other_config(tiny_run, tmp_path):
  from siglip_jax.data import shapes
  ds = shapes.ShapesDataset(image_size=32, num_heldout=24)
  split = ds.eval_split("heldout")
  rows = []
  for i, (img, label, text) in enumerate(zip(split["image"], split["label"], split["text"])):
    folder = tmp_path / "classes" / ds.class_names[label].replace(" ", "_")
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.round((img + 1) * 127.5).astype(np.uint8)
    Image.fromarray(pixels).resize((48, 48)).save(folder / f"{i}.png")
    Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    rows.append({"image": f"{i}.png", "captions": [text, ds.class_names[label]]})
  (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = tmp_path / "evals.py"
  cfg.write_text(
      "import ml_collections\n\n"
      "def get_config():\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.evals = dict(\n"
      f"      pets=dict(kind='zeroshot', path={str(tmp_path / 'classes')!r}, prompts='short',\n"
      "                batch_size=8),\n"
      f"      caps=dict(kind='retrieval', path={str(tmp_path)!r}, batch_size=8))\n"
      "  return c\n")
  workdir = tiny_run["workdir"]
  proc = run_module("siglip_jax.evaluate", [f"--workdir={workdir}", "--step=3", f"--config={cfg}"],
                    devices=2)
  out = _last_json(proc.stdout)
  assert out["step"] == 3
  assert set(out) == {"step", "pets/zeroshot_top1", "pets/zeroshot_top5",
                      *(f"caps/retrieval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))}
  assert all(0.0 <= v <= 1.0 for k, v in out.items() if k != "step")
  assert _rows(workdir)[-1] == out


def test_evaluate_missing_step_is_one_line_error(tiny_run):
  proc = run_module("siglip_jax.evaluate", [f"--workdir={tiny_run['workdir']}", "--step=5"],
                    check=False)
  assert proc.returncode != 0
  assert "error: no checkpoint for step 5" in proc.stderr and "Traceback" not in proc.stderr
