"""MXNet RecordIO (the insightface training-set format) in pure Python: no mxnet.

Layout of a `.rec` file (little endian), as dmlc-core writes it:
  every chunk = uint32 magic 0xced7230a, uint32 lrecord, payload, zero padding to 4 bytes;
  lrecord = cflag << 29 | length. cflag 0: a whole record; 1/2/3: first/middle/last part
  of a record the writer split where its payload held the magic word at a 4-byte aligned
  offset (the reader puts the magic back between parts).
The `.idx` file is text, one `key\\toffset` line per record (offset of its first chunk).

An insightface image record = IRHeader (uint32 flag, float32 label, uint64 id, uint64 id2)
+ flag float32 labels when flag > 0 + the encoded image (JPEG). Record 0 of an insightface
set is a header record whose labels (a, b) say: records 1..a-1 are images, a..b-1 describe
identities; `InsightfaceRecord` iterates the images only, as insightface does (it takes the
first record as the header when its flag > 0; here it must also carry no image bytes).
"""
from __future__ import annotations

import os
import struct
import threading
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24


class RecordIOError(ValueError):
  """A malformed .rec / .idx file (the message names the file and the offset)."""


class IRHeader(NamedTuple):
  flag: int
  label: Union[float, np.ndarray]  # float when flag == 0, else (flag,) float32
  id: int
  id2: int


def pack_header(header: IRHeader, payload: bytes) -> bytes:
  """IRHeader + payload, as mx.recordio.pack writes it (array labels set flag = len)."""
  label = header.label
  if isinstance(label, (int, float, np.integer, np.floating)):
    return struct.pack(_IR_FORMAT, 0, float(label), header.id, header.id2) + payload
  label = np.asarray(label, np.float32).reshape(-1)
  return (struct.pack(_IR_FORMAT, label.size, 0.0, header.id, header.id2)
          + label.astype("<f4").tobytes() + payload)


def unpack_header(buf: bytes, where: str = "record") -> Tuple[IRHeader, bytes]:
  """Inverse of `pack_header`; `where` names the record in errors."""
  if len(buf) < IR_SIZE:
    raise RecordIOError(f"{where}: {len(buf)} bytes, shorter than the {IR_SIZE}-byte image "
                        "record header; this is not an insightface image record")
  flag, label, id_, id2 = struct.unpack_from(_IR_FORMAT, buf)
  rest = buf[IR_SIZE:]
  if flag > 0:
    if len(rest) < 4 * flag:
      raise RecordIOError(f"{where}: header says {flag} float labels but only {len(rest)} "
                          "bytes follow; the record is damaged")
    label = np.frombuffer(rest, "<f4", flag).astype(np.float32)
    rest = rest[4 * flag:]
  return IRHeader(flag, label, id_, id2), rest


def read_idx(path: str) -> Dict[int, int]:
  """The .idx file: {key: offset} in file order."""
  out: Dict[int, int] = {}
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("ascii")
      except UnicodeDecodeError:
        raise RecordIOError(f"{path} line {n}: not text (an .idx holds 'key<TAB>offset' "
                            "lines); pass the .idx written with the .rec") from None
      line = line.strip()
      if not line:
        continue
      parts = line.split("\t")
      if len(parts) != 2:
        parts = line.split()
      try:
        key, off = int(parts[0]), int(parts[1])
      except (ValueError, IndexError):
        raise RecordIOError(f"{path} line {n}: {line[:60]!r} is not 'key<TAB>offset'; "
                            "pass the .idx written with the .rec") from None
      out[key] = off
  return out


