"""big_vision `.npz` checkpoints in and out, against an independent float64 numpy re-implementation
of big_vision's two-tower SigLIP forward (vit.py, text_transformer.py, two_towers.py).

big_vision is not installable here, so "a checkpoint written by big_vision" is random weights
under the names and shapes big_vision's modules create, in the published `.npz` layout; the
reference forward below reads that file by those names and nothing from siglip_jax.
"""
import json
import math
import os

import numpy as np
import pytest

import siglip_jax
from siglip_jax import convert, model_init, models
from siglip_jax.interop import big_vision

# Deliberately off the named variants: every dimension is inferred from the arrays.
IMG = dict(width=48, heads=3, depth=2, mlp=96, patch=8, size=32)
TXT = dict(width=40, heads=4, depth=2, mlp=80, vocab=100, len=12, out=48)  # out = image width


# ------------------------------------------------------------------ big_vision-named weights

def _block_names(prefix, d, heads, mlp):
  hd = d // heads
  att = prefix + "MultiHeadDotProductAttention_0/"
  shapes = {att + f"{n}/kernel": (d, heads, hd) for n in ("query", "key", "value")}
  shapes.update({att + f"{n}/bias": (heads, hd) for n in ("query", "key", "value")})
  shapes.update({att + "out/kernel": (heads, hd, d), att + "out/bias": (d,),
                 prefix + "MlpBlock_0/Dense_0/kernel": (d, mlp),
                 prefix + "MlpBlock_0/Dense_0/bias": (mlp,),
                 prefix + "MlpBlock_0/Dense_1/kernel": (mlp, d),
                 prefix + "MlpBlock_0/Dense_1/bias": (d,)})
  return shapes


def _norm(prefix, d):
  return {prefix + "scale": (d,), prefix + "bias": (d,)}


def bv_shapes(pool="map", txt_head=TXT["out"], bias=True):
  """{name: shape} of big_vision's two_towers.Model(image=vit(pool_type=pool), text=...)."""
  d, t = IMG["width"], TXT["width"]
  g = IMG["size"] // IMG["patch"]
  s = {"t": (1,), "img/embedding/kernel": (IMG["patch"], IMG["patch"], 3, d),
       "img/embedding/bias": (d,), "img/pos_embedding": (1, g * g, d),
       **_norm("img/Transformer/encoder_norm/", d)}
  for i in range(IMG["depth"]):
    p = f"img/Transformer/encoderblock_{i}/"
    s.update({**_block_names(p, d, IMG["heads"], IMG["mlp"]), **_norm(p + "LayerNorm_0/", d),
              **_norm(p + "LayerNorm_1/", d)})
  if pool == "map":
    s.update({"img/MAPHead_0/probe": (1, 1, d), **_norm("img/MAPHead_0/LayerNorm_0/", d),
              **_block_names("img/MAPHead_0/", d, IMG["heads"], IMG["mlp"])})
  s.update({"txt/Embed_0/embedding": (TXT["vocab"], t), "txt/pos_embedding": (1, TXT["len"], t),
            **_norm("txt/Encoder_0/encoder_norm/", t)})
  for i in range(TXT["depth"]):
    p = f"txt/Encoder_0/encoderblock_{i}/"
    s.update({**_block_names(p, t, TXT["heads"], TXT["mlp"]), **_norm(p + "LayerNorm_0/", t),
              **_norm(p + "LayerNorm_1/", t)})
  if txt_head:
    s.update({"txt/head/kernel": (t, txt_head), "txt/head/bias": (txt_head,)})
  if bias:
    s["b"] = (1,)
  return s


def bv_weights(seed=0, **kw):
  rng = np.random.default_rng(seed)
  w = {}
  for name, shape in bv_shapes(**kw).items():
    if name.endswith("scale"):
      w[name] = 1 + 0.1 * rng.standard_normal(shape)
    elif name.endswith("kernel") or name.endswith("embedding") or name.endswith("probe"):
      fan_in = shape[0] if len(shape) != 4 else int(np.prod(shape[:3]))
      w[name] = rng.standard_normal(shape) / math.sqrt(fan_in)
    else:
      w[name] = 0.1 * rng.standard_normal(shape)
  w["t"], w["b"] = np.array([math.log(10.0) + 0.1]), np.array([-10.0 + 0.3])
  if "b" not in bv_shapes(**kw):
    del w["b"]
  return {k: v.astype(np.float32) for k, v in w.items()}


