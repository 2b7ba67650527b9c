"""NaFlex models out and in: `convert --to=hf` writes a Siglip2Model folder that transformers'
own Siglip2Model and AutoProcessor reproduce siglip_jax with (embeddings, logits, patch grids,
token ids), `load` reads it back exactly, reads big_vision-layout NaFlex `.npz` files and
folders transformers itself wrote; `--to=big_vision` is refused; the handle's NaFlex inputs.

The source is a training checkpoint as `checkpoint_read.read` returns one (its params and its
run's config), faked so no training run is needed; everything after that read is the real path.
"""
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

import siglip_jax
from siglip_jax import checkpoint_read, convert, inference
from siglip_jax.data import naflex
from siglip_jax.data import tokenizer as tok
from siglip_jax.interop import big_vision, hf_siglip2, naflex_spec
from siglip_jax.models import two_towers

TEXT_LEN, BUDGET = 16, 64
IMAGE = dict(patch_size=(8, 8), width=32, depth=2, mlp_dim=64, num_heads=2, pool_type="map",
             posemb_grid=4)
TEXTS = ["a red circle", "a blue star.", "green, square", "Yellow   Triangle!"]
# 1:4, 4:1, 3:2 and square, at sizes that need resizing (up and down) at both budgets.
SIZES = [(24, 100), (100, 24), (40, 60), (50, 50)]


def _spec():
  vocab = tok.Tokenizer(tok.DEMO_MODEL).vocab_size
  return {"image_model": two_towers.NAFLEX, "image": IMAGE,
          "text": dict(width=32, depth=1, mlp_dim=64, num_heads=2, vocab_size=vocab,
                       pool_type="last"),
          "out_dim": (None, 32), "bias_init": -10.0, "image_size": None, "text_len": TEXT_LEN,
          "max_num_patches": BUDGET}


def _random_params(spec, seed=0):
  rng = np.random.default_rng(seed)
  params = {k: (rng.standard_normal(s) * 0.5).astype(np.float32)
            for k, s in big_vision.expected_shapes(spec).items()}
  params["t"], params["b"] = np.array([2.0], np.float32), np.array([-3.0], np.float32)
  return params


def _scan_image_tower(flat):
  """The image tower's blocks as a scanned run saves them (`encoderblock`, depth axis)."""
  out, prefix = {}, "img/Transformer/encoderblock_"
  for k, v in flat.items():
    if k.startswith(prefix):
      i, rest = k[len(prefix):].split("/", 1)
      out.setdefault(f"img/Transformer/encoderblock/{rest}", {})[int(i)] = v
    else:
      out[k] = v
  return {k: np.stack([v[i] for i in sorted(v)]) if isinstance(v, dict) else v
          for k, v in out.items()}


