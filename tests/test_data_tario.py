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


def _tar(entries: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _by_general_path(raw: bytes) -> list[dict]:
    """What the per-member reader gives, grouped like WebDataset: the reference for the fast path."""
    return _flatten(tario._sequential_blocks(io.BytesIO(raw), "<ref>"))


def _flatten(blocks) -> list[dict]:
    return [{"__key__": k, **{e: col[i] for e, col in m.items() if col[i] is not None}}
            for keys, m in blocks for i, k in enumerate(keys)]


def _shard_entries() -> list[tuple[str, bytes]]:
    """Keys of different lengths, a sample without a `cls`, a repeated extension, multi-dot extensions,
    a member without an extension, a member bigger than a small chunk."""
    out = []
    for i in range(40):
        key = f"d/{'k' * (i % 3)}{i:05d}"
        out.append((f"{key}.png", bytes([i]) * (100 + 37 * i)))
        if i % 7:
            out.append((f"{key}.cls", str(i % 10).encode()))
        if i == 5:
            out.append((f"{key}.cls", b"9"))  # repeated: the last one wins
        out.append((f"{key}.seg.mask.png", b"m" * i))
        if i == 11:
            out.append(("d/README", b"not a sample member"))
    out.append(("d/big.npy", bytes(range(256)) * 40))  # 10 KiB: larger than the 2 KiB chunks below
    return out


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
@pytest.mark.parametrize("read_size", [tario.READ_SIZE, 2048, 512])
def test_fast_path_equals_general_path(fmt, read_size, monkeypatch, tmp_path):
    raw = _tar(_shard_entries(), fmt)
    want = _by_general_path(raw)
    assert len(want) == 41 and want[5]["cls"] == b"9" and "cls" not in want[7]
    calls = []
    real = tario._index_chunk
    monkeypatch.setattr(tario, "_index_chunk", lambda *a: calls.append(r := real(*a)) or r)
    monkeypatch.setattr(tario, "READ_SIZE", read_size)  # chunk boundaries inside samples and members
    p = tmp_path / "s.tar"
    p.write_bytes(raw)
    for blocks in (tario.read_blocks(io.BytesIO(raw)), tario.read_blocks(_Trickle(raw, 333)),
                   tario.iter_blocks(str(p))):  # stream reads, short reads, memory map
        calls.clear()
        assert _flatten(blocks) == want
        assert all(status != "general" for _, _, status in calls)  # the fast path took all of it


def test_fast_path_hands_over_what_it_does_not_take(monkeypatch):
    """Each of these must be read by the general path, from where the fast path stopped, not misread."""
    nested = _tar([("inner/0001.png", b"x" * 600)])  # a tar inside a member: its header looks like one
    long_name = "p" * 120 + "/0003.png"  # a ustar prefix (ustar) or a pax/GNU long-name record
    cases = {
        "nested tar": (_tar([("a/0001.png", b"1" * 3000), ("a/0002.tar", nested), ("a/0003.png", b"3")]), None),
        "long name": (_tar([("a/0001.png", b"1"), (long_name, b"3")], tarfile.PAX_FORMAT), None),
        "ustar prefix": (_tar([("a/0001.png", b"1"), (long_name, b"3")], tarfile.USTAR_FORMAT), None),
    }
    monkeypatch.setattr(tario, "READ_SIZE", 2048)
    for what, (raw, _) in cases.items():
        got = _flatten(tario.read_blocks(io.BytesIO(raw)))
        assert got == _by_general_path(raw), what
        assert [s["__key__"] for s in got][-1].endswith("0003"), what


def test_truncated_shard_fails_on_the_fast_path_too(tmp_path):
    raw = _tar(_shard_entries())
    p = tmp_path / "shard-3.tar"
    for cut in (1000, len(raw) // 2 + 100, len(raw) - 10240 - 1):  # inside a header, inside data, the last member
        p.write_bytes(raw[:cut])
        for blocks in (tario.iter_blocks(str(p)), tario.read_blocks(io.BytesIO(raw[:cut]), str(p))):
            with pytest.raises(EOFError, match="shard-3.tar: truncated tar"):
                list(blocks)
