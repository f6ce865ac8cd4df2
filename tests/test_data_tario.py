"""The shard reader (data/tario.py) against Python's `tarfile`: every tar flavour a WebDataset shard may come in."""

from __future__ import annotations

import io
import tarfile

import pytest

from ldm_lightning.data import tario


def _members(fmt: int, names: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)  # not a sample member: skipped
        for i, name in enumerate(names):
            data = bytes(range(256)) * (i * 7 % 5) + name.encode()  # sizes 0..1k+, not block-aligned
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


NAMES = ["a/000001.png", "a/000001.cls", "a/000002.png", "x" * 90 + "/deep/" + "y" * 80 + "/000003.txt",
         "z" * 120 + ".json", "b/000004.jpg"]


def _reference(raw: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


class _Trickle(io.RawIOBase):
    """A pipe-like reader that returns at most `n` bytes per call."""

    def __init__(self, data: bytes, n: int):
        self.data, self.n, self.pos = data, n, 0

    def read(self, size=-1):
        size = self.n if size < 0 else min(size, self.n)
        out = self.data[self.pos:self.pos + size]
        self.pos += len(out)
        return out


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
@pytest.mark.parametrize("read_size", [tario.READ_SIZE, 700, 512])
def test_members_equal_tarfile(fmt, read_size, monkeypatch):
    names = NAMES if fmt != tarfile.USTAR_FORMAT else [n for n in NAMES if len(n.rsplit("/", 1)[-1]) <= 100]
    raw = _members(fmt, names)
    monkeypatch.setattr(tario, "READ_SIZE", read_size)  # members straddling refills, short reads
    for f in (io.BytesIO(raw), _Trickle(raw, 333)):
        got = list(tario.iter_members(f))
        assert got == _reference(raw)
        assert [n for n, _ in got] == names


def test_truncated_tar_names_the_source():
    raw = _members(tarfile.GNU_FORMAT, NAMES)
    for cut in (2 * 512 + 10, 3 * 512 + 100):  # inside the first file's data; inside the second header
        with pytest.raises(EOFError, match="shard-7.tar: truncated tar"):
            list(tario.iter_members(io.BytesIO(raw[:cut]), "shard-7.tar"))


def test_samples_group_by_key(tmp_path):
    p = tmp_path / "s.tar"
    p.write_bytes(_members(tarfile.PAX_FORMAT, ["k/0001.png", "k/0001.cls", "k/0002.png", "k/0002.a.b.txt"]))
    got = list(tario.iter_samples(str(p)))
    assert [s["__key__"] for s in got] == ["k/0001", "k/0002"]
    assert set(got[1]) == {"__key__", "__url__", "png", "a.b.txt"}
