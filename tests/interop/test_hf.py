"""HF transformers SigLIP folders: exact round trips, what HF cannot hold, the tokenizer files,
and reading configs that leave transformers' defaults out (as the published ones do)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from siglip_jax import models
from siglip_jax.data import tokenizer as tok
from siglip_jax.interop import big_vision, hf

SPEC = {
    "image": dict(patch_size=(4, 4), width=24, depth=2, mlp_dim=40, num_heads=2, pool_type="map",
                  posemb="learn", rep_size=False),
    "text": dict(width=16, depth=1, mlp_dim=32, num_heads=4, vocab_size=256, pool_type="last"),
    "out_dim": (None, 24), "bias_init": -10.0, "image_size": 16, "text_len": 8,
}


def random_params(spec, seed=0, scan=False):
  """Random float32 weights for `spec` in our layout (abstract init: nothing compiled)."""
  cfg = big_vision.model_config(spec)
  cfg["image"]["scan"] = scan
  model = models.from_config(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, spec["image_size"], spec["image_size"], 3)),
                            jnp.zeros((1, spec["text_len"]), jnp.int32))["params"]
  rng = np.random.default_rng(seed)
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  return {"/".join(k.key for k in path): rng.standard_normal(a.shape).astype(np.float32)
          for path, a in flat}


@pytest.mark.parametrize("scan", [False, True])
def test_round_trip_is_exact(tmp_path, scan):
  params = random_params(SPEC, scan=scan)
  hf.save(params, SPEC, tmp_path / "hf")
  back, spec, sp = hf.load(tmp_path / "hf")
  assert spec == SPEC and sp is None
  flat = big_vision.unscan(params)
  assert sorted(back) == sorted(flat)
  for name in flat:
    assert back[name].dtype == np.float32 and np.array_equal(back[name], flat[name]), name


def test_layout_of_the_hf_tensors(tmp_path):
  params = random_params(SPEC)
  hf.save(params, SPEC, tmp_path / "hf")
  t = load_file(tmp_path / "hf" / hf.WEIGHTS)
  q = params["img/Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel"]
  np.testing.assert_array_equal(
      t["vision_model.encoder.layers.1.self_attn.q_proj.weight"], q.reshape(24, 24).T)
  np.testing.assert_array_equal(t["vision_model.embeddings.patch_embedding.weight"],
                                params["img/embedding/kernel"].transpose(3, 2, 0, 1))
  packed = t["vision_model.head.attention.in_proj_weight"]
  assert packed.shape == (72, 24)
  v = params["img/MAPHead_0/MultiHeadDotProductAttention_0/value/kernel"]
  np.testing.assert_array_equal(packed[48:], v.reshape(24, 24).T)
  assert t["text_model.embeddings.position_embedding.weight"].shape == (8, 16)
  np.testing.assert_array_equal(t["logit_scale"], params["t"])
  cfg = json.loads((tmp_path / "hf" / hf.CONFIG).read_text())
  acts = {cfg["vision_config"]["hidden_act"], cfg["text_config"]["hidden_act"]}
  assert acts == {"gelu_pytorch_tanh"}
  assert cfg["text_config"]["projection_size"] == 24


@pytest.mark.parametrize("change,words", [
    ({"image": {"pool_type": "gap"}}, "image pooling is 'gap'"),
    ({"image": {"pool_type": "tok"}}, "image pooling is 'tok'"),
    ({"out_dim": (24, 24)}, "the image tower has a head"),
    ({"text": {"pool_type": "first"}}, "text pooling is 'first'"),
    ({"out_dim": (None, 32)}, "text head's width 32 differs"),
    ({"bias_init": None}, "no logit bias"),
])
def test_models_hf_cannot_hold_are_refused(tmp_path, change, words):
  spec = {k: ({**v, **change[k]} if isinstance(v, dict) and k in change else change.get(k, v))
          for k, v in SPEC.items()}
  with pytest.raises(ValueError, match="does not fit HF transformers' SigLIP") as e:
    hf.save({}, spec, tmp_path / "hf")
  assert words in str(e.value)
  assert not (tmp_path / "hf").exists()


def test_a_sincos_position_embedding_is_exported_as_its_table():
  """HF's learned table then adds exactly what the model adds (parity of a whole sincos2d model
  in transformers: tests/objectives/test_locca_run.py)."""
  from siglip_jax.models.vit import posemb_sincos_2d
  spec = {**SPEC, "image": {**SPEC["image"], "posemb": "sincos2d"}}
  flat, out = hf.sincos_as_table({"img/x": 1}, spec)
  assert out["image"]["posemb"] == "learn" and spec["image"]["posemb"] == "sincos2d"
  ph, pw = SPEC["image"]["patch_size"]
  grid = (SPEC["image_size"] // ph, SPEC["image_size"] // pw)
  np.testing.assert_array_equal(flat["img/pos_embedding"],
                                posemb_sincos_2d(*grid, SPEC["image"]["width"]))
  assert flat["img/x"] == 1
  hf.check_exportable(out)


def test_tokenizer_files_load_in_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  ours = tok.Tokenizer()   # the demo's SentencePiece model
  hf.save(random_params(SPEC), SPEC, tmp_path / "hf", ours)
  assert (tmp_path / "hf" / "spiece.model").read_bytes() == open(tok.DEMO_MODEL, "rb").read()
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  texts = ["a red circle", "A photo of a BIG blue square.", "there is a red star, isn't there?"]
  enc = theirs(texts, padding="max_length", max_length=SPEC["text_len"], truncation=True)
  assert list(enc) == ["input_ids"]   # no attention mask: training attended to the padding
  np.testing.assert_array_equal(np.array(enc.input_ids), ours.encode(texts, SPEC["text_len"]))
  cfg = json.loads((tmp_path / "hf" / hf.CONFIG).read_text())["text_config"]
  assert cfg["eos_token_id"] == cfg["pad_token_id"] == ours.eos_id   # sticky EOS padding
  assert hf.load(tmp_path / "hf")[2] == os.path.join(tmp_path / "hf", "spiece.model")


def test_export_warnings():
  assert hf.export_warnings({**SPEC, "text_len": 64}, tok.Tokenizer()) == []
  (short,) = hf.export_warnings(SPEC, tok.Tokenizer())   # 8 tokens
  assert "pads SigLIP text to 64 tokens" in short and "AutoModel + AutoProcessor" in short
  (none,) = hf.export_warnings({**SPEC, "text_len": 64})
  assert "no tokenizer files" in none
  (append,) = hf.export_warnings({**SPEC, "text_len": 64}, tok.Tokenizer(eos="append"))
  assert "eos='append'" in append


def test_published_style_config_fills_transformers_defaults(tmp_path):
  (tmp_path / hf.CONFIG).write_text(json.dumps({
      "model_type": "siglip", "text_config": {"model_type": "siglip_text_model"},
      "vision_config": {"model_type": "siglip_vision_model", "image_size": 384}}))
  spec = hf.read_config(tmp_path)
  assert spec["image"]["width"] == 768 and spec["image"]["depth"] == 12
  assert (spec["image_size"], spec["text_len"], spec["out_dim"]) == (384, 64, (None, 768))
  assert spec["text"]["vocab_size"] == 32000


@pytest.mark.parametrize("edit,words", [
    (lambda c, t: c.update(model_type="siglip2"), "model_type 'siglip2'"),
    (lambda c, t: c["vision_config"].update(vision_use_head=False), "vision_use_head is false"),
    (lambda c, t: c["text_config"].update(hidden_act="gelu"), "hidden_act 'gelu'"),
    (lambda c, t: t.pop("text_model.head.bias"), "missing text_model.head.bias"),
    (lambda c, t: t.update(extra=np.zeros(2, np.float32)), "unexpected extra"),
    (lambda c, t: c["text_config"].update(max_position_embeddings=9),
     "text_model.embeddings.position_embedding.weight has shape (8, 16)"),
], ids=["siglip2", "no_head", "exact_gelu", "missing", "extra", "wrong_len"])
def test_bad_hf_folders_are_named(tmp_path, edit, words):
  hf.save(random_params(SPEC), SPEC, tmp_path)
  cfg = json.loads((tmp_path / hf.CONFIG).read_text())
  tensors = load_file(tmp_path / hf.WEIGHTS)
  edit(cfg, tensors)
  (tmp_path / hf.CONFIG).write_text(json.dumps(cfg))
  save_file(tensors, tmp_path / hf.WEIGHTS)
  with pytest.raises(ValueError) as e:
    hf.load(tmp_path)
  assert words in str(e.value)
