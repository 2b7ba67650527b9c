"""`python -m siglip_jax.data.check` and `python -m siglip_jax.data.prepare`, as a user runs them."""
import json
import os
import resource
import subprocess
import sys
import tempfile

import pytest
from PIL import Image

from conftest import REPO, cli_env, run_module
from hostile_data import hostile  # noqa: F401  pylint: disable=unused-import
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
  assert proc.returncode == 2 and "no WebDataset shards match" in proc.stderr
  assert [l for l in proc.stderr.splitlines() if l.strip()] == [
      f"error: no WebDataset shards match '{tmp_path}/none-*.tar'"]
  assert not os.listdir(tmp_path)


def _check_with_peak_rss(args):
  """(rc, stdout, stderr, peak RSS in bytes of check and its worker processes). wait4 reports
  the child's peak together with its waited-for children's. An 8 GiB address-space limit is a
  safety net only: a regression then fails here instead of exhausting the machine."""
  def limit():
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    proc = subprocess.Popen([sys.executable, "-m", "siglip_jax.data.check", *args], cwd=REPO,
                            env=cli_env(), stdout=out, stderr=err, preexec_fn=limit)
    try:
      _, status, usage = os.wait4(proc.pid, 0)
    finally:
      if proc.poll() is None:
        proc.kill()
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    return proc.returncode, out.read().decode(), err.read().decode(), usage.ru_maxrss * 1024


def test_check_counts_every_hostile_case_exactly_in_bounded_memory(hostile):
  """The acceptance check: shards (named by the brace form) holding a header claiming 1 TiB,
  a pax header claiming 1 TiB, a 1.2 GB (sparse) image member, shards cut short four ways,
  keys seen twice, NUL and control-character captions; then a folder whose captions.jsonl
  names /dev/zero, a FIFO, absolute paths, ../.., escaping symlinks and a 1.2 GB file."""
  shards, folder = hostile["shards"], hostile["folder"]
  rc, stdout, stderr, peak = _check_with_peak_rss([f"--shards={shards['pattern']}",
                                                   "--workers=2"])
  assert rc == 0, stderr[-3000:]
  assert _one_json(stdout) == {"records": shards["records"], "usable": shards["usable"],
                               "skipped": shards["skipped"]}
  assert peak < 1e9, f"check held {peak / 1e9:.2f} GB"
  for n in (0, 2, 3, 4, 5, 6, 7):   # every shard that dropped keys is named once, with why
    assert sum(f"h-{n:05d}.tar: " in line for line in stderr.splitlines()) == 1, (n, stderr)

  rc, stdout, stderr, peak = _check_with_peak_rss([f"--dir={folder['dir']}", "--workers=1"])
  assert rc == 0, stderr[-3000:]
  assert _one_json(stdout) == {"records": folder["records"], "usable": folder["usable"],
                               "skipped": folder["skipped"]}
  assert peak < 1e9, f"check held {peak / 1e9:.2f} GB"


def test_scan_in_worker_processes_gives_the_same_verdicts(hostile):
  from siglip_jax.data import check, sources
  src = sources.WebDatasetSource(hostile["shards"]["pattern"])
  one = list(check.scan(src, workers=1))
  assert list(check.scan(src, workers=2, chunk=3)) == one
  assert [v[0] for v in one] == list(range(hostile["shards"]["records"]))
