"""The analytic FLOP count (siglip_jax.flops) against XLA's own cost analysis of the train
step's forward and backward pass, for two model sizes."""
import jax
import jax.numpy as jnp
import pytest

from siglip_jax import flops, losses, models

SIZES = {
    # The demo's shape (MAP head, patch 4 on 32 px, text head) at two widths and depths.
    "small": dict(image=dict(patch_size=(4, 4), width=64, depth=2, mlp_dim=256, num_heads=4,
                             pool_type="map", remat_policy="none"),
                  text=dict(width=64, depth=2, mlp_dim=256, num_heads=4, vocab_size=64,
                            pool_type="last", remat_policy="none"),
                  out_dim=(None, 64), image_size=32, text_len=16, batch=8),
    "wider": dict(image=dict(patch_size=(8, 8), width=192, depth=3, mlp_dim=768, num_heads=3,
                             pool_type="map", remat_policy="none"),
                  text=dict(width=128, depth=2, mlp_dim=512, num_heads=2, vocab_size=128,
                            pool_type="last", remat_policy="none"),
                  out_dim=(None, 192), image_size=64, text_len=24, batch=4),
}


def _xla_train_flops(model, image_size, text_len, batch):
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  texts = jax.ShapeDtypeStruct((batch, text_len), jnp.int32)
  params = jax.eval_shape(lambda i, t: model.init(jax.random.key(0), i, t), images, texts)

  def loss(p, i, t):
    zimg, ztxt, out = model.apply(p, i, t)
    return losses.sigmoid_loss(zimg, ztxt, out["t"].reshape(()), out["b"].reshape(()))

  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, images, texts).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"]


@pytest.mark.parametrize("name", sorted(SIZES))
def test_analytic_flops_match_xla(name):
  s = dict(SIZES[name])
  model = models.from_config(dict(image=s["image"], text=s["text"], out_dim=s["out_dim"]))
  analytic = s["batch"] * flops.train_flops_per_pair(
      model, image_size=s["image_size"], text_len=s["text_len"], global_batch=s["batch"])
  xla = _xla_train_flops(model, s["image_size"], s["text_len"], s["batch"])
  assert abs(analytic - xla) / xla < 0.10, (name, analytic, xla)


def test_peak_table():
  assert flops.peak_tflops("TPU v4") == 275.0
  assert flops.peak_tflops("TPU v5 lite") == 197.0
  assert flops.peak_tflops("TPU v5p") == 459.0
  assert flops.peak_tflops("TPU v6 lite") == 918.0
  assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert flops.peak_tflops("NVIDIA H200") == 989.0
  assert flops.peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
  assert flops.peak_tflops("cpu") is None
  assert flops.peak_tflops("cpu", override=1.5) == 1.5


def test_decoder_flops_match_xla():
  """The LocCa decoder (two blocks, three passes of 12 tokens, 25 image tokens)."""
  from siglip_jax.models import decoder as decoder_lib
  dec = decoder_lib.Decoder(text_vocab=200, loc_bins=32, width=64, depth=2, num_heads=4,
                            max_len=12, mlp_dim=256)
  b, t, n, di = 4, 36, 25, 48
  tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
  image = jax.ShapeDtypeStruct((b, n, di), jnp.float32)
  segments = jnp.repeat(jnp.arange(3), 12)[None].repeat(b, 0)
  params = jax.eval_shape(lambda x, i: dec.init(jax.random.key(0), x, segments, i,
                                                method=dec.init_all), tokens, image)

  def loss(p, x, i):
    logits = dec.apply(p, x, segments, i, method=dec.init_all)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), x[..., None], -1))

  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens, image).compile()
  cost = compiled.cost_analysis()
  xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  analytic = b * flops.TRAIN_MULTIPLIER * flops.decoder_flops(
      tokens=t, width=64, depth=2, mlp_dim=256, image_tokens=n, image_width=di,
      vocab=decoder_lib.vocab_size(200, 32))
  assert abs(analytic - xla) / xla < 0.10, (analytic, xla)


