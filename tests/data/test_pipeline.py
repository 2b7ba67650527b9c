"""The Grain loader: determinism, process slices, epochs, skips, exact resume."""
import collections
import os
import re

import numpy as np
import pytest

from siglip_jax.data import pipeline, preprocess, sources

from wds_fixtures import BAD, make_shards, wds  # noqa: F401  pylint: disable=unused-import


def _loader(src, rows, *, seed=0, batch=16, threads=2, size=16):
  pre = preprocess.Preprocessor(image_size=size, text_len=8, seed=seed)
  return pipeline.StepLoader(src, pre, seed=seed, global_batch=batch, rows=rows, threads=threads)


@pytest.fixture(scope="module")
def src(wds):
  return sources.WebDatasetSource(wds["glob"])


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
  """A data set without bad records."""
  d = str(tmp_path_factory.mktemp("clean"))
  make_shards(d, num_good=30, num_shards=2, odd_and_bad=False)
  return sources.WebDatasetSource(os.path.join(d, "*.tar"))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection(n):
  perm = pipeline.Permutation(n, seed=5)
  seen = [perm(e, np.arange(n)) for e in range(3)]
  for p in seen:
    np.testing.assert_array_equal(np.sort(p), np.arange(n))
  if n >= 64:   # a fresh order each epoch and each seed
    assert not np.array_equal(seen[0], seen[1])
    assert not np.array_equal(seen[0], pipeline.Permutation(n, seed=6)(0, np.arange(n)))
  np.testing.assert_array_equal(perm(1, [5 % n, 0]), seen[1][[5 % n, 0]])


def test_deterministic_for_a_seed(src):
  a, b = _loader(src, range(16)), _loader(src, range(16), threads=1)
  c = _loader(src, range(16), seed=1)
  for step in (0, 3, 17):
    x, y = a(step), b(step)
    for k in ("image", "text", "record", "skipped"):
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a(0)["record"], c(0)["record"])


def test_two_process_slices_make_the_global_batch(src):
  """Step s's batch is the same examples whatever the process count (rows split 2 ways)."""
  whole = _loader(src, range(16))
  parts = [_loader(src, range(0, 16, 2)), _loader(src, range(1, 16, 2))]   # interleaved rows
  for step in range(5):
    full, p0, p1 = whole(step), parts[0](step), parts[1](step)
    for k in ("image", "text", "record", "skipped"):
      merged = np.empty_like(full[k])
      merged[0::2], merged[1::2] = p0[k], p1[k]
      np.testing.assert_array_equal(merged, full[k])


def test_epoch_has_each_record_once_across_two_processes(clean):
  n = len(clean)   # 30 records, batch 10: one epoch is 3 steps
  procs = [_loader(clean, range(0, 5), batch=10), _loader(clean, range(5, 10), batch=10)]
  for epoch in range(2):
    records = np.concatenate([p(s)["record"] for s in range(3 * epoch, 3 * epoch + 3)
                              for p in procs])
    assert sorted(records.tolist()) == list(range(n)), f"epoch {epoch}"


