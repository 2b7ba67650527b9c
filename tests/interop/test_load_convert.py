"""`siglip_jax.load` on a trained demo workdir and `python -m siglip_jax.convert`: the HF export
reproduces our embeddings in transformers' own SiglipModel and works in its pipeline and
AutoProcessor as shipped; the big_vision export is exact and carries its config and tokenizer."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import siglip_jax
from siglip_jax import checkpoint, convert
from siglip_jax.data import shapes
from siglip_jax.data.tokenizer import DEMO_MODEL
from siglip_jax.evaluators import prompts as prompts_lib
from siglip_jax.interop import big_vision
from conftest import TINY_DEMO, cli_env, run_module

TEXT_LEN = 64   # SigLIP's, and what transformers' pipeline pads to


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny demo-shaped run at 64 text tokens, trained once for the module (a few dozen
  steps: its held-out images' top two class logits lie >1e-5 apart, torch's and ours <5e-6)."""
  wd = str(tmp_path_factory.mktemp("demo"))
  run_module("siglip_jax.train", [*TINY_DEMO, f"--workdir={wd}", "--config.total_steps=40",
                                  "--config.log_every_steps=20",
                                  f"--config.input.text_len={TEXT_LEN}"])
  return wd


@pytest.fixture(scope="module")
def ours(workdir):
  return siglip_jax.load(workdir)   # compiled once for the module's tests


@pytest.fixture(scope="module")
def hf_export(workdir, tmp_path_factory):
  """`python -m siglip_jax.convert --to=hf` of the run, as a user runs it."""
  out = str(tmp_path_factory.mktemp("export") / "hf")
  proc = run_module("siglip_jax.convert", [f"--src={workdir}", "--to=hf", f"--out={out}"])
  assert "wrote" in proc.stdout and "Warning" not in proc.stderr   # 64 tokens: nothing to warn
  return out


def _inputs(model, n=5, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (n, model.image_size, model.image_size, 3)).astype(np.float32)
  return images, rng.integers(0, model.vocab_size, (n, model.text_len)).astype(np.int32)


def test_load_workdir_and_checkpoint_folder(workdir, ours):
  model = ours
  assert (model.image_size, model.text_len) == (32, TEXT_LEN)
  assert model.vocab_size == model.tokenizer.vocab_size   # the demo's SentencePiece model
  images, tokens = _inputs(model)
  zimg, ztxt = model.encode_image(images), model.encode_text(tokens)
  assert zimg.shape == (5, 32) and ztxt.shape == (5, 32)
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1, atol=1e-5)
  (step_dir,) = glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*"))
  again = siglip_jax.load(step_dir)
  np.testing.assert_array_equal(again.encode_image(images), zimg)
  assert again.t == model.t and again.b == model.b
  assert model.encode_strings(["a red circle"]).shape == (1, 32)


