"""Parameter names and shapes: ours must equal big_vision's, one to one.

Everything here runs under `jax.eval_shape`, so no B/16-sized array is ever allocated.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from siglip_jax.models import TextTransformer, TwoTowers, ViT, decode_variant, from_config
from siglip_jax.models.vit import check_image_size

# Read off big_vision's own SigLIP B/16 model (224 px, text B, vocab 32000, 64 tokens).
REFERENCE = json.loads(
    (Path(__file__).parent / "big_vision_siglip_b16_224_params.json").read_text())


def b16_model(**kw):
  return TwoTowers(image={"variant": "B/16", "pool_type": "map", **kw},
                   text={"variant": "B", "vocab_size": 32_000, **kw},
                   out_dim=(None, 768))


def abstract_params(model, image_size=224, text_len=64):
  init = lambda: model.init(jax.random.key(0),  # noqa: E731
                            jnp.zeros((1, image_size, image_size, 3), jnp.float32),
                            jnp.zeros((1, text_len), jnp.int32))
  return jax.eval_shape(init)["params"]


def flat_shapes(params):
  return {"/".join(k): list(v.shape) for k, v in traverse_util.flatten_dict(params).items()}


def test_b16_matches_big_vision_exactly():
  params = abstract_params(b16_model())
  ours = flat_shapes(params)
  ref = REFERENCE["params"]
  assert sorted(set(ours) - set(ref)) == []
  assert sorted(set(ref) - set(ours)) == []
  assert ours == ref
  total = sum(int(np.prod(s)) for s in ours.values())
  assert total == REFERENCE["total_params"] == 203_155_970
  assert {v.dtype for v in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_bf16_compute_keeps_float32_params():
  params = abstract_params(TwoTowers(image={"variant": "B/16"}, text={"variant": "B"},
                                     dtype=jnp.bfloat16))
  assert {v.dtype for v in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_scanned_layout_stacks_blocks_on_a_leading_depth_axis():
  params = abstract_params(b16_model(scan=True))
  ours = flat_shapes(params)
  ref = REFERENCE["params"]
  expected = {}
  for name, shape in ref.items():
    for tower in ("img/Transformer/", "txt/Encoder_0/"):
      if name.startswith(tower + "encoderblock_"):
        rest = name[len(tower):].split("/", 1)[1]
        expected[f"{tower}encoderblock/{rest}"] = [12, *shape]
        break
    else:
      expected[name] = shape
  assert ours == expected
  assert sum(int(np.prod(s)) for s in ours.values()) == REFERENCE["total_params"]


def test_variant_table_spot_checks():
  assert decode_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12,
                                        patch_size=(16, 16))
  assert decode_variant("So400m/14") == dict(width=1152, depth=27, mlp_dim=4304,
                                             num_heads=16, patch_size=(14, 14))
  assert decode_variant("g-opt") == dict(width=1536, depth=40, mlp_dim=6144, num_heads=16)
  assert decode_variant("mu") == dict(width=32, depth=1, mlp_dim=128, num_heads=2)
  assert decode_variant("L")["depth"] == 24
  assert decode_variant("G")["width"] == 1664
  assert decode_variant(None) == {}


def test_explicit_dims_override_the_variant():
  vit = ViT(variant="B/16", depth=2, patch_size=(32, 32))
  assert vit.dims == dict(width=768, depth=2, mlp_dim=3072, num_heads=12, patch_size=(32, 32))
  assert ViT(variant="S/32").dims["patch_size"] == (32, 32)
  assert ViT().dims["patch_size"] == (16, 16)
  assert TextTransformer(variant="So400m").dims == dict(width=1152, depth=27, mlp_dim=4304,
                                                        num_heads=16)


def test_so400m_text_and_image_shapes():
  model = TwoTowers(image={"variant": "So400m/14", "scan": True},
                    text={"variant": "So400m", "scan": True}, out_dim=(None, 1152))
  ours = flat_shapes(abstract_params(model, image_size=224, text_len=16))
  assert ours["img/embedding/kernel"] == [14, 14, 3, 1152]
  assert ours["img/pos_embedding"] == [1, 256, 1152]
  assert ours["img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"] == [27, 1152, 4304]
  assert ours["img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"] == [
      27, 1152, 16, 72]
  assert ours["txt/head/kernel"] == [1152, 1152]


def test_image_head_pooling_and_posemb_variants():
  image = jnp.zeros((1, 32, 32, 3))
  init = lambda m: jax.eval_shape(lambda: m.init(jax.random.key(0), image))["params"]  # noqa
  tok = flat_shapes(init(ViT(variant="mu/8", pool_type="tok", num_classes=5)))
  assert tok["cls"] == [1, 1, 32] and tok["head/kernel"] == [32, 5]
  assert "MAPHead_0/probe" not in tok
  sincos = flat_shapes(init(ViT(variant="mu/8", posemb="sincos2d", pool_type="gap")))
  assert "pos_embedding" not in sincos and "head/kernel" not in sincos
  x, out = jax.eval_shape(lambda: ViT(variant="mu/8", pool_type="none").init_with_output(
      jax.random.key(0), image))[0]
  assert x.shape == (1, 16, 32) and out["pre_logits_2d"].shape == (1, 4, 4, 32)


@pytest.mark.parametrize("variant", ["X/16", "B/x", "b", "Huge"])
def test_unknown_variant_raises(variant):
  with pytest.raises(ValueError, match="variant"):
    decode_variant(variant)
  with pytest.raises(ValueError, match="So400m"):  # the message lists the known ones
    decode_variant("nope")


def test_bad_pool_posemb_and_image_size_raise():
  key, image, text = jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="'avg'"):
    jax.eval_shape(ViT(variant="mu/8", pool_type="avg").init, key, image)
  with pytest.raises(ValueError, match="'cos'"):
    jax.eval_shape(ViT(variant="mu/8", posemb="cos").init, key, image)
  with pytest.raises(ValueError, match="'cls'"):
    jax.eval_shape(TextTransformer(variant="mu", pool_type="cls").init, key, text)
  with pytest.raises(ValueError, match="image_size.*patch_size"):
    jax.eval_shape(ViT(variant="mu/7").init, key, image)
  with pytest.raises(ValueError, match="remat_policy"):
    jax.eval_shape(ViT(variant="mu/8", remat_policy="bogus").init, key, image)
  with pytest.raises(ValueError, match="image_size.*patch_size"):
    check_image_size(224, 15)
  check_image_size(224, 16)
  check_image_size((384, 224), (16, 16))


def test_from_config_builds_the_same_model():
  cfg = {"image": {"variant": "B/16", "pool_type": "map"},
         "text": {"variant": "B", "vocab_size": 32_000}, "out_dim": [None, 768],
         "temperature_init": 10.0, "bias_init": -10.0, "dtype": "bfloat16",
         "attention_impl": None}
  model = from_config(cfg)
  assert model.dtype == jnp.bfloat16 and model.out_dim == (None, 768)
  assert flat_shapes(abstract_params(model)) == REFERENCE["params"]
  no_bias = from_config({"image": {"variant": "mu/8"}, "text": {"variant": "mu"},
                         "out_dim": 32, "bias_init": None})
  assert "b" not in abstract_params(no_bias, image_size=32, text_len=4)
  with pytest.raises(ValueError, match="temprature_init"):
    from_config({"temprature_init": 1.0})
  with pytest.raises(ValueError, match="dtype"):
    from_config({"dtype": "float99"})


def test_from_config_accepts_a_config_dict():
  ml_collections = pytest.importorskip("ml_collections")
  cfg = ml_collections.ConfigDict({"image": {"variant": "mu/8", "patch_size": [8, 8]},
                                   "text": {"variant": "mu", "dtype_mm": "float32"},
                                   "out_dim": (None, 32), "image_model": "vit"})
  model = from_config(cfg)
  assert model.image["patch_size"] == (8, 8) and model.text["dtype"] == jnp.float32
  assert "t" in abstract_params(model, image_size=16, text_len=4)
