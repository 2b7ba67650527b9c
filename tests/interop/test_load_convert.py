"""`siglip_jax.load` on a trained demo workdir and `python -m siglip_jax.convert`: the HF export
reproduces our embeddings in transformers' own SiglipModel; the big_vision export is exact."""
import glob
import os

import numpy as np
import pytest

import siglip_jax
from siglip_jax import checkpoint, convert
from siglip_jax.interop import big_vision
from conftest import TINY_DEMO, run_module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny demo run, trained once for the module (a few seconds of steps)."""
  wd = str(tmp_path_factory.mktemp("demo"))
  run_module("siglip_jax.train", [*TINY_DEMO, f"--workdir={wd}", "--config.total_steps=3"])
  return wd


@pytest.fixture(scope="module")
def ours(workdir):
  return siglip_jax.load(workdir)   # compiled once for the module's tests


def _inputs(model, n=5, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (n, model.image_size, model.image_size, 3)).astype(np.float32)
  return images, rng.integers(0, model.vocab_size, (n, model.text_len)).astype(np.int32)


def test_load_workdir_and_checkpoint_folder(workdir, ours):
  model = ours
  assert (model.image_size, model.text_len) == (32, 16)
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


def test_convert_to_hf_matches_in_transformers(workdir, ours, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  out = str(tmp_path / "hf")
  proc = run_module("siglip_jax.convert", [f"--src={workdir}", "--to=hf", f"--out={out}"])
  assert "wrote" in proc.stdout
  assert {"config.json", "model.safetensors", "spiece.model",
          "tokenizer_config.json"} <= set(os.listdir(out))
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