class RecordIOReader:
  """Random access (via the .idx) and sequential reading of a .rec file.

  Opens the file lazily, so an instance pickles into grain worker processes.
  """

  def __init__(self, rec_path: str, idx_path: Optional[str] = None):
    self.rec_path = rec_path
    self.idx_path = idx_path
    if not os.path.isfile(rec_path):
      raise FileNotFoundError(f"{rec_path}: no such .rec file")
    self.size = os.path.getsize(rec_path)
    self.index: Dict[int, int] = {}
    if idx_path is not None:
      if not os.path.isfile(idx_path):
        raise FileNotFoundError(f"{idx_path}: no such .idx file (it is written with the .rec)")
      self.index = read_idx(idx_path)
      for key, off in self.index.items():
        if off < 0 or off + 8 > self.size:
          raise RecordIOError(
              f"{idx_path}: key {key} points at offset {off}, past the end of {rec_path} "
              f"({self.size} bytes); the .rec is truncated or the .idx belongs to another .rec")
    self._f = None
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_f"] = None
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  @property
  def keys(self) -> List[int]:
    return list(self.index)

  def _fd(self) -> int:
    if self._f is None:
      with self._lock:
        if self._f is None:
          self._f = open(self.rec_path, "rb")
    return self._f.fileno()

  def _pread(self, n: int, offset: int) -> bytes:
    # positional reads: grain reads records from several threads through one handle
    if hasattr(os, "pread"):
      return os.pread(self._fd(), n, offset)
    self._fd()
    with self._lock:
      self._f.seek(offset)
      return self._f.read(n)

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def read_at(self, offset: int) -> Tuple[bytes, int]:
    """The record starting at `offset` and the offset just after it."""
    parts: List[bytes] = []
    pos = offset
    while True:
      head = self._pread(8, pos)
      if len(head) < 8:
        raise RecordIOError(f"{self.rec_path}: truncated record header at offset {pos} "
                            f"(file is {self.size} bytes); re-copy the .rec")
      magic, lrec = struct.unpack("<II", head)
      if magic != MAGIC:
        raise RecordIOError(f"{self.rec_path}: bad magic 0x{magic:08x} at offset {pos} (expected "
                            f"0x{MAGIC:08x}); not MXNet RecordIO, or the .idx offsets are wrong")
      cflag, length = lrec >> 29, lrec & _LEN_MASK
      padded = (length + 3) & ~3
      data = self._pread(padded, pos + 8)
      if len(data) < padded:
        raise RecordIOError(f"{self.rec_path}: truncated record at offset {pos}: needs {padded} "
                            f"bytes, {len(data)} left; re-copy the .rec")
      parts.append(data[:length])
      pos += 8 + padded
      if cflag in (0, 3):
        break
      parts.append(_MAGIC_BYTES)  # the writer dropped the magic word where it split
    return b"".join(parts), pos

  def read_key(self, key: int) -> bytes:
    if key not in self.index:
      raise KeyError(f"{self.idx_path}: no record with key {key}")
    return self.read_at(self.index[key])[0]

  def __iter__(self) -> Iterator[Tuple[int, bytes]]:
    """(offset, record) over the whole file, in file order."""
    pos = 0
    while pos < self.size:
      rec, nxt = self.read_at(pos)
      yield pos, rec
      pos = nxt