def test_bad_records_replaced_deterministically_and_counted(src, wds):
  n = len(src)
  bad = {i for i, k in enumerate(wds["kinds"]) if k in BAD}
  loader = _loader(src, range(10), batch=10)
  # One epoch (5 steps of 10) across two "processes": each usable record at least once, bad
  # ones never; the duplicates are exactly the replacements, one per skip.
  halves = [_loader(src, range(0, 5), batch=10), _loader(src, range(5, 10), batch=10)]
  out = [h(s) for s in range(n // 10) for h in halves]
  records = np.concatenate([o["record"] for o in out])
  skipped = int(sum(o["skipped"].sum() for o in out))
  assert not bad & set(records.tolist())
  assert set(records.tolist()) == set(range(n)) - bad
  assert len(records) - len(set(records.tolist())) == skipped
  # Each bad record sits in one slot of the epoch and was met there (maybe also as a
  # candidate for another slot).
  assert skipped >= len(bad)
  np.testing.assert_array_equal(loader(2)["record"], _loader(src, range(10), batch=10)(2)["record"])


def test_all_bad_raises_instead_of_spinning(tmp_path):
  import tarfile, io
  path = tmp_path / "bad.tar"
  with tarfile.open(path, "w") as tar:
    for i in range(3):
      for ext, data in (("jpg", b"not an image"), ("txt", b"caption")):
        info = tarfile.TarInfo(f"{i}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  loader = _loader(sources.WebDatasetSource(str(path)), range(2), batch=2, threads=1)
  with pytest.raises(RuntimeError, match="unusable.*data.check"):
    loader(0)


def _steps(it, k):
  return [next(it) for _ in range(k)]


def test_grain_resume_from_a_position(src):
  loader = _loader(src, range(16))
  straight = _steps(pipeline.host_batches(loader, 0, prefetch=2), 7)
  resumed = _steps(pipeline.host_batches(_loader(src, range(16)), 4, prefetch=3), 3)
  assert [b["step"] for b in straight] == list(range(7))
  for a, b in zip(straight[4:], resumed):
    assert a["step"] == b["step"]
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["text"], b["text"])


def test_grain_worker_processes_give_the_same_batches(src):
  expect = _steps(pipeline.host_batches(_loader(src, range(16)), 2), 4)
  got = _steps(pipeline.host_batches(_loader(src, range(16)), 2, workers=2), 4)
  for a, b in zip(expect, got):
    np.testing.assert_array_equal(a["record"], b["record"])
    np.testing.assert_array_equal(a["image"], b["image"])


def test_without_grain_the_thread_prefetcher_gives_the_same_batches(src, monkeypatch):
  expect = _steps(pipeline.host_batches(_loader(src, range(16)), 3), 3)
  monkeypatch.setitem(__import__("sys").modules, "grain", None)   # import grain -> ImportError
  it = pipeline.host_batches(_loader(src, range(16)), 3, prefetch=2)
  for a, b in zip(expect, _steps(it, 3)):
    assert a["step"] == b["step"]
    np.testing.assert_array_equal(a["image"], b["image"])
  it.close()
  with pytest.raises(ImportError, match="grain"):
    pipeline.host_batches(_loader(src, range(16)), 0, workers=1)


def test_batches_resume_exactly_with_skip_total(src):
  """The trainer's iterator on 8 devices: device arrays, state(), and a restart from a saved
  state yields exactly the batches (and skip totals) of an uninterrupted run."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  pre = preprocess.Preprocessor(image_size=16, text_len=8)

  def make(**kw):
    return pipeline.Batches(src, pre, global_batch=16, sharding=sharding, seed=0, threads=2, **kw)

  data = make()
  run, states = [], []
  for _ in range(6):
    step, batch, _ = next(data)
    run.append((step, np.asarray(batch["image"]), np.asarray(batch["text"])))
    states.append(data.state())
  data.close()
  assert run[0][1].dtype == np.float32 and run[0][1].min() >= -1 and run[0][1].max() <= 1
  assert run[0][1].shape == (16, 16, 16, 3) and run[0][2].shape == (16, 8)
  assert [s["data_position"] for s in states] == list(range(1, 7))
  totals = [s["data_skipped"] for s in states]
  assert totals == sorted(totals) and totals[-1] > 0
  restarted = make(start_step=states[2]["data_position"], skipped=states[2]["data_skipped"])
  for want in run[3:]:
    step, batch, _ = next(restarted)
    assert step == want[0]
    np.testing.assert_array_equal(np.asarray(batch["image"]), want[1])
    np.testing.assert_array_equal(np.asarray(batch["text"]), want[2])
  assert restarted.state() == states[-1]
  restarted.close()


def test_caption_choice_and_crops_depend_on_slot_not_process(tmp_path):
  """Several captions: one drawn per slot, all of them over many slots, the same draw for the
  same slot in any loader; blank ones never."""
  from PIL import Image
  Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "a.jpg")
  (tmp_path / "captions.jsonl").write_text(
      '{"image": "a.jpg", "captions": ["one", "two", "  ", "three"]}\n')
  src = sources.FolderSource(str(tmp_path))
  pre = preprocess.Preprocessor(image_size=16, text_len=8, random_crop=True, flip=True)
  a = pipeline.StepLoader(src, pre, seed=0, global_batch=1, rows=[0])
  texts = collections.Counter(a.example(s, tokenize=False)[0]["text"] for s in range(60))
  assert set(texts) == {"one", "two", "three"}
  b = pipeline.StepLoader(src, pre, seed=0, global_batch=1, rows=[0])
  for s in (0, 5, 9):
    x, y = a.example(s), b.example(s)
    np.testing.assert_array_equal(x[0]["image"], y[0]["image"])
    np.testing.assert_array_equal(x[0]["text"], y[0]["text"])


# ------------------------------------------------ the demo set: a source like any other

def _shapes_config(**input_overrides):
  from siglip_jax import config_defaults
  c = config_defaults.base()
  c.seed, c.total_steps = 0, 10
  c.input.update(dict(data="shapes", batch_size=16, image_size=16, text_len=16, threads=2))
  c.input.update(input_overrides)
  return c


def _shapes_loader(config, rows):
  return pipeline.StepLoader(sources.from_config(config), preprocess.from_config(config),
                             seed=config.seed, global_batch=config.input.batch_size, rows=rows,
                             threads=config.input.threads)


@pytest.mark.parametrize("resize, method", [("squash", "bicubic"), ("crop", "bilinear")])
def test_shapes_pixels_pass_the_loader_unchanged(resize, method):
  """The demo set through the real-data loader: each row is exactly the renderer's pixels (no
  resampling at the source's own size) and its caption's tokens; on the devices, the floats
  are those pixels mapped to [-1, 1]."""
  from siglip_jax.data import shapes, tokenizer
  config = _shapes_config(resize=resize, resize_method=method)
  host = _shapes_loader(config, range(16))(2)
  ex = shapes.ShapesDataset(seed=0, image_size=16).train_examples(host["record"])
  np.testing.assert_array_equal(host["image"], ex["image"])
  np.testing.assert_array_equal(host["text"], tokenizer.Tokenizer().encode(ex["text"], 16))
  assert (host["skipped"] == 0).all() and len(set(host["record"].tolist())) == 16
  if resize == "squash":
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), P("data"))
    data = pipeline.make_batches(config, sharding, {"data_position": 2})
    step, batch, _ = next(data)
    data.close()
    assert step == 2
    image = np.asarray(batch["image"])   # mapped to floats by XLA: equal up to an ulp
    np.testing.assert_allclose(image, preprocess.to_float(ex["image"]), rtol=0, atol=3e-7)
    np.testing.assert_array_equal(np.rint((image + 1) * 127.5), ex["image"])


def test_shapes_batches_resume_exactly_and_never_show_unseen_pairs():
  """Batches of the demo set are a function of (seed, step): a run restarted at step 3 gets the
  uninterrupted run's batches; another seed, others. No caption names an unseen pair."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from siglip_jax.data import shapes
  sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), P("data"))
  config = _shapes_config()

  def run(start, n, cfg=config):
    data = pipeline.make_batches(cfg, sharding, {"data_position": start})
    out = [next(data) for _ in range(n)]
    state = data.state()
    data.close()
    return [(s, np.asarray(b["image"]), np.asarray(b["text"])) for s, b, _ in out], state

  straight, _ = run(0, 6)
  resumed, state = run(3, 3)
  assert state == {"data_position": 6, "data_skipped": 0}
  for want, got in zip(straight[3:], resumed):
    assert want[0] == got[0]
    np.testing.assert_array_equal(want[1], got[1])
    np.testing.assert_array_equal(want[2], got[2])
  again, _ = run(0, 1, _shapes_config())
  np.testing.assert_array_equal(again[0][1], straight[0][1])
  reseeded = _shapes_config()
  reseeded.seed = 1
  assert not np.array_equal(run(0, 1, reseeded)[0][0][1], straight[0][1])

  loader = _shapes_loader(config, range(16))
  captions = [loader.example(slot, tokenize=False)[0]["text"] for slot in range(16 * 40)]
  unseen = {(c, s) for c, s in shapes.UNSEEN_PAIRS}
  pairs = {(c, s) for text in captions for c in shapes.COLORS for s in shapes.SHAPES
           if re.search(rf"\b{c}\b", text) and re.search(rf"\b{s}\b", text)}
  assert not pairs & unseen
  assert len(pairs) == len(shapes.COLORS) * len(shapes.SHAPES) - len(unseen)   # all seen ones


def test_source_kinds_and_their_errors(tmp_path):
  from siglip_jax.data import shapes
  config = _shapes_config()
  src = sources.from_config(config)
  assert isinstance(src, shapes.TrainSource) and len(src) == 2**32
  assert src[7]["texts"] == src._getitems([5, 7])[1]["texts"]   # batched read = one by one
  for data, key in (("webdataset", "input.shards"), ("folder", "input.dir"),
                    ("tfds", "input.tfds_name")):
    with pytest.raises(ValueError, match=f"`{key}` is empty"):
      sources.from_config(_shapes_config(data=data))
  with pytest.raises(ValueError, match="unknown data kind 'synthetic'"):
    sources.from_config(_shapes_config(data="synthetic"))
  # A mixture may hold the demo set beside real data: one loader for both.
  make_shards(str(tmp_path), num_good=4, num_shards=1, odd_and_bad=False)
  mix = sources.from_config(_shapes_config(mixture=(
      ("shapes", {}, 0.5), ("webdataset", {"shards": str(tmp_path / "*.tar")}, 0.5))))
  assert {mix[i]["key"].startswith("shapes:") for i in range(8)} == {True, False}
