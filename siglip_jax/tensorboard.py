"""TensorBoard event files beside metrics.jsonl, with or without TensorFlow.

`make_writer(workdir)` picks, in order: clu's `metric_writers` (needs TensorFlow and clu, the
`[data]` extra), tensorboardX (if installed), else `EventFileWriter` below: TensorBoard's file
format written by hand. The GPU machines have JAX but no TensorFlow, and the format is small:
TFRecord framing (length, masked CRC32C of the length, payload, masked CRC32C of the payload)
around `Event` protos, each holding a `Summary` of scalar `simple_value`s. Only scalars are
written; TensorBoard reads such files as its own. `read_scalars` reads them back (for tests and
for a quick look without TensorBoard).

A URL workdir (`gs://bucket/run`) works too: clu's writer (TensorFlow) writes it natively;
`EventFileWriter` goes through `paths.AppendFile`, which rewrites the event file object on flush
(object stores cannot append; at most every `paths.REMOTE_FLUSH_SECONDS`, and on close);
tensorboardX is not picked for URLs.
"""
import importlib.util
import math
import os
import socket
import struct
import time

import numpy as np
from etils import epath

from siglip_jax import paths

# --------------------------------------------------------------------------- CRC32C (Castagnoli)

def _crc_table():
  poly, table = 0x82F63B78, []   # reflected Castagnoli polynomial
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ poly if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  # TFRecord masks the CRC so that a CRC of data that itself holds CRCs stays well spread.
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(payload: bytes) -> bytes:
  header = struct.pack("<Q", len(payload))
  return (header + struct.pack("<I", masked_crc32c(header)) + payload
          + struct.pack("<I", masked_crc32c(payload)))


# --------------------------------------------------------------------------- protobuf, by hand
# Field numbers from tensorflow/core/util/event.proto and framework/summary.proto:
# Event{1: double wall_time, 2: int64 step, 3: string file_version, 5: Summary summary}
# Summary{1: repeated Value value}; Value{1: string tag, 2: float simple_value, 8: TensorProto}
# TensorProto{1: dtype (1 float, 2 double), 4: tensor_content, 5: float_val, 6: double_val}: how
# TF2's summary API (clu) writes a scalar; only read, never written here.

def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1   # int64 fields: negatives as two's complement, as protobuf does
  out = bytearray()
  while True:
    bits, n = n & 0x7F, n >> 7
    out.append(bits | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire_type: int, body: bytes) -> bytes:
  return _varint(number << 3 | wire_type) + body


def _length_delimited(number: int, body: bytes) -> bytes:
  return _field(number, 2, _varint(len(body)) + body)


def encode_event(wall_time, step=None, scalars=None, file_version=None) -> bytes:
  out = _field(1, 1, struct.pack("<d", wall_time))
  if step is not None:
    out += _field(2, 0, _varint(int(step)))
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    summary = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode())
                          + _field(2, 5, struct.pack("<f", value)))
        for tag, value in scalars.items())
    out += _length_delimited(5, summary)
  return out


def _read_varint(buf, pos):
  result = shift = 0
  while True:
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return result, pos


def _fields(buf):
  """Yields (field number, wire type, value) of a protobuf message (wire types 0, 1, 2, 5)."""
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 2:
      n, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + n], pos + n
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    yield number, wire, value


def _tensor_scalar(buf):
  """The value of a one-element float/double TensorProto, else None."""
  dtype, content, packed = 1, None, {}
  for number, _, value in _fields(buf):
    if number == 1:
      dtype = value
    elif number == 4:
      content = value
    elif number in (5, 6):   # packed (wire 2) or a single fixed32/fixed64: bytes either way
      packed[number] = bytes(value)
  fmt, size = {1: ("<f", 4), 2: ("<d", 8)}.get(dtype, (None, 0))
  data = content if content is not None else packed.get(5 if dtype == 1 else 6)
  if fmt is None or data is None or len(data) != size:
    return None
  return struct.unpack(fmt, data)[0]


def decode_event(buf):
  """-> dict(wall_time, step, file_version, scalars={tag: value}) for one Event payload."""
  event = dict(wall_time=None, step=0, file_version=None, scalars={})
  for number, _, value in _fields(buf):
    if number == 1:
      event["wall_time"] = struct.unpack("<d", value)[0]
    elif number == 2:
      event["step"] = value - (1 << 64) if value >= 1 << 63 else value
    elif number == 3:
      event["file_version"] = value.decode()
    elif number == 5:
      for vnum, _, vbody in _fields(value):
        if vnum != 1:
          continue
        tag, simple = None, None
        for n, _, v in _fields(vbody):
          if n == 1:
            tag = v.decode()
          elif n == 2:
            simple = struct.unpack("<f", v)[0]
          elif n == 8 and simple is None:
            simple = _tensor_scalar(v)
        if tag is not None and simple is not None:
          event["scalars"][tag] = simple
  return event


