"""Regions (the LocCa decoder's boxes with captions) from every kind of source: a WebDataset
`key.json`, a folder's captions.jsonl, a TFDS set of ref_coco's shape converted by `prepare`;
`check` counts regions and bad regions exactly."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from siglip_jax.data import check, prepare, sources
from siglip_jax.data import regions as regions_lib

GOOD = {"box": [0.1, 0.2, 0.5, 0.6], "caption": "red circle"}
# Out of bounds, empty, inverted, blank caption, not a box: five bad regions.
BAD = [{"box": [0.1, 0.2, 1.5, 0.6], "caption": "a"}, {"box": [0.3, 0.3, 0.3, 0.6], "caption": "b"},
       {"box": [0.6, 0.2, 0.5, 0.6], "caption": "c"}, {"box": [0.1, 0.2, 0.5, 0.6], "caption": " \0"},
       {"box": "nope", "caption": "d"}]


def _jpeg(value=90):
  buf = io.BytesIO()
  Image.new("RGB", (40, 30), (value, 20, 200)).save(buf, "JPEG")
  return buf.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_webdataset_json_regions_are_read_and_checked(tmp_path):
  shard = str(tmp_path / "s-00000.tar")
  with tarfile.open(shard, "w") as tar:
    _add(tar, "a.jpg", _jpeg())
    _add(tar, "a.txt", b"a red circle")
    _add(tar, "a.json", json.dumps({"regions": [GOOD] + BAD}).encode())
    _add(tar, "b.jpg", _jpeg(10))
    _add(tar, "b.txt", b"no regions here")
  src = sources.WebDatasetSource(shard)
  assert regions_lib.parse(src[0]) == ([GOOD], len(BAD))
  assert regions_lib.parse(src[1]) == ([], 0)
  report = check.summarize(check.scan(src, workers=1), stream=io.StringIO())
  assert (report["usable"], report["regions"], report["skipped_regions"]) == (2, 1, len(BAD))


def test_folder_rows_carry_regions(tmp_path):
  (tmp_path / "x.jpg").write_bytes(_jpeg())
  rows = [{"image": "x.jpg", "caption": "a red circle", "regions": [GOOD, BAD[0]]},
          {"image": "x.jpg", "caption": "plain"}]
  (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  src = sources.FolderSource(str(tmp_path))
  assert regions_lib.parse(src[0]) == ([GOOD], 1)
  assert "regions" not in src[1]


def _ref_coco_shaped(tmp_path_factory):
  """A TFDS set shaped like ref_coco (objects: bbox + refexp/raw lists; no image caption),
  built here and prepared as ArrayRecord."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class SiglipTinyRefs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "objects": tfds.features.Sequence({
              "bbox": tfds.features.BBoxFeature(),
              "refexp": tfds.features.Sequence({"raw": tfds.features.Text()})})}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      bbox = tfds.features.BBox
      yield 0, {"image": np.full((30, 40, 3), 50, np.uint8), "objects": [
          {"bbox": bbox(ymin=0.2, xmin=0.1, ymax=0.6, xmax=0.5),
           "refexp": [{"raw": "red circle"}, {"raw": "the circle on the left"}]},
          {"bbox": bbox(ymin=0.1, xmin=0.6, ymax=0.3, xmax=0.9), "refexp": [{"raw": "star"}]}]}
      # A box TFDS accepts but training cannot use (empty), and a blank expression.
      yield 1, {"image": np.full((30, 40, 3), 90, np.uint8), "objects": [
          {"bbox": bbox(ymin=0.4, xmin=0.4, ymax=0.4, xmax=0.8), "refexp": [{"raw": "flat"}]},
          {"bbox": bbox(ymin=0.1, xmin=0.1, ymax=0.9, xmax=0.9), "refexp": [{"raw": "  "}]}]}

  data_dir = str(tmp_path_factory.mktemp("tfds_refs"))
  SiglipTinyRefs(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return "siglip_tiny_refs", data_dir


def test_prepare_converts_a_ref_coco_shaped_tfds_set(tmp_path_factory):
  name, data_dir = _ref_coco_shaped(tmp_path_factory)
  src = sources.TfdsSource(name, data_dir=data_dir, text_key="", region_key="objects")
  out = str(tmp_path_factory.mktemp("prepared") / "refs")
  summary = prepare.prepare(src, out, workers=1)
  assert summary["written"] == 2
  assert (summary["regions"], summary["skipped_regions"]) == (3, 2)
  prepared = sources.ArrayRecordSource(out)
  first = prepared[0]
  # ymin xmin ymax xmax -> x0 y0 x1 y1, each referring expression its own region.
  assert first["texts"] == ["red circle, star"]
  np.testing.assert_allclose([r["box"] for r in first["regions"]],
                             [[0.1, 0.2, 0.5, 0.6]] * 2 + [[0.6, 0.1, 0.9, 0.3]], atol=1e-6)
  assert [r["caption"] for r in first["regions"]] == ["red circle", "the circle on the left",
                                                      "star"]
  assert prepared[1]["regions"] == []


def test_a_box_order_that_does_not_exist_is_refused():
  with pytest.raises(ValueError, match="box order 'xyyx'"):
    sources.TfdsSource.__init__(sources.TfdsSource.__new__(sources.TfdsSource), "x",
                                box_order="xyyx")
