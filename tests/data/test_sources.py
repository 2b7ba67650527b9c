"""Sources (WebDataset, folder, ArrayRecord, TFDS, mixtures) and preprocessing."""
import io
import json
import logging
import os
import tarfile
import threading

import ml_collections
import numpy as np
import pytest
from PIL import Image

from siglip_jax.data import preprocess, sources

import hostile_data
from hostile_data import hostile, image_colour, read_caption  # noqa: F401
from wds_fixtures import BAD, ODD, TFDS_NAME, colour, tiny_tfds_dir, wds  # noqa: F401  pylint: disable=unused-import


def _pre(**kw):
  kw.setdefault("image_size", 16)
  kw.setdefault("text_len", 8)
  return preprocess.Preprocessor(**kw)


def test_split_member_follows_webdataset():
  assert sources.split_member("a/b/000123.jpg") == ("a/b/000123", "jpg")
  assert sources.split_member("000123.seg.PNG") == ("000123", "seg.png")
  assert sources.split_member("noext") == ("noext", "")


def test_webdataset_index_reads_members_by_offset(wds):
  src = sources.WebDatasetSource(wds["glob"])
  assert len(src) == wds["records"] and len(src.shards) == 3
  pre = _pre()
  for i, kind in enumerate(wds["kinds"]):
    rec = src[i]
    if kind == "good":
      assert rec["texts"] == f"photo number {i}".encode()
      img = pre(rec, slot=0)["image"]
      assert img.shape == (16, 16, 3) and img.dtype == np.uint8
      np.testing.assert_allclose(img.mean((0, 1)), colour(i), atol=4)
    if kind == "nocaption":
      assert rec["texts"] is None and rec["image"]


def test_bad_records_get_their_reason_and_odd_images_are_used(wds):
  src = sources.WebDatasetSource(wds["glob"])
  pre = _pre()
  for i, kind in enumerate(wds["kinds"]):
    if kind in BAD:
      with pytest.raises(preprocess.BadRecord) as e:
        pre(src[i], slot=i)
      assert e.value.reason == BAD[kind], kind
    elif kind in ODD:
      img = pre(src[i], slot=i)["image"]
      assert img.shape == (16, 16, 3), kind
      want = np.array(colour(i), np.float64)
      if kind == "gray":
        want = np.full(3, Image.new("RGB", (1, 1), colour(i)).convert("L").getpixel((0, 0)))
      if kind == "rgba":   # alpha 128 over white
        want = (want * 128 + 255 * 127) / 255
      tol = 40 if kind in ("palette", "cmyk") else 6
      np.testing.assert_allclose(img.reshape(-1, 3).mean(0), want, atol=tol, err_msg=kind)


def test_resize_modes_and_augmentation():
  # A 60x20 image in thirds: red | green | blue.
  arr = np.zeros((20, 60, 3), np.uint8)
  for k in range(3):
    arr[:, 20 * k:20 * (k + 1), k] = 255
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "PNG")
  rec = {"image": buf.getvalue(), "texts": "x"}
  squash = _pre(resize="squash")(rec, 0)["image"]
  crop = _pre(resize="crop", method="bilinear")(rec, 0)["image"]
  assert squash[:, 0, 0].min() > 200 and squash[:, -1, 2].min() > 200   # all three kept
  assert crop[..., 1].min() > 200 and crop[..., [0, 2]].max() < 30      # the centre only
  aug = _pre(random_crop=True, crop_scale=(0.2, 0.5), flip=True, seed=3)
  outs = [aug(rec, s)["image"] for s in range(8)]
  assert len({o.tobytes() for o in outs}) > 1                       # slots differ
  np.testing.assert_array_equal(outs[2], aug(rec, 2)["image"])      # a slot is deterministic
  np.testing.assert_array_equal(outs[2], _pre(random_crop=True, crop_scale=(0.2, 0.5),
                                              flip=True, seed=3)(rec, 2)["image"])
  f = preprocess.to_float(squash)
  assert f.dtype == np.float32 and f.min() >= -1 and f.max() <= 1