def _images(seed=0):
  """uint8 images of SIZES: smooth gradients (resizing matters) plus noise."""
  rng = np.random.default_rng(seed)
  out = []
  for h, w in SIZES:
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin((x + y) / 5)], -1)
    out.append(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
  return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, its params, the handle siglip_jax.load gives, the HF export of it)."""
  spec = _spec()
  params = _random_params(spec)
  workdir = str(tmp_path_factory.mktemp("naflex_run"))
  config = {"model": {"image_model": two_towers.NAFLEX, "image": dict(IMAGE, scan=True),
                      "text": {"pool_type": "last"}},
            "input": {"max_num_patches": BUDGET, "text_len": TEXT_LEN, "image_size": 32,
                      "tokenizer": ""}}
  ckpt = checkpoint_read.Checkpoint(workdir, 7, _scan_image_tower(params), config)
  out = str(tmp_path_factory.mktemp("export") / "hf")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(checkpoint_read, "read", lambda path, step=None: ckpt)
    ours = inference.load(workdir, batch_size=8)
    with pytest.warns(UserWarning, match="pads SigLIP text to 64"):   # 16 tokens
      exported = convert.convert(workdir, "hf", out)
    with pytest.raises(ValueError, match="NaFlex model is not exported to big_vision"):
      convert.convert(workdir, "big_vision", str(tmp_path_factory.mktemp("bv") / "m.npz"))
  assert naflex_spec.is_naflex(exported) and exported["max_num_patches"] == BUDGET
  return workdir, params, ours, out


def test_export_matches_in_transformers(run):
  """Siglip2Model fed by its own AutoProcessor (as shipped: budget and patch size from the
  export) gives siglip_jax's embeddings and logits on the same patches, at two budgets."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  _, _, ours, out = run
  cfg = json.loads(open(os.path.join(out, "config.json")).read())
  assert cfg["model_type"] == "siglip2" and cfg["architectures"] == ["Siglip2Model"]
  assert cfg["vision_config"]["num_patches"] == 16 and cfg["vision_config"]["patch_size"] == 8
  processor = transformers.AutoProcessor.from_pretrained(out)
  # transformers 5 picks the backend by what is installed: PIL (siglip_jax's own resize)
  # without torchvision.
  has_torchvision = importlib.util.find_spec("torchvision") is not None
  backend = "Siglip2ImageProcessor" if has_torchvision else "Siglip2ImageProcessorPil"
  assert type(processor).__name__ == "Siglip2Processor"
  assert type(processor.image_processor).__name__ == backend
  assert type(processor.tokenizer).__name__ != "Siglip2Tokenizer"   # Gemma's: other ids
  theirs = transformers.Siglip2Model.from_pretrained(out, dtype=torch.float32).eval()
  images = _images()
  for budget in (BUDGET, 16):
    kw = {} if budget == BUDGET else {"max_num_patches": budget}
    inputs = processor(text=TEXTS, images=[Image.fromarray(im) for im in images],
                       return_tensors="pt", **kw)
    assert inputs["pixel_values"].shape == (4, budget, 8 * 8 * 3)
    np.testing.assert_array_equal(inputs["input_ids"].numpy(), ours.tokenize(TEXTS))
    with torch.no_grad():
      res = theirs(**inputs)
    batch = {"patches": inputs["pixel_values"].numpy(),
             "patch_mask": inputs["pixel_attention_mask"].numpy(),
             "spatial_shapes": inputs["spatial_shapes"].numpy()}
    zimg, ztxt = ours.encode_image(batch), ours.encode_text(inputs["input_ids"].numpy())
    assert np.abs(res.image_embeds.numpy() - zimg).max() < 1e-4
    assert np.abs(res.text_embeds.numpy() - ztxt).max() < 1e-4
    logits = ours.t * zimg @ ztxt.T + ours.b
    assert np.abs(res.logits_per_image.numpy() - logits).max() < 1e-4 * max(1.0, ours.t)
    mine = ours.preprocess(images, max_num_patches=budget)
    np.testing.assert_array_equal(mine["spatial_shapes"], batch["spatial_shapes"])
    np.testing.assert_array_equal(mine["patch_mask"], batch["patch_mask"])
    if backend.endswith("Pil"):   # the same resize: the same pixels
      np.testing.assert_allclose(mine["patches"], batch["patches"], atol=1e-6)


def test_zero_shot_pipeline_as_shipped(tmp_path):
  """transformers' zero-shot pipeline, given only labels and a template, on an export at the
  64 tokens it pads SigLIP text to: siglip_jax's sigmoid probabilities."""
  transformers = pytest.importorskip("transformers")
  spec = {**_spec(), "text_len": 64}
  hf_siglip2.save(_random_params(spec, seed=1), spec, tmp_path / "hf", tok.Tokenizer())
  images = [Image.fromarray(im) for im in _images()]
  labels, template = ["red circle", "blue star", "green square"], "a photo of a {}."
  classify = transformers.pipeline("zero-shot-image-classification", model=str(tmp_path / "hf"))
  got = classify(images, candidate_labels=labels, hypothesis_template=template)
  ours = siglip_jax.load(tmp_path / "hf")
  logits = ours.t * ours.encode_image(images) @ ours.encode_strings(
      [template.format(x) for x in labels]).T + ours.b
  want = 1 / (1 + np.exp(-logits))
  for row, probs in zip(got, want):
    np.testing.assert_allclose([dict((r["label"], r["score"]) for r in row)[x] for x in labels],
                               probs, atol=1e-5)


def test_load_of_the_export_is_exact(run):
  workdir, params, ours, out = run
  src = inference.read_source(out)
  assert src.spec == {**_spec(), "image": dict(IMAGE)} and src.kind == "hf"
  assert sorted(src.params) == sorted(params)
  for name, value in params.items():
    assert np.array_equal(src.params[name], value), name
  back = siglip_jax.load(out)
  assert (back.image_size, back.max_num_patches, back.patch_size) == (None, BUDGET, 8)
  np.testing.assert_array_equal(back.tokenize(TEXTS), ours.tokenize(TEXTS))
  pre = hf_siglip2.preprocessor_config(src.spec)
  assert (pre["image_processor_type"], pre["max_num_patches"]) == ("Siglip2ImageProcessor", 64)


def _write_bv_npz(path, params, scanned):
  """A NaFlex checkpoint in big_vision's layout (naflex_vit.py names, `params/` prefix)."""
  flat = _scan_image_tower(params) if scanned else params
  np.savez(path, **{f"params/{k}": v for k, v in flat.items()})
  return path