def write_npz(path, w, *, scanned=False, prefix=True):
  """As big_vision saves: '/'-joined names under params/; scanned blocks stacked on axis 0."""
  out = {}
  for name, arr in w.items():
    if scanned and "/encoderblock_" in name:
      head, rest = name.split("/encoderblock_", 1)
      i, rest = rest.split("/", 1)
      key = f"{head}/encoderblock/{rest}"
      depth = IMG["depth"] if name.startswith("img/") else TXT["depth"]
      out.setdefault(key, np.zeros((depth,) + arr.shape, arr.dtype))[int(i)] = arr
    else:
      out[name] = arr
  np.savez(path, **{("params/" if prefix else "") + k: v for k, v in out.items()})
  return str(path)


# ------------------------------------------------------------------ big_vision's forward, numpy

class Reference:
  """big_vision's two_towers forward in float64, reading the `.npz` by big_vision's names
  (tower depths: IMG's and TXT's, or those of a two_towers `model` config)."""

  def __init__(self, path, model_cfg=None):
    with np.load(path, allow_pickle=False) as f:
      raw = {k: f[k].astype(np.float64) for k in f.files}
    self.w = {k.removeprefix("params/"): v for k, v in raw.items()}
    self.depths = ((model_cfg["image"]["depth"], model_cfg["text"]["depth"]) if model_cfg
                   else (IMG["depth"], TXT["depth"]))

  def p(self, name, layer=None):
    if layer is None:
      return self.w[name]
    head, rest = name.split("/encoderblock/")
    per_layer = f"{head}/encoderblock_{layer}/{rest}"
    return self.w[per_layer] if per_layer in self.w else self.w[name][layer]  # scanned: [depth]

  @staticmethod
  def ln(x, scale, bias):  # flax LayerNorm, epsilon 1e-6
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * scale + bias

  @staticmethod
  def gelu(x):  # flax nn.gelu's default: the tanh approximation
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

  def attention(self, pre, xq, xkv, layer=None):  # flax MultiHeadDotProductAttention
    g = lambda n: self.p(pre + n, layer)  # noqa: E731
    q = np.einsum("nld,dhk->nlhk", xq, g("query/kernel")) + g("query/bias")
    k = np.einsum("nld,dhk->nlhk", xkv, g("key/kernel")) + g("key/bias")
    v = np.einsum("nld,dhk->nlhk", xkv, g("value/kernel")) + g("value/bias")
    logits = np.einsum("nqhk,nlhk->nhql", q, k) / math.sqrt(q.shape[-1])
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = np.einsum("nhql,nlhk->nqhk", a, v)
    return np.einsum("nqhk,hkd->nqd", y, g("out/kernel")) + g("out/bias")

  def mlp(self, pre, x, layer=None):
    g = lambda n: self.p(pre + n, layer)  # noqa: E731
    h = self.gelu(x @ g("Dense_0/kernel") + g("Dense_0/bias"))
    return h @ g("Dense_1/kernel") + g("Dense_1/bias")

  def encoder(self, pre, x, depth):
    b = pre + "encoderblock/"
    for i in range(depth):
      y = self.ln(x, self.p(b + "LayerNorm_0/scale", i), self.p(b + "LayerNorm_0/bias", i))
      x = x + self.attention(b + "MultiHeadDotProductAttention_0/", y, y, i)
      y = self.ln(x, self.p(b + "LayerNorm_1/scale", i), self.p(b + "LayerNorm_1/bias", i))
      x = x + self.mlp(b + "MlpBlock_0/", y, i)
    return self.ln(x, self.p(pre + "encoder_norm/scale"), self.p(pre + "encoder_norm/bias"))

  def image(self, images):  # vit.py: conv stem, posemb, encoder, MAP head
    kernel = self.p("img/embedding/kernel")
    p, d = kernel.shape[0], kernel.shape[-1]
    n, h, w, c = images.shape
    patches = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = patches.reshape(n, -1, p * p * c) @ kernel.reshape(-1, d) + self.p("img/embedding/bias")
    x = x + self.p("img/pos_embedding")
    x = self.encoder("img/Transformer/", x, self.depths[0])
    probe = np.tile(self.p("img/MAPHead_0/probe"), (n, 1, 1))
    x = self.attention("img/MAPHead_0/MultiHeadDotProductAttention_0/", probe, x)
    ln = "img/MAPHead_0/LayerNorm_0/"
    y = self.ln(x, self.p(ln + "scale"), self.p(ln + "bias"))
    x = (x + self.mlp("img/MAPHead_0/MlpBlock_0/", y))[:, 0]
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)

  def text(self, ids):  # text_transformer.py: embed, posemb, encoder, last token, head
    x = self.p("txt/Embed_0/embedding")[ids] + self.p("txt/pos_embedding")
    x = self.encoder("txt/Encoder_0/", x, self.depths[1])[:, -1]
    x = x @ self.p("txt/head/kernel") + self.p("txt/head/bias")
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)