def test_text_options():
  rec = {"image": np.full((8, 8, 3), 7, np.uint8), "texts": [b"  ", "Hello, World! " * 20]}
  tok = _pre(text_len=6, lowercase=False, strip_punctuation=True)
  ids = tok(rec, 0)["text"]
  assert ids.shape == (6,) and ids.dtype == np.int32 and ids[-1] == tok.tokenizer.eos_id
  assert "," not in tok.tokenizer.decode(ids)
  short = {"image": rec["image"], "texts": "hi"}
  padded = _pre(text_len=6, eos="append", pad_id=0)(short, 0)["text"]
  assert padded[-1] == 0
  assert _pre(text_len=6)(short, 0)["text"][-1] == _pre().tokenizer.eos_id   # sticky pads EOS
  with pytest.raises(preprocess.BadRecord, match="blank_caption"):
    _pre()({"image": rec["image"], "texts": ["", " \t"]}, 0)
  with pytest.raises(preprocess.BadRecord, match="missing_caption"):
    _pre()({"image": rec["image"], "texts": []}, 0)


def test_folder_source(tmp_path):
  Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "a.jpg")
  Image.new("L", (30, 20), 99).save(tmp_path / "b.png")
  lines = [{"image": "a.jpg", "caption": "a red thing"},
           {"file_name": "b.png", "captions": ["grey", "gray"]},
           {"image": "gone.jpg", "caption": "missing file"}]
  text = "\n".join(json.dumps(x) for x in lines) + "\n{not json\n"
  (tmp_path / "captions.jsonl").write_text(text)
  src = sources.FolderSource(str(tmp_path))
  assert len(src) == 4
  pre = _pre()
  assert pre(src[0], 0)["image"][..., 0].mean() > 180
  assert pre(src[1], 0)["image"].shape == (16, 16, 3)
  for i, reason in ((2, "missing_image"), (3, "bad_metadata")):
    with pytest.raises(preprocess.BadRecord, match=reason):
      pre.check(src[i])


