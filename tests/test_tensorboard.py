"""TensorBoard event files: written without TensorFlow, read back by our reader and by
TensorBoard's own EventAccumulator (when the tensorboard package is installed)."""
import os

import numpy as np
import pytest

from siglip_jax import metrics, tensorboard


def test_crc32c_known_values():
  # RFC 3720 (iSCSI) test vectors for CRC32C.
  assert tensorboard.crc32c(b"") == 0
  assert tensorboard.crc32c(b"123456789") == 0xE3069283
  assert tensorboard.crc32c(bytes(32)) == 0x8A9136AA


def _write(logdir):
  w = tensorboard.make_writer(str(logdir), backend="events")
  w.write(1, {"train/loss": 2.5, "train/lr": np.float32(1e-3), "perf/mfu": float("nan"),
              "note": "text", "hist": np.arange(3)})
  w.write(2, {"train/loss": np.asarray(2.0), "shapes/zeroshot_top1": 0.25})
  w.close()
  return w.path


def test_event_file_readable_by_own_reader(tmp_path):
  path = _write(tmp_path)
  assert os.path.basename(path).startswith("events.out.tfevents.")
  scalars = tensorboard.read_scalars(str(tmp_path))
  assert scalars["train/loss"] == [(1, 2.5), (2, 2.0)]
  assert scalars["train/lr"][0][1] == pytest.approx(1e-3)
  assert scalars["shapes/zeroshot_top1"] == [(2, 0.25)]
  # Non-finite and non-scalar values are left out, not written as garbage.
  assert not {"perf/mfu", "note", "hist"} & set(scalars)
  first = tensorboard.decode_event(tensorboard.read_records(path)[0])
  assert first["file_version"] == "brain.Event:2"


def test_corrupt_record_detected(tmp_path):
  path = _write(tmp_path)
  data = bytearray(open(path, "rb").read())
  data[-6] ^= 0xFF
  open(path, "wb").write(bytes(data))
  with pytest.raises(ValueError, match="CRC"):
    tensorboard.read_records(path)


def test_event_file_readable_by_tensorboard(tmp_path):
  pytest.importorskip("tensorboard")
  from tensorboard.backend.event_processing import event_accumulator
  _write(tmp_path)
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "shapes/zeroshot_top1"}
  loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
  assert loss == [(1, 2.5), (2, 2.0)]


def test_make_writers_writes_jsonl_and_events(tmp_path):
  w = metrics.make_writers(str(tmp_path), is_main=True)
  w.write(3, {"train/loss": 1.0})
  w.close()
  assert (tmp_path / "metrics.jsonl").read_text().strip() == '{"step": 3, "train/loss": 1.0}'
  assert tensorboard.read_scalars(str(tmp_path)) == {"train/loss": [(3, 1.0)]}
  # Other processes write nothing.
  other = tmp_path / "other"
  other.mkdir()
  w = metrics.make_writers(str(other), is_main=False)
  w.write(3, {"train/loss": 1.0})
  w.close()
  assert not tensorboard.event_files(str(other))


def test_clu_writer_when_installed(tmp_path):
  pytest.importorskip("clu")
  pytest.importorskip("tensorflow")
  w = tensorboard.make_writer(str(tmp_path))
  assert type(w).__name__ == "_CluWriter"
  w.write(4, {"train/loss": 1.25, "note": "text"})
  w.close()
  # TF2 writes scalars as tensors; our reader understands those too.
  assert tensorboard.read_scalars(str(tmp_path)) == {"train/loss": [(4, 1.25)]}


def test_writer_does_not_import_tensorflow_without_clu(tmp_path):
  import subprocess
  import sys
  code = ("import sys, importlib.util\n"
          "from siglip_jax import metrics, trainer\n"
          "w = metrics.make_writers(sys.argv[1], True); w.write(1, {'a': 1.0}); w.close()\n"
          "if importlib.util.find_spec('clu') is None:\n"
          "  assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n")
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert tensorboard.read_scalars(str(tmp_path)) == {"a": [(1, 1.0)]}
