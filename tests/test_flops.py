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