def read_records(path):
  """The payloads of a TFRecord file; raises ValueError on a bad CRC (a torn last record of a
  file still being written is left out, as TensorBoard does)."""
  if paths.is_remote(path):
    data = epath.Path(path).read_bytes()
  else:
    with open(path, "rb") as f:
      data = f.read()
  pos, out = 0, []
  while pos + 12 <= len(data):
    header = data[pos:pos + 8]
    (n,) = struct.unpack("<Q", header)
    if struct.unpack("<I", data[pos + 8:pos + 12])[0] != masked_crc32c(header):
      raise ValueError(f"{path}: bad length CRC at byte {pos}")
    end = pos + 12 + n + 4
    if end > len(data):
      break
    payload = data[pos + 12:pos + 12 + n]
    if struct.unpack("<I", data[end - 4:end])[0] != masked_crc32c(payload):
      raise ValueError(f"{path}: bad payload CRC at byte {pos}")
    out.append(payload)
    pos = end
  return out


def event_files(logdir):
  return sorted(paths.join(logdir, f) for f in paths.listdir(logdir) if ".tfevents." in f)


def read_scalars(logdir):
  """{tag: [(step, value), ...]} from every event file directly in `logdir`."""
  out = {}
  for path in event_files(logdir):
    for payload in read_records(path):
      event = decode_event(payload)
      for tag, value in event["scalars"].items():
        out.setdefault(tag, []).append((event["step"], value))
  return out


# --------------------------------------------------------------------------- writers

def _scalars(metrics):
  """Finite numeric scalars only: arrays, strings and NaN/inf have no `simple_value` home."""
  out = {}
  for tag, value in metrics.items():
    try:
      arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - whatever cannot become an array is not a scalar
      continue
    if arr.size == 1 and arr.dtype.kind in "biuf":
      v = float(arr.reshape(()))
      if math.isfinite(v):
        out[str(tag)] = v
  return out


class EventFileWriter:
  """Scalars to `logdir/events.out.tfevents.<time>.<host>`, flushed per write (a URL `logdir`:
  rewritten, see the module docstring)."""

  def __init__(self, logdir):
    paths.makedirs(logdir)
    now = time.time()
    # The pid keeps two writers started in one second (train, then evaluate) apart.
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.siglip_jax"
    self.path = paths.join(logdir, name)
    self._file = paths.AppendFile(self.path)
    self._file.write(frame_record(encode_event(now, file_version="brain.Event:2")))
    self._file.flush()

  def write(self, step, metrics):
    scalars = _scalars(metrics)
    if self._file is None or not scalars:
      return
    self._file.write(frame_record(encode_event(time.time(), step=step, scalars=scalars)))
    self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None


class _TensorboardXWriter:
  def __init__(self, logdir):
    import tensorboardX
    self._w = tensorboardX.SummaryWriter(logdir)

  def write(self, step, metrics):
    for tag, value in _scalars(metrics).items():
      self._w.add_scalar(tag, value, int(step))
    self._w.flush()

  def close(self):
    self._w.close()


class _CluWriter:
  def __init__(self, logdir):
    from clu import metric_writers
    # The summary writer alone: create_default_writer would also log every scalar to absl.
    self._w = metric_writers.SummaryWriter(logdir)

  def write(self, step, metrics):
    self._w.write_scalars(int(step), _scalars(metrics))
    self._w.flush()

  def close(self):
    self._w.close()


def make_writer(workdir, backend=None):
  """A writer with `write(step, {name: value})` and `close()`, logging to `workdir`.

  `backend`: None picks the first available of "clu", "tensorboardx", "events"."""
  order = [backend] if backend else ["clu", "tensorboardx", "events"]
  if paths.is_remote(workdir) and not backend:
    order.remove("tensorboardx")   # its own URL writers need their own clients; not relied on
  for name in order:
    try:
      if name == "clu":
        # Probe before importing: TensorFlow alone (no clu) must not cost a TF import.
        if not all(importlib.util.find_spec(m) for m in ("clu", "tensorflow")):
          raise ImportError("clu's metric_writers need both clu and tensorflow")
        return _CluWriter(workdir)
      if name == "tensorboardx":
        return _TensorboardXWriter(workdir)
      if name == "events":
        return EventFileWriter(workdir)
    except ImportError:
      if backend:
        raise
  raise ValueError(f"unknown TensorBoard writer backend {backend!r}")
