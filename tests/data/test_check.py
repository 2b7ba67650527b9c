"""`python -m siglip_jax.data.check` and `python -m siglip_jax.data.prepare`, as a user runs them."""
import json
import os

import pytest
from PIL import Image

from conftest import run_module
from wds_fixtures import wds  # noqa: F401  pylint: disable=unused-import


def _one_json(stdout):
  lines = [l for l in stdout.splitlines() if l.strip()]
  assert len(lines) == 1, stdout   # exactly one JSON object on stdout
  return json.loads(lines[0])


def test_check_counts_exactly_the_unusable_records(wds):
  proc = run_module("siglip_jax.data.check", [f"--shards={wds['glob']}", "--workers=2"])
  report = _one_json(proc.stdout)
  assert report == {"records": wds["records"], "usable": len(wds["usable"]),
                    "skipped": wds["skipped"]}
  assert "truncated_image" in proc.stderr   # the bad records are named for the user


def test_check_a_folder_and_a_prepared_set(wds, tmp_path):
  folder = tmp_path / "folder"
  folder.mkdir()
  Image.new("RGB", (20, 20), (1, 2, 3)).save(folder / "ok.png")
  (folder / "bad.jpg").write_bytes(b"GIF89a but not really")
  rows = [{"image": "ok.png", "caption": "fine"}, {"image": "bad.jpg", "caption": "x"},
          {"image": "ok.png", "caption": "   "}, {"image": "ok.png"}]
  (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  report = _one_json(run_module("siglip_jax.data.check", [f"--dir={folder}"]).stdout)
  assert report == {"records": 4, "usable": 1, "skipped": {
      "blank_caption": 1, "missing_caption": 1, "undecodable_image": 1}}

  pytest.importorskip("array_record")
  out = tmp_path / "prepared"
  summary = _one_json(run_module("siglip_jax.data.prepare",
                                 [f"--src={wds['dir']}", f"--out={out}", "--workers=1"]).stdout)
  assert summary["written"] == len(wds["usable"]) and summary["skipped"] == wds["skipped"]
  report = _one_json(run_module("siglip_jax.data.check", [f"--dir={out}"]).stdout)
  assert report == {"records": len(wds["usable"]), "usable": len(wds["usable"]), "skipped": {}}


def test_check_says_what_is_wrong_with_its_arguments(tmp_path):
  proc = run_module("siglip_jax.data.check", [f"--shards={tmp_path}/none-*.tar"], check=False)
  assert proc.returncode != 0 and "no WebDataset shards match" in proc.stderr
  assert not os.listdir(tmp_path)
