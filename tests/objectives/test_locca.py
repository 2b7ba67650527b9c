"""LocCa: the decoder loss and its gradients against an independent float64 numpy decoder,
with padding and parallel prediction; the passes, boxes and regions the loader builds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax.data import decoder_text, regions
from siglip_jax.data.tokenizer import Tokenizer
from siglip_jax.models import decoder as decoder_lib
from siglip_jax.objectives import locca

TEXT_VOCAB, LOC_BINS, LENGTH = 256, 16, 12


# ------------------------------------------------------------------ float64 numpy reference

def _ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _mha(xq, xkv, p, mask):
  q = np.einsum("td,dhk->thk", xq, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("sd,dhk->shk", xkv, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("sd,dhk->shk", xkv, p["value"]["kernel"]) + p["value"]["bias"]
  logits = np.einsum("thk,shk->hts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask[None], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  y = np.einsum("hts,shk->thk", w, v)
  return np.einsum("thk,hkd->td", y, p["out"]["kernel"]) + p["out"]["bias"]


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _numpy_decoder(p, tokens, image):
  """One example: tokens [3L] (three passes of LENGTH), image [N, Di] -> hidden [3L, D]."""
  seg = np.repeat(np.arange(3), LENGTH)
  pos = np.tile(np.arange(LENGTH), 3)
  bins = tokens - TEXT_VOCAB
  is_loc = (bins >= 0) & (bins < LOC_BINS)
  centre = (np.clip(bins, 0, LOC_BINS - 1) + 0.5) / LOC_BINS
  angles = centre[:, None] * (np.pi * 2.0 ** np.arange(decoder_lib.NUM_FOURIER // 2))
  feats = np.concatenate([np.sin(angles), np.cos(angles)], -1) * is_loc[:, None]
  x = (p["embed"]["embedding"][tokens] + feats @ p["loc_fourier"]["kernel"]
       + p["loc_fourier"]["bias"] + p["pos_embedding"][0][pos])
  self_mask = (seg[:, None] == seg[None, :]) & (np.arange(3 * LENGTH)[None, :]
                                               <= np.arange(3 * LENGTH)[:, None])
  cross_mask = np.ones((3 * LENGTH, image.shape[0]), bool)
  for name in sorted(k for k in p if k.startswith("block_")):
    b = p[name]
    y = _ln(x, b["LayerNorm_0"])
    x = x + _mha(y, y, b["SelfAttention"], self_mask)
    y = _ln(x, b["LayerNorm_1"])
    x = x + _mha(y, image, b["CrossAttention"], cross_mask)
    y = _ln(x, b["LayerNorm_2"])
    m = b["MlpBlock_0"]
    x = x + _gelu(y @ m["Dense_0"]["kernel"] + m["Dense_0"]["bias"]) @ m["Dense_1"]["kernel"] \
        + m["Dense_1"]["bias"]
  return _ln(x, p["decoder_norm"])


def _numpy_loss(p, batch, image):
  nll, task = [], []
  for i in range(len(image)):
    h = _numpy_decoder(p, batch["dec_inputs"][i], image[i])
    logits = h @ p["head"]["kernel"] + p["head"]["bias"]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll.append(-logp[np.arange(len(h)), batch["dec_targets"][i]])
    task.append(batch["dec_task"][i])
  nll, task = np.concatenate(nll), np.concatenate(task)
  means = [nll[task == k].mean() for k in range(3) if (task == k).any()]
  return float(np.mean(means))


# ------------------------------------------------------------------ the JAX side

def _setup(parallel):
  tok = Tokenizer()
  text = decoder_text.DecoderText(tok, decoder_len=LENGTH, text_vocab=TEXT_VOCAB,
                                  loc_bins=LOC_BINS)
  region = {"box": [0.1, 0.2, 0.55, 0.9], "caption": "red circle"}
  rows = [text.passes("a red circle, a blue star", region, region, parallel=parallel),
          # Padding: a long caption cut by LENGTH, and an example without regions.
          text.passes("there is a green ring, a white heart, a blue star in the picture.",
                      None, None, parallel=False)]
  batch = {k: np.stack([r[j].reshape(-1) for r in rows]) for j, k in
           enumerate(("dec_inputs", "dec_targets", "dec_task"))}
  dec = decoder_lib.Decoder(text_vocab=TEXT_VOCAB, loc_bins=LOC_BINS, width=16, depth=1,
                            num_heads=2, max_len=LENGTH, mlp_dim=24)
  image = np.random.default_rng(0).normal(size=(2, 5, 12)).astype(np.float32)
  # Jitted: run eagerly, every small op of the init would be compiled on its own.
  init = jax.jit(lambda key, inputs, seg, image: dec.init(
      key, inputs, seg, image, method=decoder_lib.Decoder.init_all)["params"])
  params = init(jax.random.key(0), batch["dec_inputs"], locca.segments(2, LENGTH), image)
  # A non-zero head (its init is zeros) so that the gradients reach every parameter.
  noise = np.random.default_rng(1)
  params = jax.tree.map(lambda x: np.asarray(x) + np.float32(0.3) * noise.standard_normal(
      x.shape, np.float32), params)
  return dec, params, batch, image


def _jax_loss(dec, chunk):
  obj = locca.LocCa.__new__(locca.LocCa)
  obj.decoder, obj.decoder_len, obj.chunk = dec, LENGTH, chunk
  obj.weight, obj.start_step = 1.0, 0

  def loss(params, image, batch):
    return obj.loss({"decoder": params}, batch, {"img/encoded": image})[0]
  return loss


@pytest.mark.parametrize("parallel", [False, True])
def test_loss_and_gradients_match_float64_numpy(parallel):
  dec, params, batch, image = _setup(parallel)
  if parallel:   # the caption pass reads mask tokens after its task token
    special = decoder_lib.special_ids(TEXT_VOCAB, LOC_BINS)
    first = batch["dec_inputs"][0, :LENGTH]
    assert first[0] == special["caption"] and set(first[1:][first[1:] != 0]) == {special["mask"]}
  loss_fn = _jax_loss(dec, chunk=64)   # 64 < the 276 ids: several chunks, the last one short
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  value, (g_params, g_image) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(
      params, image, jbatch)
  p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  img64 = image.astype(np.float64)
  ref = _numpy_loss(p64, batch, img64)
  np.testing.assert_allclose(float(value), ref, rtol=2e-5)
  # Central differences of the float64 reference on a sample of every array's entries.
  rng = np.random.default_rng(1)
  eps = 1e-5
  checked = 0
  for path, g in jax.tree_util.tree_flatten_with_path(g_params)[0] + [((), g_image)]:
    target = img64 if path == () else p64
    leaf = target if path == () else _get(target, path)
    for idx in map(tuple, rng.integers(0, leaf.shape, size=(3, leaf.ndim))):
      old = leaf[idx]
      leaf[idx] = old + eps
      up = _numpy_loss(p64, batch, img64)
      leaf[idx] = old - eps
      down = _numpy_loss(p64, batch, img64)
      leaf[idx] = old
      want = (up - down) / (2 * eps)
      got = float(np.asarray(g)[idx])
      assert abs(got - want) <= 2e-4 * max(1.0, abs(want)), (path, idx, got, want)
      checked += 1
  assert checked > 60


def _get(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


# ------------------------------------------------------------------ passes, boxes, regions

def test_box_tokens_round_trip_within_one_bin():
  rng = np.random.default_rng(0)
  for bins in (16, 1024):
    for _ in range(200):
      x0, x1 = sorted(rng.uniform(0, 1, 2))
      y0, y1 = sorted(rng.uniform(0, 1, 2))
      tokens = decoder_text.box_to_tokens([x0, y0, x1, y1], TEXT_VOCAB, bins)
      assert all(TEXT_VOCAB <= t < TEXT_VOCAB + bins for t in tokens)
      back = decoder_text.tokens_to_box(tokens, TEXT_VOCAB, bins)
      assert np.all(np.abs(np.array(back) - [x0, y0, x1, y1]) <= 1 / bins)
  # y0 x0 y1 x1 order, the last bin for a coordinate of 1.
  assert decoder_text.box_to_tokens([0.0, 0.5, 1.0, 1.0], 10, 4) == [12, 10, 13, 13]


def test_passes_train_only_their_targets():
  tok = Tokenizer()
  text = decoder_text.DecoderText(tok, decoder_len=LENGTH, text_vocab=TEXT_VOCAB,
                                  loc_bins=LOC_BINS)
  region = {"box": [0.0, 0.0, 0.5, 0.5], "caption": "red circle"}
  inputs, targets, task = text.passes("a red circle", region, region)
  words, eos = tok.ids("red circle"), tok.eos_id
  loc = decoder_text.box_to_tokens(region["box"], TEXT_VOCAB, LOC_BINS)
  trained = lambda k: list(targets[k][task[k] == k])  # noqa: E731
  assert trained(0) == tok.ids("a red circle") + [eos]
  assert trained(1) == loc + [eos]
  assert trained(2) == words + [eos]
  assert np.all(targets[task < 0] == 0) or np.all(task[targets == 0] < 0)
  # A region caption too long for the pass is cut; its location target never is.
  long_region = {"box": region["box"], "caption": "red circle " * 10}
  _, targets, task = text.passes("x", long_region, None)
  assert list(targets[1][task[1] == 1]) == loc + [eos]
  with pytest.raises(ValueError, match="decoder_len"):
    decoder_text.DecoderText(tok, decoder_len=4, text_vocab=TEXT_VOCAB, loc_bins=LOC_BINS)


def test_bad_regions_are_dropped_and_counted_exactly():
  raw = {"regions": [
      {"box": [0.1, 0.1, 0.5, 0.5], "caption": "red circle"},      # good
      {"box": [0.5, 0.1, 0.4, 0.5], "caption": "inverted"},        # x1 < x0
      {"box": [0.1, 0.1, 0.1, 0.5], "caption": "empty"},           # zero width
      {"box": [-0.1, 0.1, 0.5, 0.5], "caption": "outside"},        # outside [0, 1]
      {"box": [0.1, 0.1, 0.5, float("nan")], "caption": "nan"},
      {"box": [0.1, 0.1, 0.5], "caption": "three numbers"},
      {"box": [0.2, 0.2, 0.9, 0.9], "caption": " \x00\t"},         # blank caption
      {"box": [0.2, 0.2, 0.9, 0.9], "caption": "blue star"},       # good
      "not a dict"]}
  good, bad = regions.parse(raw)
  assert [r["caption"] for r in good] == ["red circle", "blue star"] and bad == 7
  assert regions.parse({"json": b'{"regions": [{"box": [0, 0, 1, 1], "caption": "a"}]}'}) == (
      [{"box": [0.0, 0.0, 1.0, 1.0], "caption": "a"}], 0)
  assert regions.parse({"json": b"not json"}) == ([], 0)


def test_a_crop_moves_clips_and_drops_boxes():
  boxes = [{"box": [0.0, 0.0, 0.5, 0.5], "caption": "a"},   # the crop keeps its right half
           {"box": [0.4, 0.4, 0.6, 0.6], "caption": "b"},   # inside
           {"box": [0.0, 0.0, 0.3, 1.0], "caption": "c"}]   # a third visible: dropped
  # 100 x 100 image, crop x in [20, 70], y in [0, 100], then flipped.
  kept, dropped = regions.move(boxes, (20, 0, 70, 100), 100, 100, flipped=True)
  assert dropped == 1
  np.testing.assert_allclose(kept[0]["box"], [1 - 0.6, 0.0, 1.0, 0.5])
  np.testing.assert_allclose(kept[1]["box"], [1 - 0.8, 0.4, 1 - 0.4, 0.6])


@pytest.mark.parametrize("key, value, named", [
    ("objectives.locca.weight", -1.0, "objectives.locca.weight"),
    ("objectives.locca.start_fraction", 1.5, "objectives.locca.start_fraction"),
    ("input.decoder_len", 5, "input.decoder_len"),
    ("input.data", "synthetic", "objectives.locca"),
])
def test_config_errors_name_the_key(key, value, named):
  from siglip_jax import config_defaults, errors, experiment
  config = config_defaults.base()
  config.total_steps, config.input.batch_size = 10, 8
  config.objectives.locca.weight = 1.0
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(errors.UserError, match=named.replace(".", r"\.")):
    experiment.check_config(config)