def _encoder_grad_flops(policy, b=4, t=64, w=64, mlp=256):
  """XLA's FLOPs of the gradient of one encoder block with respect to its parameters and its
  input (as every tower block's input needs one: the embeddings below it train)."""
  from siglip_jax.models.transformer import Encoder
  enc = Encoder(depth=1, mlp_dim=mlp, num_heads=4, remat_policy=policy)
  x = jax.ShapeDtypeStruct((b, t, w), jnp.float32)
  params = jax.eval_shape(lambda x: enc.init(jax.random.key(0), x), x)
  grad = jax.grad(lambda p, x: jnp.sum(enc.apply(p, x)[0]), argnums=(0, 1))
  cost = jax.jit(grad).lower(params, x).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def test_remat_recompute_matches_xla():
  """nothing_saveable recomputes the block less its MLP out projection (XLA's count above no
  remat adds the elementwise recompute: within 10%); the no-batch-dims policies the two
  attention matmuls (the difference of the two policies: within 5%)."""
  b, t, w, mlp = 4, 64, 64, 256
  remat = lambda policy: b * flops.remat_flops(  # noqa: E731
      policy, tokens=t, width=w, depth=1, mlp_dim=mlp)
  xla = {p: _encoder_grad_flops(p, b, t, w, mlp)
         for p in ("none", "nothing_saveable", "dots_with_no_batch_dims_saveable")}
  extra = xla["nothing_saveable"] - xla["none"]
  assert 0 <= extra - remat("nothing_saveable") < 0.10 * extra, (extra, remat("nothing_saveable"))
  diff = xla["nothing_saveable"] - xla["dots_with_no_batch_dims_saveable"]
  analytic = remat("nothing_saveable") - remat("dots_with_no_batch_dims_saveable")
  assert abs(analytic - diff) / diff < 0.05, (analytic, diff)
  assert remat("dots_saveable") == remat("everything_saveable") == remat("none") == 0


def _tiny_model(img_remat=None, txt_remat=None, pool_type="map"):
  img = dict(patch_size=(4, 4), width=64, depth=2, mlp_dim=256, num_heads=4, pool_type=pool_type)
  txt = dict(width=32, depth=3, mlp_dim=128, num_heads=4, vocab_size=64)
  if img_remat:
    img["remat_policy"] = img_remat
  if txt_remat:
    txt["remat_policy"] = txt_remat
  return models.from_config(dict(image=img, text=txt, out_dim=(None, 64)))


def test_hw_flops_add_remat_recompute_and_the_microbatch_forward():
  kw = dict(image_size=32, text_len=16, global_batch=8)
  img_tokens, text_len = 64, 16
  enc_img = flops.encoder_flops(img_tokens, 64, 2, 256)
  enc_txt = flops.encoder_flops(text_len, 32, 3, 128)
  fc2 = lambda tokens, w, depth, mlp: depth * 2 * tokens * w * mlp  # noqa: E731
  attn = lambda tokens, w, depth: depth * 2 * 2 * tokens * tokens * w  # noqa: E731
  cases = {
      ("none", "none"): 0,
      ("everything_saveable", "dots_saveable"): 0,
      ("checkpoint_dots", "none"): 0,
      ("nothing_saveable", "none"): enc_img - fc2(img_tokens, 64, 2, 256),
      ("none", "nothing_saveable"): enc_txt - fc2(text_len, 32, 3, 128),
      ("dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims"):
          attn(img_tokens, 64, 2) + attn(text_len, 32, 3),
      (None, None): (enc_img - fc2(img_tokens, 64, 2, 256)       # the towers' default:
                     + enc_txt - fc2(text_len, 32, 3, 128)),     # nothing_saveable
  }
  for (pi, pt), extra in cases.items():
    model = _tiny_model(pi, pt)
    base = flops.train_flops_per_pair(model, **kw)
    assert flops.hw_train_flops_per_pair(model, **kw) - base == extra, (pi, pt)
    assert flops.train_flops_per_pair(model, **kw) == base   # model FLOPs: no credit
  # K > 1: one more forward of both towers (pooling and heads included), whatever K.
  model = _tiny_model("none", "none")
  towers = (flops.image_tower_flops(image_size=32, patch_size=(4, 4), width=64, depth=2,
                                    mlp_dim=256, pool_type="map", out_dim=None)
            + flops.text_tower_flops(text_len=16, width=32, depth=3, mlp_dim=128, out_dim=64))
  k1 = flops.hw_train_flops_per_pair(model, **kw, microbatches=1)
  for k in (2, 4):
    assert flops.hw_train_flops_per_pair(model, **kw, microbatches=k) - k1 == towers
  remat = _tiny_model("nothing_saveable", "nothing_saveable", pool_type="tok")
  both = flops.hw_train_flops_per_pair(remat, **kw, microbatches=4)
  assert both - flops.hw_train_flops_per_pair(remat, **kw) == flops.towers_forward_flops(
      remat, image_size=32, text_len=16)