def inputs(seed=1, n=3):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (n, IMG["size"], IMG["size"], 3)).astype(np.float32)
  return images, rng.integers(0, TXT["vocab"], (n, TXT["len"])).astype(np.int32)


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("scanned,prefix", [(False, True), (True, False)])
def test_load_reproduces_big_vision(tmp_path, scanned, prefix):
  path = write_npz(tmp_path / "siglip.npz", bv_weights(), scanned=scanned, prefix=prefix)
  ref, model = Reference(path), siglip_jax.load(path)
  images, tokens = inputs()
  assert (model.image_size, model.text_len, model.vocab_size) == (32, 12, 100)
  assert np.abs(model.encode_image(images) - ref.image(images)).max() < 1e-4
  assert np.abs(model.encode_text(tokens) - ref.text(tokens)).max() < 1e-4
  assert model.t == pytest.approx(math.exp(ref.p("t")[0]), rel=1e-6)
  assert model.b == pytest.approx(ref.p("b")[0], rel=1e-6)
  assert model.tokenizer is None   # nothing says which SentencePiece model it was trained with


def test_all_four_layouts_read_the_same(tmp_path):
  w = bv_weights()
  read = [big_vision.load_npz(write_npz(tmp_path / f"{s}{p}.npz", w, scanned=s, prefix=p))
          for s in (False, True) for p in (False, True)]
  for flat, spec in read:
    assert spec == read[0][1] and sorted(flat) == sorted(w)
    assert all(np.array_equal(flat[k], w[k]) for k in w)


def test_old_double_text_posemb_is_merged(tmp_path):
  w = bv_weights()
  extra = np.full_like(w["txt/pos_embedding"], 0.25)
  old = {**w, "txt/Encoder_0/pos_embedding": extra,
         "txt/pos_embedding": w["txt/pos_embedding"] - extra}
  flat, _ = big_vision.load_npz(write_npz(tmp_path / "old.npz", old))
  np.testing.assert_allclose(flat["txt/pos_embedding"], w["txt/pos_embedding"], atol=1e-6)


def test_inferred_spec_has_every_dimension(tmp_path):
  _, spec = big_vision.load_npz(write_npz(tmp_path / "s.npz", bv_weights(), scanned=True))
  assert spec["image"] == dict(patch_size=(8, 8), width=48, depth=2, mlp_dim=96, num_heads=3,
                               pool_type="map", posemb="learn", rep_size=False)
  assert spec["text"] == dict(width=40, depth=2, mlp_dim=80, num_heads=4, vocab_size=100,
                              pool_type="last")
  assert (spec["out_dim"], spec["image_size"], spec["text_len"]) == ((None, 48), 32, 12)
  # Without MAP head and cls token the image tower pools by averaging, as big_vision's default.
  gap = {k: v for k, v in bv_weights().items() if not k.startswith("img/MAPHead_0/")}
  assert big_vision.infer_spec(gap)["image"]["pool_type"] == "gap"


