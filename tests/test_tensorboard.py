"""TensorBoard event files: written by tensorboardX without TensorFlow, read back by
TensorBoard's own EventAccumulator."""
import subprocess
import sys

import numpy as np

from siglip_jax import metrics, tensorboard


def test_every_scalar_reads_back_in_tensorboard(tmp_path):
  w = metrics.make_writers(str(tmp_path), is_main=True)
  w.write(3, {"train/loss": 1.0, "train/lr": np.float32(0.5), "perf/mfu": float("nan"),
              "note": "text", "hist": np.ones(3)})
  w.write(5, {"train/loss": 0.75, "train/lr": 0.25})
  w.close()
  assert tensorboard.read_scalars(str(tmp_path)) == {
      "train/loss": [(3, 1.0), (5, 0.75)], "train/lr": [(3, 0.5), (5, 0.25)]}
  # Other processes write nothing.
  other = tmp_path / "other"
  other.mkdir()
  w = metrics.make_writers(str(other), is_main=False)
  w.write(3, {"train/loss": 1.0})
  w.close()
  assert not tensorboard.event_files(str(other))


def test_two_writers_in_one_second_keep_apart(tmp_path):
  for step in (1, 2):
    w = tensorboard.make_writer(str(tmp_path))
    w.write(step, {"a": float(step)})
    w.close()
  assert len(tensorboard.event_files(str(tmp_path))) == 2
  assert sorted(tensorboard.read_scalars(str(tmp_path))["a"]) == [(1, 1.0), (2, 2.0)]


def test_writing_events_imports_no_tensorflow(tmp_path):
  code = ("import sys\n"
          "from siglip_jax import metrics, trainer\n"
          "w = metrics.make_writers(sys.argv[1], True); w.write(1, {'a': 1.0}); w.close()\n"
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n")
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert tensorboard.read_scalars(str(tmp_path)) == {"a": [(1, 1.0)]}