def test_convert_to_hf_matches_in_transformers(hf_export, ours):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  out = hf_export
  assert {"config.json", "model.safetensors", "spiece.model", "tokenizer.json",
          "tokenizer_config.json", "preprocessor_config.json"} <= set(os.listdir(out))
  theirs = transformers.SiglipModel.from_pretrained(out, dtype=torch.float32).eval()
  images, tokens = _inputs(ours, seed=1)
  with torch.no_grad():   # no attention_mask: like big_vision, every position is attended
    res = theirs(input_ids=torch.from_numpy(tokens).long(),
                 pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  img_diff = np.abs(res.image_embeds.numpy() - ours.encode_image(images)).max()
  txt_diff = np.abs(res.text_embeds.numpy() - ours.encode_text(tokens)).max()
  assert img_diff < 1e-4 and txt_diff < 1e-4, (img_diff, txt_diff)
  assert theirs.logit_scale.exp().item() == pytest.approx(ours.t, rel=1e-6)
  assert theirs.logit_bias.item() == pytest.approx(ours.b, rel=1e-6)
  # The exported folder loads back as the same model, tokenizer included.
  back = siglip_jax.load(out)
  np.testing.assert_array_equal(back.encode_text(tokens), ours.encode_text(tokens))
  np.testing.assert_array_equal(back.tokenize(["a red circle"]), ours.tokenize(["a red circle"]))


# Runs with nothing of siglip_jax imported: what a user of the export alone can do.
_TRANSFORMERS_ONLY = """
import json, sys
from PIL import Image
import transformers
from transformers import AutoProcessor, pipeline
job = json.load(open(sys.argv[1]))
classify = pipeline("zero-shot-image-classification", model=job["model"])
results = classify(job["images"], candidate_labels=job["labels"],
                   hypothesis_template=job["template"])
processor = AutoProcessor.from_pretrained(job["model"])
image = Image.open(job["images"][0])
documented = processor(text=job["prompts"], images=image, padding="max_length",
                       return_tensors="np")
bare = processor(text=job["prompts"], images=image, return_tensors="np")
json.dump({"top1": [r[0]["label"] for r in results],
           "keys": sorted(documented.keys()), "ids": documented["input_ids"].tolist(),
           "bare_keys": sorted(bare.keys()), "bare_ids": bare["input_ids"].tolist(),
           "version": transformers.__version__,
           "ours_imported": sorted(m for m in sys.modules if m.startswith("siglip_jax"))},
          open(job["result"], "w"))
"""


def test_pipeline_and_processor_work_as_shipped(hf_export, ours, tmp_path):
  """transformers' zero-shot pipeline with no argument beyond candidate_labels and
  hypothesis_template agrees with siglip_jax's top-1 on held-out images; AutoProcessor gives
  our ids for every evaluator prompt, punctuation included, and no attention mask."""
  pytest.importorskip("transformers")
  data = shapes.ShapesDataset(image_size=ours.image_size)
  split = data.eval_split("heldout")   # 512 images no training step saw
  pixels = np.rint((np.asarray(split["image"]) + 1) * 127.5).astype(np.uint8)
  paths = []
  for i, image in enumerate(pixels):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(image).save(paths[-1])
  template = "a photo of a {}."
  class_texts = [template.format(name) for name in data.class_names]
  logits = ours.encode_image(pixels * (2 / 255) - 1) @ ours.encode_strings(class_texts).T
  want_top1 = [data.class_names[k] for k in logits.argmax(1)]
  prompts = [p for per_class in data.prompts() for p in per_class]   # the demo evaluator's
  prompts += [p for per_class in prompts_lib.class_prompts(
      ["jack-o'-lantern", "T-shirt", "Granny Smith", "café au lait"]) for p in per_class]
  job = {"model": hf_export, "images": paths, "labels": data.class_names, "template": template,
         "prompts": prompts, "result": str(tmp_path / "result.json")}
  (tmp_path / "job.json").write_text(json.dumps(job))
  proc = subprocess.run([sys.executable, "-c", _TRANSFORMERS_ONLY, str(tmp_path / "job.json")],
                        cwd=tmp_path, env=cli_env(OMP_NUM_THREADS=1),   # tiny ops: 1 thread is
                        capture_output=True, text=True, timeout=300)    # 10x faster on 2 cores
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads((tmp_path / "result.json").read_text())
  assert got["ours_imported"] == []
  agree = np.mean([a == b for a, b in zip(got["top1"], want_top1)])
  assert len(got["top1"]) == 512 and agree >= 0.99, agree
  assert got["keys"] == ["input_ids", "pixel_values"]   # no attention_mask
  np.testing.assert_array_equal(got["ids"], ours.tokenize(prompts))
  if int(got["version"].split(".")[0]) >= 5:   # 5.x processors default to the tokenizer's
    assert got["bare_keys"] == ["input_ids", "pixel_values"]   # padding and truncation
    np.testing.assert_array_equal(got["bare_ids"], ours.tokenize(prompts))


def test_other_text_length_warns_at_export(tmp_path):
  from test_big_vision import bv_weights, write_npz   # 12 text tokens
  src = write_npz(tmp_path / "short.npz", bv_weights())
  with pytest.warns(UserWarning, match="pads SigLIP text to 64 tokens") as record, \
       pytest.warns(UserWarning, match="no tokenizer files"):   # a bare .npz names none
    convert.convert(src, "hf", tmp_path / "hf")
  assert "AutoModel + AutoProcessor" in str(record[0].message)


def test_convert_to_big_vision_is_exact(workdir, tmp_path):
  out = tmp_path / "model.npz"
  convert.convert(workdir, "big_vision", out)
  flat, _ = big_vision.load_npz(out)
  saved = checkpoint.read_params(workdir)
  assert sorted(flat) == sorted(saved)
  assert all(np.array_equal(flat[k], saved[k]) for k in saved)
  with np.load(out, allow_pickle=False) as f:   # what open_clip's loader indexes
    assert "params/img/Transformer/encoderblock_0/LayerNorm_0/scale" in f.files
    assert "params/b" in f.files and "params/t" in f.files
  # Beside it: the SentencePiece model and big_vision's config, text preprocessing included.
  assert (tmp_path / "model.model").read_bytes() == open(DEMO_MODEL, "rb").read()
  cfg = json.loads((tmp_path / "model.json").read_text())
  assert cfg["model"]["bias_init"] == -10.0 and cfg["model"]["out_dim"] == [None, 32]
  assert cfg["pp_txt"] == (f"tokenize(max_len={TEXT_LEN}, model='model.model', eos='sticky', "
                           "pad_value=1, lower=True, inkey='texts')")


def test_existing_out_needs_overwrite(workdir, tmp_path):
  out = tmp_path / "model.npz"
  out.write_bytes(b"keep me")
  proc = run_module("siglip_jax.convert", [f"--src={workdir}", "--to=big_vision",
                                           f"--out={out}"], check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "already exists; pass --overwrite" in proc.stderr
  assert out.read_bytes() == b"keep me"
  convert.convert(workdir, "big_vision", out, overwrite=True)
  assert big_vision.load_npz(out)[1]["image_size"] == 32
  (tmp_path / "model.json").write_text("keep me")   # what lies beside --out is kept too
  out.unlink()
  with pytest.raises(FileExistsError, match="model.json already exists"):
    convert.convert(workdir, "big_vision", out)
  assert (tmp_path / "model.json").read_text() == "keep me"
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("not an export")
  with pytest.raises(ValueError, match="refusing to replace"):   # --overwrite is no rm -rf
    convert.convert(workdir, "hf", tmp_path / "mine", overwrite=True)
  assert (tmp_path / "mine" / "notes.txt").exists()


def test_to_hf_refuses_a_gap_pooled_model(tmp_path):
  from test_big_vision import bv_weights, write_npz   # big_vision-named random weights
  w = {k: v for k, v in bv_weights().items() if not k.startswith("img/MAPHead_0/")}
  src = write_npz(tmp_path / "gap.npz", w)
  with pytest.raises(ValueError, match="image pooling is 'gap'"):
    convert.convert(src, "hf", tmp_path / "hf")
  assert not os.path.exists(tmp_path / "hf")
  with pytest.raises(ValueError, match="--to must be"):
    convert.convert(src, "onnx", tmp_path / "x")
