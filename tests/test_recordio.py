"""MXNet RecordIO reader/writer on files built by hand in the dmlc-core layout."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from askd_jax.data import recordio

MAGIC = 0xCED7230A


def _png(pixels: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def _chunk(cflag: int, data: bytes) -> bytes:
  pad = (-len(data)) % 4
  return struct.pack("<II", MAGIC, (cflag << 29) | len(data)) + data + b"\0" * pad


def test_writer_bytes_match_dmlc_layout(tmp_path):
  rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
  m = struct.pack("<I", MAGIC)
  plain, split = b"hello", b"abcd" + m + b"efgh" + m + b"xy"
  with recordio.RecordIOWriter(str(rec), str(idx)) as w:
    w.write(plain, key=0)
    w.write(split, key=7)
  # hand-built expectation: record 2 is split where the aligned magic sits (cflag 1, 2, 3)
  expected = _chunk(0, plain) + _chunk(1, b"abcd") + _chunk(2, b"efgh") + _chunk(3, b"xy")
  assert rec.read_bytes() == expected
  assert idx.read_text() == f"0\t0\n7\t{len(_chunk(0, plain))}\n"
  r = recordio.RecordIOReader(str(rec), str(idx))
  assert r.keys == [0, 7]
  assert r.read_key(0) == plain and r.read_key(7) == split
  assert [rec_ for _, rec_ in r] == [plain, split]


def test_hand_built_multipart_file_reads(tmp_path):
  m = struct.pack("<I", MAGIC)
  data = _chunk(1, b"") + _chunk(3, b"tail1")  # a record that starts with the magic word
  rec = tmp_path / "b.rec"
  rec.write_bytes(data)
  assert [x for _, x in recordio.RecordIOReader(str(rec))] == [m + b"tail1"]


def _images(n=7, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (6 + i, 5, 3), dtype=np.uint8) for i in range(n)]


def test_insightface_round_trip(tmp_path):
  pix = _images()
  labels = [3, 3, 0, 1, 1, 1, 2]
  rec, idx = str(tmp_path / "train.rec"), str(tmp_path / "train.idx")
  recordio.write_insightface_rec(rec, idx, [(_png(p), l) for p, l in zip(pix, labels)])
  data = recordio.InsightfaceRecord(rec, idx)
  assert data.header0 == (8, 12)  # images 1..7, identity records 8..11
  assert len(data) == 7
  for i in range(7):
    label, img, key = data[i]
    assert (label, key) == (labels[i], i + 1)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(img))), pix[i])
  # identity records hold [first, end) of each identity's image keys
  head, rest = recordio.unpack_header(data.reader.read_key(8 + 3))  # label 3
  assert head.flag == 2 and list(head.label) == [1.0, 3.0] and rest == b""


def test_array_labels_and_no_header_record(tmp_path):
  rec, idx = str(tmp_path / "x.rec"), str(tmp_path / "x.idx")
  with recordio.RecordIOWriter(rec, idx) as w:  # no header record 0: keys are all images
    for k, lab in [(5, 4.0), (9, 2.0)]:
      w.write(recordio.pack_header(recordio.IRHeader(2, np.array([lab, 7.0]), k, 0), b"IMG"),
              key=k)
  data = recordio.InsightfaceRecord(rec, idx)
  assert data.header0 is None
  assert [data[i] for i in range(2)] == [(4, b"IMG", 5), (2, b"IMG", 9)]
  raw = data.reader.read_key(5)
  assert struct.unpack_from("<IfQQ", raw) == (2, 0.0, 5, 0) and len(raw) == 24 + 8 + 3
  # without an .idx the file is scanned sequentially
  scanned = recordio.InsightfaceRecord(rec, None)
  assert [scanned[i][0] for i in range(2)] == [4, 2]


def test_concurrent_reads_and_pickle(tmp_path):
  # grain reads records from many threads through one reader (and pickles it to workers)
  import concurrent.futures
  import pickle
  rng = np.random.default_rng(1)
  blobs = [rng.bytes(int(rng.integers(1, 3000))) for _ in range(300)]
  rec, idx = str(tmp_path / "t.rec"), str(tmp_path / "t.idx")
  recordio.write_insightface_rec(rec, idx, [(b, i % 7) for i, b in enumerate(blobs)])
  data = recordio.InsightfaceRecord(rec, idx)
  order = rng.permutation(300).tolist() * 3
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    got = list(pool.map(lambda i: data[i], order))
  assert all(g == (i % 7, blobs[i], i + 1) for g, i in zip(got, order))
  data[0]  # opens the file; the copy must reopen its own
  copy = pickle.loads(pickle.dumps(data))
  assert copy[299] == (299 % 7, blobs[299], 300)


def _fixture(tmp_path):
  rec, idx = str(tmp_path / "train.rec"), str(tmp_path / "train.idx")
  recordio.write_insightface_rec(rec, idx, [(_png(p), i) for i, p in enumerate(_images(3))])
  return rec, idx


def _one_line(e):
  assert "\n" not in str(e.value)
  return str(e.value)


def test_truncated_rec(tmp_path):
  rec, idx = _fixture(tmp_path)
  with open(rec, "rb") as f:
    data = f.read()
  last = recordio.read_idx(idx)[3]
  with open(rec, "wb") as f:
    f.write(data[: last + 20])  # cut inside image record 3
  # with its .idx: the records after the cut are past the end, caught on open
  with pytest.raises(recordio.RecordIOError) as e:
    recordio.InsightfaceRecord(rec, idx)
  msg = _one_line(e)
  assert rec in msg and "truncated" in msg
  # read at the damaged record itself (and by a sequential scan): names the offset
  reader = recordio.RecordIOReader(rec)
  assert recordio.unpack_header(reader.read_at(recordio.read_idx(idx)[2])[0])[0].label == 1.0
  for read in (lambda: reader.read_at(last), lambda: recordio.InsightfaceRecord(rec, None)):
    with pytest.raises(recordio.RecordIOError) as e:
      read()
    msg = _one_line(e)
    assert rec in msg and f"offset {last}" in msg and "truncated" in msg


def test_idx_past_end(tmp_path):
  rec, idx = _fixture(tmp_path)
  with open(idx, "a") as f:
    f.write("99\t123456789\n")
  with pytest.raises(recordio.RecordIOError) as e:
    recordio.InsightfaceRecord(rec, idx)
  msg = _one_line(e)
  assert idx in msg and rec in msg and "123456789" in msg and "past the end" in msg


def test_bad_magic(tmp_path):
  rec, idx = _fixture(tmp_path)
  off = recordio.read_idx(idx)[2]
  lines = open(idx).read().replace(f"2\t{off}\n", f"2\t{off + 4}\n")
  open(idx, "w").write(lines)
  data = recordio.InsightfaceRecord(rec, idx)
  with pytest.raises(recordio.RecordIOError) as e:
    data[1]
  msg = _one_line(e)
  assert rec in msg and f"offset {off + 4}" in msg and "magic" in msg