def test_converted_to_hf_reproduces_big_vision_in_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  path = write_npz(tmp_path / "siglip.npz", bv_weights(seed=3))
  with pytest.warns(UserWarning, match="pads SigLIP text to 64"), \
       pytest.warns(UserWarning, match="no tokenizer files"):   # 12 tokens; a bare .npz
    convert.convert(path, "hf", tmp_path / "hf")
  hf_model = transformers.SiglipModel.from_pretrained(tmp_path / "hf").eval()
  images, tokens = inputs(seed=4)
  with torch.no_grad():
    out = hf_model(input_ids=torch.from_numpy(tokens).long(),
                   pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
  ref = Reference(path)
  assert np.abs(out.image_embeds.numpy() - ref.image(images)).max() < 1e-4
  assert np.abs(out.text_embeds.numpy() - ref.text(tokens)).max() < 1e-4
  assert hf_model.logit_scale.item() == pytest.approx(ref.p("t")[0], rel=1e-6)
  assert hf_model.logit_bias.item() == pytest.approx(ref.p("b")[0], rel=1e-6)


# The keyword arguments of big_vision's two_towers.Model, vit.Model and text_transformer.Model
# (big_vision/models/...; `scan` and the dtypes only in newer versions of the towers).
TWO_TOWERS_FIELDS = {"image", "text", "image_model", "text_model", "out_dim", "temperature_init",
                     "bias_init"}
TWO_TOWERS_DEFAULTS = {"out_dim": 128, "temperature_init": 1.0, "bias_init": None}   # its own
VIT_FIELDS = {"patch_size", "width", "depth", "mlp_dim", "num_heads", "posemb", "rep_size",
              "dropout", "pool_type", "head_zeroinit", "variant"}
TEXT_FIELDS = {"width", "depth", "mlp_dim", "num_heads", "dropout", "vocab_size", "pool_type",
               "scan", "remat_policy", "variant"}


@pytest.mark.parametrize("bias", [True, False])
def test_two_towers_json_beside_the_export_rebuilds_the_model(tmp_path, bias):
  """big_vision builds the model as `two_towers.Model(**cfg.model)` and loads the `.npz` with
  `two_towers.load(None, path, cfg.model)`, which reads `b` only when `bias_init` is a key. The
  model the JSON describes, on the exported weights, is the reference forward."""
  import jax
  from flax import traverse_util
  src = write_npz(tmp_path / "src.npz", bv_weights(seed=7, bias=bias), scanned=True)
  out = tmp_path / "export" / "siglip.npz"
  convert.convert(src, "big_vision", out)
  cfg = json.loads((tmp_path / "export" / "siglip.json").read_text())
  assert cfg["model_name"] == "proj.image_text.two_towers" and "pp_txt" not in cfg   # no tokenizer
  model_cfg = cfg["model"]
  assert set(model_cfg) <= TWO_TOWERS_FIELDS and ("bias_init" in model_cfg) == bias
  assert set(model_cfg["image"]) <= VIT_FIELDS and set(model_cfg["text"]) <= TEXT_FIELDS
  assert not (tmp_path / "export" / "siglip.model").exists()
  with np.load(out, allow_pickle=False) as f:   # by name, as big_vision's load_params does
    params = traverse_util.unflatten_dict({k.removeprefix("params/"): f[k] for k in f.files},
                                          sep="/")
  # siglip_jax's two_towers takes big_vision's config; big_vision's defaults fill what is left out.
  model = models.from_config({**TWO_TOWERS_DEFAULTS, **model_cfg})
  images, tokens = inputs(seed=8)
  zimg, ztxt, extra = jax.jit(model.apply)({"params": params}, images, tokens)
  ref = Reference(out, model_cfg)
  assert np.abs(np.asarray(zimg) - ref.image(images)).max() < 1e-4
  assert np.abs(np.asarray(ztxt) - ref.text(tokens)).max() < 1e-4
  assert float(extra["t"][0]) == pytest.approx(math.exp(ref.p("t")[0]), rel=1e-6)
  if bias:
    assert float(extra["b"][0]) == pytest.approx(ref.p("b")[0], rel=1e-6)
  else:
    assert "b" not in extra


def test_round_trip_is_exact(tmp_path):
  flat, spec = big_vision.load_npz(write_npz(tmp_path / "a.npz", bv_weights(), scanned=True))
  big_vision.save_npz(flat, tmp_path / "b.npz")
  with np.load(tmp_path / "b.npz", allow_pickle=False) as f:   # the published layout
    assert all(k.startswith("params/") and "/encoderblock/" not in k for k in f.files)
  again, spec2 = big_vision.load_npz(tmp_path / "b.npz")
  assert spec2 == spec and sorted(again) == sorted(flat)
  assert all(np.array_equal(again[k], flat[k]) for k in flat)


def test_model_init_from_npz_resamples_and_keeps_dont_load(tmp_path):
  import jax
  import jax.numpy as jnp
  path = write_npz(tmp_path / "init.npz", bv_weights())
  flat, spec = big_vision.load_npz(path)
  # Fine-tune at 48 px (6x6 patches instead of 4x4) with scanned blocks, a fresh text head.
  cfg = big_vision.model_config(spec)
  cfg["image"]["scan"] = True
  model = models.from_config(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 48, 48, 3)),
                            jnp.zeros((1, 12), jnp.int32))   # compiling an init takes seconds
  rng = np.random.default_rng(5)
  init = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), abstract)
  params = model_init.load_init_params(path, init["params"], dont_load=[r"txt/head/.*"])
  np.testing.assert_array_equal(params["img"]["Transformer"]["encoderblock"]["MlpBlock_0"][
      "Dense_0"]["kernel"][1], flat["img/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel"])
  assert params["img"]["pos_embedding"].shape == (1, 36, 48)
  np.testing.assert_array_equal(params["txt"]["head"]["kernel"],
                                init["params"]["txt"]["head"]["kernel"])
  block = params["txt"]["Encoder_0"]["encoderblock_1"]   # per-layer, as in the file
  np.testing.assert_array_equal(block["LayerNorm_0"]["scale"],
                                flat["txt/Encoder_0/encoderblock_1/LayerNorm_0/scale"])
  np.testing.assert_array_equal(params["t"], flat["t"])


