"""Forward numerics against an independent float64 numpy re-implementation of big_vision's
SigLIP (pre-LN blocks, eps 1e-6, tanh GELU, MAP head, last-token pooling, no text mask)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax.models import TwoTowers, ViT
from siglip_jax.models.transformer import Encoder

TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=48)
IMAGE_SHAPE = (3, 8, 12, 3)  # non-square: catches a swapped h/w in the patch order
TEXT_SHAPE = (3, 7)
VOCAB = 50


def tiny_model(scan=False, remat_policy="none", dtype=jnp.float32, out_dim=16):
  return TwoTowers(
      image=dict(patch_size=(4, 4), pool_type="map", scan=scan, remat_policy=remat_policy,
                 **TINY),
      text=dict(vocab_size=VOCAB, scan=scan, remat_policy=remat_policy, **TINY),
      out_dim=out_dim, dtype=dtype)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, IMAGE_SHAPE).astype(np.float32)
  text = rng.integers(2, VOCAB, TEXT_SHAPE).astype(np.int32)
  text[0, 4:] = 1  # sticky EOS padding
  return jnp.asarray(image), jnp.asarray(text)


@pytest.fixture(scope="module")
def params(inputs):
  """Random values in the model's (abstract) param tree, drawn with numpy: compiling `init`
  costs seconds on CPU, and random LN scales, biases and heads make every parameter matter."""
  rng = np.random.default_rng(1)
  shapes = jax.eval_shape(tiny_model().init, jax.random.key(0), *inputs)["params"]

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.asarray(1 + 0.2 * rng.standard_normal(x.shape), x.dtype)
    if "bias" in name or x.ndim < 2:
      std = 0.2
    elif any(f"'{n}'" in name for n in ("query", "key", "value")):
      std = 1 / math.sqrt(x.shape[0])  # [D, heads, head_dim]: fan-in D
    elif "Embed_0" in name:
      std = 1.0
    else:
      std = 1 / math.sqrt(np.prod(x.shape[:-1]))  # fan-in of [..., out] kernels
    return jnp.asarray(std * rng.standard_normal(x.shape), x.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def loss_fn(model, image, text):
  """value_and_grad of a scalar depending on every output; forward outputs come back as aux."""
  def f(p):
    zimg, ztxt, out = model.apply({"params": p}, image, text)
    return jnp.sum(out["t"] * (zimg @ ztxt.T) + out["b"]), (zimg, ztxt, out)
  return jax.jit(jax.value_and_grad(f, has_aux=True))


@pytest.fixture(scope="module")
def f32_run(inputs, params):
  """One compile of the per-layer float32 model, shared by the tests below."""
  (_, (zimg, ztxt, out)), grads = loss_fn(tiny_model(), *inputs)(params)
  return zimg, ztxt, out, grads


# ---------------------------------------------------------------- the numpy reference (float64)
def np_tree(p):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), p)


def layer_norm(p, x, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def attention(p, xq, xkv):
  proj = lambda n, x: np.einsum("bld,dhk->blhk", x, p[n]["kernel"]) + p[n]["bias"]  # noqa
  q, k, v = proj("query", xq), proj("key", xkv), proj("value", xkv)
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  y = np.einsum("bhqs,bshk->bqhk", w, v)
  return np.einsum("bqhk,hkd->bqd", y, p["out"]["kernel"]) + p["out"]["bias"]


def mlp(p, x):
  h = gelu_tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def encoder(p, x, eps=1e-6):
  i = 0
  while f"encoderblock_{i}" in p:
    b = p[f"encoderblock_{i}"]
    y = layer_norm(b["LayerNorm_0"], x, eps)
    x = x + attention(b["MultiHeadDotProductAttention_0"], y, y)
    x = x + mlp(b["MlpBlock_0"], layer_norm(b["LayerNorm_1"], x, eps))
    i += 1
  return layer_norm(p["encoder_norm"], x, eps)


def map_head(p, x):
  probe = np.tile(p["probe"], [x.shape[0], 1, 1])
  y = attention(p["MultiHeadDotProductAttention_0"], probe, x)
  y = y + mlp(p["MlpBlock_0"], layer_norm(p["LayerNorm_0"], y))
  return y[:, 0]


def np_image_tower(p, image, patch):
  n, h, w, c = image.shape
  gh, gw = h // patch, w // patch
  patches = image.reshape(n, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(n, gh * gw, patch * patch * c)
  kernel = p["embedding"]["kernel"].reshape(patch * patch * c, -1)
  x = patches @ kernel + p["embedding"]["bias"] + p["pos_embedding"]
  x = map_head(p["MAPHead_0"], encoder(p["Transformer"], x))
  return x @ p["head"]["kernel"] + p["head"]["bias"]


def np_text_tower(p, text):
  x = p["Embed_0"]["embedding"][text] + p["pos_embedding"]
  x = encoder(p["Encoder_0"], x)[:, -1]  # last token (sticky EOS), no padding mask
  return x @ p["head"]["kernel"] + p["head"]["bias"]


def np_normalize(z):
  return z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-8)


# ---------------------------------------------------------------- tests
def test_forward_matches_numpy_reference(inputs, params, f32_run):
  image, text = inputs
  zimg, ztxt, out, _ = f32_run
  p = np_tree(params)
  ref_img = np_normalize(np_image_tower(p["img"], np.asarray(image, np.float64), 4))
  ref_txt = np_normalize(np_text_tower(p["txt"], np.asarray(text)))
  np.testing.assert_allclose(zimg, ref_img, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(ztxt, ref_txt, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(out["t"], np.exp(p["t"]), rtol=1e-6)
  np.testing.assert_allclose(out["b"], p["b"], rtol=1e-6)
  np.testing.assert_allclose(out["t/parameter"], p["t"], rtol=1e-6)
  assert zimg.dtype == ztxt.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ztxt, axis=1), 1.0, rtol=1e-5)
  assert out["img/encoded"].shape == (3, 6, 32) and out["txt/transformed"].shape == (3, 7, 32)
  assert out["img/pre_logits_2d"].shape == (3, 2, 3, 32)
  # The numbers are not degenerate: the embeddings differ across the batch.
  assert np.abs(ref_img[0] - ref_img[1]).max() > 1e-2 and np.abs(ref_txt[0] - ref_txt[1]).max() > 1e-2


def test_layer_norm_epsilon_is_big_vision_1e6(params):
  # Features of size ~1e-3 have a variance near eps, so 1e-6 vs flax-torch's 1e-5 shows.
  enc_params = params["txt"]["Encoder_0"]
  x = 1e-3 * np.random.default_rng(2).standard_normal((2, 5, TINY["width"]))
  enc = Encoder(depth=TINY["depth"], mlp_dim=TINY["mlp_dim"], num_heads=TINY["num_heads"],
                remat_policy="none")
  y, _ = jax.jit(enc.apply)({"params": enc_params}, jnp.asarray(x, jnp.float32))
  p = np_tree(enc_params)
  np.testing.assert_allclose(y, encoder(p, x), atol=1e-4, rtol=1e-4)
  assert np.abs(encoder(p, x, eps=1e-5) - encoder(p, x)).max() > 1e-2  # the check has teeth


def test_init_values_follow_siglip():
  # Without inputs no tower is built: `init` then makes only t and b (cheap to compile).
  p = jax.jit(TwoTowers().init)(jax.random.key(0), None, None)["params"]
  assert set(p) == {"t", "b"}
  np.testing.assert_allclose(p["t"], [math.log(10.0)], rtol=1e-6)
  np.testing.assert_allclose(p["b"], [-10.0])
  assert "b" not in jax.jit(TwoTowers(bias_init=None).init)(jax.random.key(0), None)["params"]
  vit = ViT(width=8, depth=0, num_heads=2, patch_size=(4, 4), pool_type="gap", num_classes=3)
  head = jax.jit(vit.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]["head"]
  assert not np.any(head["kernel"])  # big_vision's head_zeroinit


def test_one_tower_inputs_may_be_none(inputs, params):
  image, text = inputs
  model = tiny_model()
  run = lambda i, t: jax.eval_shape(  # noqa: E731
      lambda p: model.apply({"params": p}, i, t), params)
  zimg, ztxt, out = run(image, None)
  assert ztxt is None and zimg.shape == (3, 16) and "txt/norm" not in out and "t" in out
  zimg, ztxt, out = run(None, text)
  assert zimg is None and ztxt.shape == (3, 16) and "img/norm" not in out and "b" in out


def restack(params):
  """Per-layer `encoderblock_{i}` -> one scanned `encoderblock` with a leading depth axis."""
  def stack(enc):
    enc = dict(enc)
    blocks = [enc.pop(f"encoderblock_{i}") for i in range(TINY["depth"])]
    enc["encoderblock"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return enc
  return {**params, "img": {**params["img"], "Transformer": stack(params["img"]["Transformer"])},
          "txt": {**params["txt"], "Encoder_0": stack(params["txt"]["Encoder_0"])}}


def test_scan_and_remat_match_the_per_layer_model(inputs, params, f32_run):
  image, text = inputs
  zimg, ztxt, _, grads = f32_run
  scanned = restack(params)
  scan_model = tiny_model(scan=True, remat_policy="nothing_saveable")
  init_shapes = jax.eval_shape(scan_model.init, jax.random.key(0), image, text)["params"]
  assert jax.tree.map(jnp.shape, init_shapes) == jax.tree.map(jnp.shape, scanned)

  (_, (zimg_s, ztxt_s, _)), grads_s = loss_fn(scan_model, image, text)(scanned)
  np.testing.assert_allclose(zimg_s, zimg, atol=1e-6)
  np.testing.assert_allclose(ztxt_s, ztxt, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               grads_s, restack(grads))


def test_bfloat16_compute_keeps_float32_params(inputs, params, f32_run):
  image, text = inputs
  model = tiny_model(dtype="bfloat16")
  init_params = jax.eval_shape(model.init, jax.random.key(0), image, text)["params"]
  assert {x.dtype for x in jax.tree.leaves(init_params)} == {jnp.dtype(jnp.float32)}
  zimg, ztxt, out = jax.jit(lambda p: model.apply({"params": p}, image, text))(params)
  assert out["img/encoded"].dtype == jnp.bfloat16  # the compute really is bf16
  assert zimg.dtype == ztxt.dtype == jnp.float32  # normalized in float32
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ztxt, axis=1), 1.0, rtol=1e-5)
  zimg32, ztxt32, _, _ = f32_run
  np.testing.assert_allclose(zimg, zimg32, atol=0.1)
  np.testing.assert_allclose(ztxt, ztxt32, atol=0.1)


def test_attention_impl_reaches_encoder_blocks_but_not_the_map_head(inputs, monkeypatch):
  image, text = inputs
  seen = []
  original = jax.nn.dot_product_attention

  def recording(q, k, v, *args, implementation=None, **kw):
    seen.append((q.shape[1], implementation))  # (query length, implementation)
    return original(q, k, v, *args, implementation=None, **kw)  # CPU: run the XLA path

  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  model = TwoTowers(image=dict(patch_size=(4, 4), pool_type="map", **TINY),
                    text=dict(vocab_size=VOCAB, **TINY), out_dim=16,
                    dtype=jnp.bfloat16, attention_impl="cudnn")
  jax.eval_shape(model.init, jax.random.key(0), image, text)
  # 2 image blocks (6 tokens), 2 text blocks (7 tokens): cudnn; the MAP head's 1 query: xla.
  assert sorted(seen) == [(1, "xla"), (6, "cudnn"), (6, "cudnn"), (7, "cudnn"), (7, "cudnn")]
