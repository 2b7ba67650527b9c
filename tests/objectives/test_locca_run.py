"""A tiny SigLIP 2 demo run (sigmoid loss + LocCa decoder on scenes, SILC + TIPS in its last
two steps; conftest's `siglip2_run`, test_resume's reference too) as a user starts it, then what
its workdir gives: the scenes metrics (the dense probe's too) in training and in `evaluate`,
`siglip_jax.load` with caption/locate/describe and `encode_patches`, and exports that hold the
two towers, t and b only (no decoder, distillation head, mask token or teacher; HF parity
holds)."""
import json
import os

import numpy as np
import pytest

import siglip_jax
from siglip_jax import convert
from siglip_jax.data import scenes
from siglip_jax.data.preprocess import to_float
from siglip_jax.interop import big_vision
from conftest import SIGLIP2_DEVICES, SIGLIP2_STEPS, run_module

SWITCH = round(0.8 * SIGLIP2_STEPS)   # SILC and TIPS train from the step after this one
METRICS = ("refexp_acc50", "refexp_const_acc50", "grounded_acc", "caption_acc",
           "retrieval_i2t_r1", "retrieval_t2i_r1")


@pytest.fixture(scope="module")
def workdir(siglip2_run):
  """12 steps on 2 devices, the scenes metrics evaluated after the last (conftest)."""
  return str(siglip2_run)


def _last_row_with(workdir, key):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in rows if key in r][-1]


def test_training_logs_every_objective_and_the_scenes_metrics(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "train/loss_silc" in r] == list(   # from 0.8 * 12 on
      range(SWITCH + 1, SIGLIP2_STEPS + 1))
  row = _last_row_with(workdir, "train/loss_silc")
  for name in ("contrastive", "locca", "locca_caption", "locca_refexp", "locca_grounded",
               "silc", "tips"):
    assert np.isfinite(row[f"train/loss_{name}"]), name
  assert row["train/loss"] == pytest.approx(
      row["train/loss_contrastive"] + row["train/loss_locca"] + 0.25 * row["train/loss_silc"]
      + 0.0625 * row["train/loss_tips"], rel=1e-6)
  # The FLOPs count the teacher and the views only from the switch on.
  before = [r for r in rows if r["step"] == SWITCH and "train/loss" in r][0]
  assert row["perf/tflops_per_device"] / row["train/pairs_per_s"] > \
      1.2 * before["perf/tflops_per_device"] / before["train/pairs_per_s"]
  assert row["data/skipped_regions"] == 0
  evals = _last_row_with(workdir, "scenes/refexp_acc50")
  for name in METRICS:
    for suffix in ("", "_unseen"):
      assert 0.0 <= evals[f"scenes/{name}{suffix}"] <= 1.0, name + suffix
  assert 0.0 <= evals["scenes/dense_miou"] <= 1.0 and 0.0 <= evals["scenes/dense_acc"] <= 1.0
  # The best constant box is a real baseline: above zero on scenes of 2 or 3 objects.
  assert evals["scenes/refexp_const_acc50"] > 0


def test_evaluate_cli_reports_the_same_scenes_metrics(workdir):
  trained = _last_row_with(workdir, "scenes/refexp_acc50")   # before evaluate appends its own
  proc = run_module("siglip_jax.evaluate", [f"--workdir={workdir}"], devices=SIGLIP2_DEVICES)
  for name in METRICS:
    assert f"scenes/{name}" in proc.stdout
  assert f"{trained['scenes/refexp_const_acc50']:.4f}" in proc.stdout


def test_load_keeps_the_decoder_and_exports_hold_the_towers_only(workdir, tmp_path):
  model = siglip_jax.load(workdir)
  split = scenes.ScenesDataset(seed=0, image_size=model.image_size).eval_split("heldout")[:4]
  images = to_float(np.stack([s["image"] for s in split]))
  captions = model.caption(images)
  assert len(captions) == 4 and all(isinstance(c, str) for c in captions)
  boxes = model.locate(images, [s["regions"][0]["caption"] for s in split])
  assert boxes.shape == (4, 4) and np.all((boxes >= 0) & (boxes <= 1))
  assert np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])
  assert len(model.describe(images, [s["regions"][0]["box"] for s in split])) == 4

  convert.convert(workdir, "big_vision", str(tmp_path / "bv.npz"))
  assert model.encode_patches(images).shape == (4, 16, 32)   # a 4x4 grid of width 32
  names = big_vision.read_npz(str(tmp_path / "bv.npz")).keys()
  assert names and not any(w in n for n in names for w in ("decoder", "silc", "tips", "mask"))
  assert {n.split("/")[0] for n in names} <= {"img", "txt", "t", "b"}

  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  with pytest.warns(UserWarning, match="text tokens"):   # 20 tokens, not the pipeline's 64
    convert.convert(workdir, "hf", str(tmp_path / "hf"))
  theirs = transformers.SiglipModel.from_pretrained(str(tmp_path / "hf"),
                                                    dtype=torch.float32).eval()
  tokens = model.tokenize([s["texts"] for s in split])
  with torch.no_grad():
    res = theirs(input_ids=torch.from_numpy(np.asarray(tokens)).long(),
                 pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  assert np.abs(res.image_embeds.numpy() - model.encode_image(images)).max() < 1e-4
  assert np.abs(res.text_embeds.numpy() - model.encode_text(tokens)).max() < 1e-4
  # A model without a decoder says so, in one line, when asked to caption.
  with pytest.raises(ValueError, match="no LocCa decoder"):
    siglip_jax.load(str(tmp_path / "hf")).caption(images)