# ------------------------------------------------------------------ bad input

def _save(tmp_path, w, **kw):
  return write_npz(tmp_path / "bad.npz", w, **kw)


def test_not_a_siglip_checkpoint(tmp_path):
  np.savez(tmp_path / "other.npz", **{"params/conv1/kernel": np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match="not a SigLIP two-tower checkpoint"):
    siglip_jax.load(tmp_path / "other.npz")
  (tmp_path / "text.npz").write_text("hello")
  with pytest.raises(ValueError, match="not a readable .npz"):
    siglip_jax.load(tmp_path / "text.npz")


def test_pickled_arrays_are_refused(tmp_path):
  w = {("params/" + k): v for k, v in bv_weights().items()}
  w["params/txt/extra"] = np.array([{"evil": 1}], dtype=object)
  np.savez(tmp_path / "pickled.npz", **w)   # np.savez pickles object arrays
  with pytest.raises(ValueError, match="txt/extra' is a pickled object array"):
    siglip_jax.load(tmp_path / "pickled.npz")


def test_missing_and_extra_arrays_are_named(tmp_path):
  w = bv_weights()
  del w["txt/Encoder_0/encoderblock_1/MlpBlock_0/Dense_1/bias"]
  w["img/Transformer/encoderblock_0/Surprise/kernel"] = np.zeros((2, 2), np.float32)
  with pytest.raises(ValueError) as e:
    siglip_jax.load(_save(tmp_path, w))
  assert "missing 1 arrays: txt/Encoder_0/encoderblock_1/MlpBlock_0/Dense_1/bias" in str(e.value)
  assert "unexpected arrays: img/Transformer/encoderblock_0/Surprise/kernel" in str(e.value)
  w = bv_weights()
  del w["img/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"]
  with pytest.raises(ValueError, match="missing array img/Transformer/encoderblock_0/.*query"):
    siglip_jax.load(_save(tmp_path, w))


def test_contradicting_shapes_are_named(tmp_path):
  w = bv_weights()
  w["txt/Encoder_0/encoderblock_1/MlpBlock_0/Dense_0/kernel"] = np.zeros((40, 64), np.float32)
  with pytest.raises(ValueError, match=r"contradict.*encoderblock_1/MlpBlock_0/Dense_0/kernel "
                                       r"\(40, 64\) \(expected \(40, 80\)\)"):
    siglip_jax.load(_save(tmp_path, w))
  w = bv_weights()
  w["img/pos_embedding"] = np.zeros((1, 15, 48), np.float32)
  with pytest.raises(ValueError, match="15 positions, not a square grid"):
    siglip_jax.load(_save(tmp_path, w))
  w = bv_weights()   # scanned blocks whose depths disagree
  path = _save(tmp_path, w, scanned=True)
  with np.load(path) as f:
    arrays = dict(f)
  arrays["params/img/Transformer/encoderblock/LayerNorm_0/bias"] = np.zeros((3, 48), np.float32)
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match="disagree on the depth"):
    siglip_jax.load(path)


def test_load_of_a_missing_path(tmp_path):
  with pytest.raises(FileNotFoundError):
    siglip_jax.load(os.path.join(tmp_path, "nowhere.npz"))