def test_prepare_writes_an_array_record_set(wds, tmp_path):
  pytest.importorskip("array_record")
  from siglip_jax.data import prepare
  src = sources.WebDatasetSource(wds["glob"])
  out = str(tmp_path / "ar")
  summary = prepare.prepare(src, out, records_per_file=16, workers=1)
  assert summary["written"] == len(wds["usable"]) and summary["skipped"] == wds["skipped"]
  ar = sources.ArrayRecordSource(out)
  assert len(ar) == len(wds["usable"]) and len(ar.meta["files"]) == -(-len(ar) // 16)
  for j, i in enumerate(wds["usable"]):
    assert ar[j]["image"] == src[i]["image"]
  with pytest.raises(FileExistsError):
    prepare.prepare(src, out)


def test_mixture_weights_and_determinism(tmp_path):
  class Numbers:
    def __init__(self, tag, n):
      self.tag, self.n = tag, n

    def __len__(self):
      return self.n

    def __getitem__(self, i):
      return (self.tag, i)

  a, b = Numbers("a", 30), Numbers("b", 500)
  mix = sources.Mixture([a, b], [3, 1], seed=0, period=100)
  assert len(mix) == 500 // 25 * 100 + 100 * (500 % 25 > 0)
  items = [mix[i] for i in range(len(mix))]
  frac_a = sum(t == "a" for t, _ in items) / len(items)
  assert abs(frac_a - 0.75) < 1e-9
  assert {i for t, i in items if t == "b"} == set(range(500))    # every record of b
  assert {i for t, i in items if t == "a"} == set(range(30))     # a, oversampled
  again = sources.Mixture([a, b], [3, 1], seed=0, period=100)
  assert [again[i] for i in range(300)] == items[:300]
  other = sources.Mixture([a, b], [3, 1], seed=1, period=100)
  assert [other[i] for i in range(300)] != items[:300]


def test_tfds_source_prepared_locally(tmp_path_factory):
  data_dir = tiny_tfds_dir(tmp_path_factory)
  if data_dir is None:
    pytest.skip("tensorflow_datasets is not installed (the [data] extra)")
  src = sources.TfdsSource(TFDS_NAME, data_dir=data_dir)
  assert len(src) == 12
  pre = _pre()
  reasons = []
  for i in range(len(src)):
    rec = src[i]
    assert isinstance(rec["image"], bytes)   # read undecoded: we decode (and judge) it
    try:
      pre.check(rec)
    except preprocess.BadRecord as e:
      reasons.append(e.reason)
  assert reasons == ["blank_caption"]


# ------------------------------------------------------------------------ hostile input

def _shard(hostile, n):
  return os.path.join(os.path.dirname(hostile["shards"]["pattern"]), f"h-{n:05d}.tar")


def _reasons(src):
  out = []
  for i in range(len(src)):
    try:
      _pre().check(src[i])
      out.append(None)
    except preprocess.BadRecord as e:
      out.append(e.reason)
  return out


def test_a_header_claiming_a_terabyte_is_dropped_not_allocated(hostile, caplog, tmp_path):
  # h-00002: a member header claiming 1 TiB; h-00003: a pax header claiming 1 TiB of metadata.
  # Each shard keeps its good sample and counts one member_out_of_bounds (tarfile would have
  # allocated the pax data; reading the member would have allocated a terabyte).
  with caplog.at_level(logging.WARNING):
    src = sources.WebDatasetSource([_shard(hostile, 2), _shard(hostile, 3)])
  assert _reasons(src) == [None, "member_out_of_bounds", None, "member_out_of_bounds"]
  assert [src[i]["texts"] for i in (0, 2)] == [b"photo number 5", b"photo number 6"]
  assert src.dropped == {"member_out_of_bounds": 2}
  for n in (2, 3):   # one warning per shard, naming it
    assert sum(f"h-{n:05d}.tar" in r.getMessage() for r in caplog.records) == 1
  # The other extended headers tarfile reads whole: GNU long names, pax global headers.
  for kind in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XGLTYPE):
    path = tmp_path / f"{kind.decode()}.tar"
    path.write_bytes(hostile_data._sample(1, np.random.default_rng(0))
                     + hostile_data._header("ext", hostile_data.TERABYTE, kind) + bytes(4096))
    src = sources.WebDatasetSource(str(path))
    assert _reasons(src) == [None, "member_out_of_bounds"], kind


def test_a_shard_cut_short_is_counted_never_silent(hostile, caplog):
  # 4: cut after a complete sample (no end-of-archive blocks): the sample is kept and one
  # record stands for the unseen rest; 5: cut after a sample's image: that key is the record;
  # 6: cut inside a header; 7: cut inside a member's data (member_out_of_bounds).
  with caplog.at_level(logging.WARNING):
    src = sources.WebDatasetSource(f"{os.path.dirname(_shard(hostile, 0))}/h-0000{{4..7}}.tar")
  assert _reasons(src) == [None, None, "truncated_shard", None, "truncated_shard",
                           None, "truncated_shard", None, "member_out_of_bounds"]
  assert [src[i]["texts"] for i in (0, 1, 3, 5, 7)] == [
      f"photo number {i}".encode() for i in (7, 8, 9, 11, 12)]
  warned = [r.getMessage() for r in caplog.records if "h-0000" in r.getMessage()]
  assert len(warned) == 4 and all("cut short" in w for w in warned[:3])


