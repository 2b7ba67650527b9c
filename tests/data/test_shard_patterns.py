"""Shard patterns as WebDataset and img2dataset write them: brace ranges and lists, globs,
','-joined lists, and gs:// URLs (etils.epath's fsspec backend over an in-memory bucket)."""
import io
import logging
import os
import tarfile

import pytest

from siglip_jax.data import shard_patterns, sources


def _touch(root, *names):
  for name in names:
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(b"")
  return [os.path.join(root, n) for n in names]


def test_split_patterns_keeps_commas_inside_braces():
  assert shard_patterns.split_patterns("a/{x,y}.tar, b/*.tar,,c/{0..2}/{p,{q,r}}.tar") == [
      "a/{x,y}.tar", "b/*.tar", "c/{0..2}/{p,{q,r}}.tar"]
  assert shard_patterns.split_patterns(["a.tar,b.tar", "c/{d,e}.tar"]) == [
      "a.tar", "b.tar", "c/{d,e}.tar"]


def test_brace_ranges_lists_globs_and_comma_lists(tmp_path):
  root = str(tmp_path)
  shards = _touch(root, *[f"cc/{i:05d}.tar" for i in range(12)])
  laion = _touch(root, "laion/a-1.tar", "laion/a-2.tar", "coyo/b.tar", "coyo/x.txt")
  # img2dataset's names: a zero-padded range (the documented form, which matched nothing).
  assert sources.expand(f"{root}/cc/{{00000..00011}}.tar") == shards
  assert sources.expand(f"{root}/cc/{{00002..00004}}.tar") == shards[2:5]
  # a brace list, then a glob in each branch
  assert sources.expand(f"{root}/{{laion,coyo}}/*.tar") == sorted(laion[:3])
  # nested braces, and a ','-joined list whose first part has commas inside braces
  assert sources.expand(f"{root}/{{cc/{{00000,00001}},coyo/b}}.tar,{root}/laion/a-?.tar") == (
      sorted(shards[:2] + laion[:3]))
  # overlapping patterns: each shard once, sorted
  assert sources.expand([f"{root}/cc/*.tar", f"{root}/cc/0000{{0..3}}.tar"]) == shards


def test_a_pattern_matching_nothing_is_named(tmp_path, caplog):
  root = str(tmp_path)
  shards = _touch(root, "s/00000.tar", "s/00002.tar")
  with pytest.raises(FileNotFoundError) as e:
    sources.expand(f"{root}/s/*.tar,{root}/typo/{{0..3}}.tar,{root}/none-*.tar")
  assert f"'{root}/typo/{{0..3}}.tar'" in str(e.value) and "none-*.tar" in str(e.value)
  assert f"{root}/s/*.tar" not in str(e.value)
  with pytest.raises(ValueError, match="unbalanced|Unbalanced"):
    sources.expand(f"{root}/s/{{0..2.tar")
  with pytest.raises(ValueError, match="unknown URL scheme foo://"):
    sources.expand("foo://bucket/{0..2}.tar")
  # A range with holes (failed crawl shards) reads what exists and says what is missing.
  with caplog.at_level(logging.WARNING):
    assert sources.expand(f"{root}/s/{{00000..00002}}.tar") == shards
  assert f"{root}/s/00001.tar" in caplog.text
  # Only regular files: a folder or a FIFO matching a glob is no shard.
  os.mkfifo(os.path.join(root, "s", "fifo.tar"))
  os.mkdir(os.path.join(root, "s", "dir.tar"))
  assert sources.expand(f"{root}/s/*.tar") == shards


# ---------------------------------------------------------------------------------- gs://

@pytest.fixture
def gcs(monkeypatch):
  """fsspec's memory filesystem under the gs:// protocol, reached through etils.epath (as
  tests/test_remote_workdir.py does: no network, etils' real gs:// code path)."""
  from etils.epath import backend as epath_backend, gpath
  from fsspec.implementations.memory import MemoryFileSystem

  class FakeGCS(MemoryFileSystem):
    """Paths without the protocol are "bucket/key", as gcsfs has them (its glob returns so)."""
    protocol, root_marker = ("gs", "gcs"), ""
    store, pseudo_dirs = {}, [""]

    @classmethod
    def _strip_protocol(cls, path):
      path = os.fspath(path)
      return (path.split("://", 1)[1] if "://" in path else path).strip("/")

  monkeypatch.setenv("EPATH_USE_TF", "false")
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  fake, real = FakeGCS(skip_instance_cache=True), epath_backend.fsspec_backend.fs
  monkeypatch.setattr(epath_backend.fsspec_backend, "fs",
                      lambda p: fake if os.fspath(p).startswith("gs://") else real(p))
  return fake


def _tar(samples):
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for key, caption in samples:
      for ext, data in (("jpg", b"\xff\xd8 not decoded here"), ("txt", caption.encode())):
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def test_gs_patterns_are_expanded_and_read_through_epath(gcs):
  for i in range(3):
    gcs.pipe(f"gs://bucket/wds/{i:05d}.tar", _tar([(f"k{i}{j}", f"caption {i}{j}")
                                                   for j in range(2)]))
  gcs.pipe("gs://bucket/extra/x-1.tar", _tar([("x", "extra caption")]))
  gcs.pipe("gs://bucket/extra/notes.txt", b"not a shard")
  pattern = "gs://bucket/wds/{00000..00001}.tar,gs://bucket/extra/x-*.tar"
  assert sources.expand(pattern) == ["gs://bucket/extra/x-1.tar", "gs://bucket/wds/00000.tar",
                                     "gs://bucket/wds/00001.tar"]
  src = sources.WebDatasetSource(pattern)
  assert [src[i]["texts"] for i in range(len(src))] == [
      b"extra caption", b"caption 00", b"caption 01", b"caption 10", b"caption 11"]
  with pytest.raises(FileNotFoundError, match="gs://bucket/wds/9"):
    sources.expand("gs://bucket/wds/9{0..1}.tar")