class RecordIOWriter:
  """Writes .rec (+ .idx when idx_path is given) exactly as dmlc-core does."""

  def __init__(self, rec_path: str, idx_path: Optional[str] = None):
    self._f = open(rec_path, "wb")
    self._idx = open(idx_path, "w") if idx_path else None

  def write(self, buf: bytes, key: Optional[int] = None) -> int:
    if len(buf) >= 1 << 29:
      raise ValueError(f"record of {len(buf)} bytes: RecordIO records must be < 2**29 bytes")
    start = self._f.tell()
    # Split where the payload holds the magic word at an aligned offset (cflag 1, 2, 3).
    cuts = [i for i in range(0, len(buf) - 3, 4) if buf[i:i + 4] == _MAGIC_BYTES]
    begin = 0
    for i in cuts:
      self._chunk(1 if begin == 0 else 2, buf[begin:i])
      begin = i + 4
    self._chunk(3 if cuts else 0, buf[begin:])
    if self._idx is not None:
      if key is None:
        raise ValueError("an indexed writer needs a key for every record")
      self._idx.write(f"{key}\t{start}\n")
    return start

  def _chunk(self, cflag: int, data: bytes) -> None:
    self._f.write(struct.pack("<II", MAGIC, (cflag << 29) | len(data)))
    self._f.write(data)
    self._f.write(b"\0" * (((len(data) + 3) & ~3) - len(data)))

  def close(self) -> None:
    self._f.close()
    if self._idx is not None:
      self._idx.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class InsightfaceRecord:
  """The image records of an insightface `train.rec`/`train.idx` pair, by position.

  `self[i] -> (label: int, encoded image: bytes, key: int)`. Random access, picklable:
  usable directly as a grain data source after `as_grain_source()`.
  """

  def __init__(self, rec_path: str, idx_path: Optional[str] = "auto"):
    """idx_path: the .idx; "auto": the .idx beside the .rec if any; None: scan the .rec."""
    if idx_path == "auto":
      guess = os.path.splitext(rec_path)[0] + ".idx"
      idx_path = guess if os.path.isfile(guess) else None
    self.reader = RecordIOReader(rec_path, idx_path)
    self.header0: Optional[Tuple[int, int]] = None
    if idx_path is not None:
      keys = self.reader.keys
      offsets = [self.reader.index[k] for k in keys]
    else:  # no index: scan the file once for record offsets
      offsets = [off for off, _ in self.reader]
      keys = list(range(len(offsets)))
      self.reader.index = dict(zip(keys, offsets))
    if not keys:
      raise RecordIOError(f"{rec_path}: holds no records")
    first = keys[0]
    head, payload = unpack_header(self.reader.read_key(first), f"{rec_path} record {first}")
    if head.flag > 0 and not payload:  # the header record holds labels and no image
      lo = int(head.label[0])
      self.header0 = (lo, int(head.label[1]) if head.flag > 1 else lo)
      self.image_keys = [k for k in range(1, lo)]
      missing = [k for k in self.image_keys[:1] + self.image_keys[-1:] if k not in self.reader.index]
      if missing:
        raise RecordIOError(f"{self.reader.idx_path}: header record says images are keys 1..{lo - 1}"
                            f" but key {missing[0]} is not in the index; the .idx is incomplete")
    else:
      self.image_keys = keys
    self.rec_path = rec_path

  def __len__(self) -> int:
    return len(self.image_keys)

  def __getitem__(self, i: int) -> Tuple[int, bytes, int]:
    key = self.image_keys[i]
    header, img = unpack_header(self.reader.read_key(key), f"{self.rec_path} record {key}")
    label = header.label
    if not isinstance(label, float):
      label = label[0]
    return int(label), img, key


def write_insightface_rec(rec_path: str, idx_path: str,
                          images: Sequence[Tuple[bytes, int]]) -> None:
  """Writes an insightface-layout set (header record 0, images, identity records).

  For tests and fixtures; the layout is the one insightface's im2rec produces.
  """
  n = len(images)
  labels = sorted({int(l) for _, l in images})
  with RecordIOWriter(rec_path, idx_path) as w:
    # Record 0: labels (first identity record, end of identity records).
    w.write(pack_header(IRHeader(2, np.array([n + 1, n + 1 + len(labels)], np.float32), 0, 0),
                        b""), key=0)
    for i, (img, label) in enumerate(images, 1):
      w.write(pack_header(IRHeader(0, float(label), i, 0), img), key=i)
    by_label: dict = {}  # label -> its record indices (one pass: 10k identities are quick)
    for i, (_, l) in enumerate(images, 1):
      by_label.setdefault(int(l), []).append(i)
    for j, label in enumerate(labels):
      ids = by_label[label]
      w.write(pack_header(IRHeader(2, np.array([ids[0], ids[-1] + 1], np.float32), 0, 0), b""),
              key=n + 1 + j)


__all__ = ["MAGIC", "IRHeader", "RecordIOError", "RecordIOReader", "RecordIOWriter",
           "InsightfaceRecord", "pack_header", "unpack_header", "read_idx",
           "write_insightface_rec"]