def test_a_key_seen_twice_is_never_paired(hostile):
  # h-00000: dupA twice as a whole sample, dupB with two captions, dupC with two images.
  src = sources.WebDatasetSource(_shard(hostile, 0))
  reasons = _reasons(src)
  assert reasons.count("duplicate_key") == 6 and src.dropped == {"duplicate_key": 6}
  assert reasons.count(None) == 3
  for i, reason in enumerate(reasons):
    rec = src[i]
    if reason == "duplicate_key":
      assert rec["image"] is None and rec["texts"] is None
    if reason is None:   # every caption belongs to its own image
      number = int(read_caption(rec).split()[-1])
      np.testing.assert_allclose(image_colour(rec), colour(number), atol=4)


def test_captions_of_only_control_characters_are_blank(hostile):
  for blank in ("\x00\x00 \x01\t\x00", "\u200b\ufeff\x1b\x7f", "", " \n"):
    assert preprocess.is_blank(blank), repr(blank)
    with pytest.raises(preprocess.BadRecord, match="blank_caption"):
      preprocess.pick_caption([blank, b"\x00"], np.random.default_rng(0))
  assert not preprocess.is_blank("a\x00") and not preprocess.is_blank("\u00e9")
  assert preprocess.pick_caption(["\x00", " a cat "], np.random.default_rng(0)) == "a cat"
  reasons = _reasons(sources.WebDatasetSource(_shard(hostile, 0)))
  assert reasons[-3:] == ["blank_caption", "blank_caption", "caption_too_large"]


def test_oversized_members_are_never_read(hostile, monkeypatch):
  from siglip_jax.data import webdataset
  sizes = []
  read = webdataset._ShardFiles.read
  monkeypatch.setattr(webdataset._ShardFiles, "read",
                      lambda self, *a: sizes.append(a[-1]) or read(self, *a))
  src = sources.WebDatasetSource([_shard(hostile, 0), _shard(hostile, 1)])
  reasons = _reasons(src)
  assert reasons[-3:] == [None, "image_too_large", None]   # the sparse 1.2 GB image member
  assert reasons.count("caption_too_large") == 1            # the 1.5 MiB caption
  assert max(sizes) < 100_000
  # the cap is the config's: a smaller one skips the ordinary images too
  small = sources.WebDatasetSource(_shard(hostile, 1), max_image_bytes=100)
  assert _reasons(small) == ["image_too_large"] * 3


def test_folder_source_reads_only_regular_files_inside_it(hostile):
  folder = hostile["folder"]
  src = sources.from_config(ml_collections.ConfigDict(
      {"seed": 0, "input": {"data": "folder", "dir": folder["dir"]}}))
  reasons = []
  worker = threading.Thread(target=lambda: reasons.extend(_reasons(src)), daemon=True)
  worker.start()
  worker.join(60)
  assert not worker.is_alive(), "reading the folder blocked (a FIFO opened for reading?)"
  assert reasons == folder["reasons"]
  np.testing.assert_allclose(image_colour(src[1]), colour(1), atol=1)   # a symlink inside
  # input.max_image_bytes reaches the folder source through from_config
  capped = sources.from_config(ml_collections.ConfigDict(
      {"seed": 0, "input": {"data": "folder", "dir": folder["dir"], "max_image_bytes": 10}}))
  assert _reasons(capped)[:3] == ["image_too_large"] * 3


def test_every_reason_a_source_gives_is_a_known_reason(hostile):
  found = set(hostile["shards"]["skipped"]) | set(hostile["folder"]["skipped"])
  assert found <= set(preprocess.REASONS)
  assert set(BAD.values()) <= set(preprocess.REASONS)


def test_open_shards_stay_bounded(wds, monkeypatch):
  # img2dataset's 1,243 shards would exceed `ulimit -n` if every shard stayed open.
  from siglip_jax.data import webdataset
  monkeypatch.setattr(webdataset, "_MAX_OPEN_SHARDS", 2)
  src = sources.WebDatasetSource(wds["glob"])
  assert len(src.shards) == 3
  for _ in range(2):
    for i in range(len(src)):
      src[i]
      assert len(src._files._open) <= 2
  assert _reasons(src) == [BAD.get(kind) for kind in wds["kinds"]]