@pytest.mark.parametrize("scanned", [False, True])
def test_load_of_a_big_vision_naflex_npz(run, tmp_path, scanned):
  _, params, ours, _ = run
  path = _write_bv_npz(str(tmp_path / "naflex.npz"), params, scanned)
  flat, spec = big_vision.load_npz(path)
  assert spec == {**_spec(), "image": dict(IMAGE), "max_num_patches": 256}   # no budget: 256
  assert all(np.array_equal(flat[k], v) for k, v in params.items())
  model = siglip_jax.load(path)
  assert model.image_size is None and model.max_num_patches == 256 and model.tokenizer is None
  batch = ours.preprocess(_images()[:2])
  np.testing.assert_allclose(model.encode_image(batch), ours.encode_image(batch), atol=1e-6)


def test_load_of_a_folder_transformers_wrote(tmp_path):
  """A Siglip2Model saved by transformers (its own names and config defaults, no processor
  config: the 256-patch default) loads and gives transformers' embeddings."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                patch_size=4, num_patches=9)
  text = dict(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
              num_attention_heads=2, max_position_embeddings=8, projection_size=32)
  torch.manual_seed(0)
  theirs = transformers.Siglip2Model(transformers.Siglip2Config(
      vision_config=vision, text_config=text)).eval()
  theirs.save_pretrained(tmp_path / "hf")
  model = siglip_jax.load(tmp_path / "hf")
  assert model.max_num_patches == 256 and model.patch_size == 4
  batch = model.preprocess(_images()[:3], max_num_patches=20)
  tokens = np.random.default_rng(0).integers(0, 50, (3, 8)).astype(np.int32)
  with torch.no_grad():
    res = theirs(input_ids=torch.from_numpy(tokens).long(),
                 pixel_values=torch.from_numpy(batch["patches"]),
                 pixel_attention_mask=torch.from_numpy(batch["patch_mask"]),
                 spatial_shapes=torch.from_numpy(batch["spatial_shapes"]).long())
  assert np.abs(res.image_embeds.numpy() - model.encode_image(batch)).max() < 1e-4
  assert np.abs(res.text_embeds.numpy() - model.encode_text(tokens)).max() < 1e-4


def test_handle_inputs(run):
  """A list (arrays or PIL) and the dict give the same embeddings, compiled once per length;
  padding patches (whatever they hold) change nothing; bad inputs are named."""
  _, _, ours, _ = run
  images = _images(seed=3)
  batch = ours.preprocess(images)
  assert batch["patches"].dtype == np.float32 and batch["patches"].shape == (4, BUDGET, 192)
  assert batch["patch_mask"].dtype == np.int32 and batch["spatial_shapes"].dtype == np.int32
  assert np.abs(batch["patches"]).max() <= 1
  assert not batch["patches"][batch["patch_mask"] == 0].any()   # padding is 0
  z = ours.encode_image(images)
  compiled = ours._img._cache_size()   # pylint: disable=protected-access
  np.testing.assert_array_equal(ours.encode_image(batch), z)
  np.testing.assert_array_equal(ours.encode_image([Image.fromarray(im) for im in images]), z)
  uint8 = naflex.encode_batch(images, 8, BUDGET)   # the loader's form: uint8 patches
  np.testing.assert_allclose(ours.encode_image(uint8), z, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
  np.testing.assert_allclose(ours.encode_image(images[1:3]), z[1:3], atol=1e-6)   # 2, not 4
  assert ours._img._cache_size() == compiled   # pylint: disable=protected-access

  # Padding is inert: 16-patch images padded to 64 with garbage in the padding.
  short = ours.preprocess(images, max_num_patches=16)
  padded = {"patches": np.random.default_rng(0).uniform(-1, 1, (4, BUDGET, 192)).astype(
      np.float32), "patch_mask": np.zeros((4, BUDGET), np.int32),
            "spatial_shapes": short["spatial_shapes"]}
  padded["patches"][:, :16], padded["patch_mask"][:, :16] = short["patches"], short["patch_mask"]
  np.testing.assert_allclose(ours.encode_image(padded), ours.encode_image(short), atol=1e-6)

  thin = np.zeros((1, 100, 3), np.uint8)   # 100 patches on its long side at one on its short
  with pytest.raises(ValueError, match=r"preprocess: image 1: an image of 1x100 pixels"):
    ours.encode_image([images[0], thin])
  with pytest.raises(ValueError, match="image 0 is a float32 array"):
    ours.preprocess([np.zeros((8, 8, 3), np.float32)])
  with pytest.raises(ValueError, match="takes a list of uint8"):
    ours.encode_image(np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match=r"lacks \['spatial_shapes'\]"):
    ours.encode_image({"patches": batch["patches"], "patch_mask": batch["patch_mask"]})
  with pytest.raises(ValueError, match="encode_patches is not implemented for NaFlex"):
    ours.encode_patches(images)
