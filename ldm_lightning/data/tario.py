"""A streaming tar reader for WebDataset shards: tar bytes → blocks of samples (key → {ext: bytes}).

Why not `tarfile` (which webdataset's tar iterator wraps): it spends ~30 µs per member parsing every
header field, and a MNIST sample has 4 members — that alone capped the stream far below the PNG decode
rate. Two paths here, both reading a few MiB per call:

- `_index_chunk`, the fast path: all member headers of a buffered chunk are found and parsed at once
  with numpy (ustar magic → size → the header chain is checked to be unbroken → names split into key
  and extension): ~3 µs per MNIST sample in all, memory traffic included, against ~8 µs on the
  general path. It takes plain ustar/GNU/pax shards whose members are regular files with short names
  (what `ldm-lightning data pack`, webdataset's TarWriter and `tar` write).
- `iter_members`, the general path, one `struct` unpack per header: GNU long names, pax `path`
  records, ustar prefixes, base-256 sizes, v7 tars, members whose data looks like a tar header
  (nested tars) — and every truncated-shard error. A chunk the fast path does not take, and all of the
  shard after it, go this way.

Local shards are memory-mapped (`_mapped_blocks`); other URLs are opened by webdataset's `gopen`
(http(s) via curl, `pipe:` commands) and read in chunks (`read_blocks`).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from typing import BinaryIO, Iterator

import numpy as np

BLOCK = 512
READ_SIZE = 4 << 20  # bytes per read: large enough to amortise the call, small next to a shard
_HEADER = struct.Struct("100s24x12s20x1s100x6s2x64x8x8x155s")  # name, size, type, magic, prefix
_ZERO_BLOCK = bytes(BLOCK)


class ShardFormatError(ValueError):
    """Bytes that are not a tar we read: a bad header (random bytes, a non-tar file) or a link member."""


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes ≥ 8 GiB
        return int.from_bytes(field, "big") & ~(0x80 << (8 * (len(field) - 1)))
    field = field.rstrip(b"\x00 ").lstrip(b" ")
    return int(field or b"0", 8)


def _check_header(header: bytes, source: str) -> None:
    """The header checksum (the sum of its bytes with the checksum field read as spaces), as tar checks it:
    random bytes or a non-tar file fail here instead of as a bare int() error further on."""
    try:
        stored = _octal(header[148:156])
    except ValueError:
        stored = -1
    rest = header[:148] + header[156:]
    unsigned = sum(rest) + 8 * 32
    if stored != unsigned and stored != unsigned - 256 * sum(b >= 128 for b in rest):  # some writers sum signed
        raise ShardFormatError(f"{source}: not a tar file, or damaged: a member header fails its checksum")


def _skip(f: BinaryIO, n: int, source: str) -> None:
    while n > 0:
        got = len(f.read(min(n, READ_SIZE)))
        if not got:
            raise EOFError(f"{source}: truncated tar (the last member's padding is missing)")
        n -= got


def iter_members(f: BinaryIO, source: str = "<stream>") -> Iterator[tuple[str, bytes]]:
    """Yield (name, data) for every regular file in a tar stream."""
    buf, pos = b"", 0  # buf[pos:] is what has been read but not parsed yet
    long_name: str | None = None
    while True:
        if len(buf) - pos < BLOCK:
            buf, pos = buf[pos:], 0
            while len(buf) < BLOCK:  # pipes and sockets may return short reads
                more = f.read(READ_SIZE)
                if not more:
                    if buf.strip(b"\x00"):
                        raise EOFError(f"{source}: truncated tar (a member header is cut after {len(buf)} bytes)")
                    return  # end of stream (a well-formed tar ends with zero blocks; some writers stop early)
                buf += more
        name, size_field, kind, magic, prefix = _HEADER.unpack_from(buf, pos)
        if not name[0] and buf[pos:pos + BLOCK] == _ZERO_BLOCK:
            return
        _check_header(buf[pos:pos + BLOCK], source)
        size = _octal(size_field)
        end = pos + BLOCK + size
        while len(buf) < end:  # the member runs past the buffer (pipes and sockets may read short)
            more = f.read(max(READ_SIZE, end - len(buf)))
            if not more:
                raise EOFError(f"{source}: truncated tar (member needs {size} bytes, got {len(buf) - pos - BLOCK})")
            buf, end, pos = buf[pos:] + more, end - pos, 0
        data = buf[pos + BLOCK:end]
        pos = end + (-size) % BLOCK  # past the padding, which may still be unread: then skip it
        if pos > len(buf):
            _skip(f, pos - len(buf), source)
            buf, pos = b"", 0
        name, long_name = _member_name(kind, name, magic, prefix, long_name, lambda: data, source)
        if name is not None:
            yield name, data


def _member_name(kind: bytes, raw: bytes, magic: bytes, prefix: bytes, long_name: str | None, read_data,
                 source: str) -> tuple[str | None, str | None]:
    """What one tar header means, for the member readers: (full name, None) for a regular file, else (None,
    the long name that applies to the next member). `read_data()` gives the member's data (pax / GNU records)."""
    if kind == b"L":  # GNU long name for the next member
        return None, read_data().rstrip(b"\x00").decode("utf-8")
    if kind in (b"x", b"g"):  # pax extended header: only `path` matters here (a global one names nothing)
        m = re.search(rb"\d+ path=([^\n]*)\n", read_data())
        return None, m.group(1).decode("utf-8") if kind == b"x" and m else long_name
    if kind in (b"1", b"2"):  # a link's target may lie anywhere: never a sample member, and never silently
        link = long_name or raw.split(b"\x00", 1)[0].decode("utf-8", "replace")
        raise ShardFormatError(f"{source}: member {link!r} is a {'hard' if kind == b'1' else 'symbolic'} "
                               "link; shards must hold regular files only (refused; re-create the shard "
                               "with `ldm-lightning data pack`)")
    if kind not in (b"0", b"\x00", b"7"):  # directories, devices, ...: not sample members
        return None, None
    if long_name is not None:
        return long_name, None
    name = raw.split(b"\x00", 1)[0].decode("utf-8")
    if magic == b"ustar\x00" and prefix[0]:  # POSIX ustar: long paths split in two
        name = prefix.split(b"\x00", 1)[0].decode("utf-8") + "/" + name
    return name, None




# ------------------------------------------------------------------------------------------------
# blocks of samples
# ------------------------------------------------------------------------------------------------
Block = tuple[list[str], dict[str, list]]
"""(keys, members): the samples of one chunk of a shard. members[ext][i] is the bytes of sample i's
`<key>.<ext>` member, or None when sample i has no such member. Samples never straddle blocks."""

_USTA = int.from_bytes(b"usta", "little")
_PAX_OR_LONG = np.array([ord(c) for c in "xgLK12"], np.uint8)  # typeflags only the general path handles
# (pax records and GNU long names, which it parses; hard and symbolic links, which it refuses)
_REGULAR = np.array([0, ord("0"), ord("7")], np.uint8)
SEQUENTIAL_BLOCK = 1024  # samples per block on the general path


def _index_chunk(data, start: int, stop: int, final: bool, exts=None) -> tuple[Block | None, int, str]:
    """Index the whole samples in data[start:stop] (`start` is a member header) in one pass.

    `data` is bytes or an mmap. Returns (block or None, offset to go on from, status): "more" (go on
    from that offset, with more data after `stop`), "end" (the archive's zero block was reached) or
    "general" (from `start` on, the general path must read: nothing was taken). Unless `final` or at
    the end marker, the last key's members are held back: more of them may follow beyond `stop`.
    `exts`: only these members are copied out (default: all)."""
    nb = (stop - start) // BLOCK
    if nb == 0:
        return None, start, "general" if final else "more"
    a = np.frombuffer(data, np.uint8, count=nb * BLOCK, offset=start).reshape(nb, BLOCK)  # a row per block
    magic = np.ascontiguousarray(a[:, 257:261]).view("<u4")[:, 0]  # (nb,)
    hdr = np.flatnonzero((magic == _USTA) & (a[:, 261] == ord("r")))  # candidate header blocks (M,)
    if len(hdr) == 0 or hdr[0] != 0:
        return None, start, "end" if not a[0].any() else "general"  # else a v7 tar, or a cut header
    h = a[hdr, :346]  # (M, 346) the header fields used below, gathered once (cache-friendly)
    field = h[:, 124:136].astype(np.int64)  # (M, 12) octal size, NUL/space padded
    if (field[:, 0] & 0x80).any():
        return None, start, "general"  # base-256 size (a member ≥ 8 GiB)
    digit = (field >= 48) & (field <= 55)
    size = np.zeros(len(hdr), np.int64)
    for c in range(12):
        size = np.where(digit[:, c], size * 8 + field[:, c] - 48, size)
    nxt = hdr + 1 + (size + BLOCK - 1) // BLOCK  # (M,) block after each member's padded data
    if (nxt[:-1] != hdr[1:]).any():
        return None, start, "general"  # a member's data holds a block that looks like a header (nested tar)
    typ = h[:, 156]
    if np.isin(typ, _PAX_OR_LONG).any() or ((h[:, 262] == 0) & (h[:, 345] != 0)).any():
        return None, start, "general"  # pax records, GNU long names or a ustar prefix
    complete = int(np.searchsorted(nxt, nb, side="right"))  # members whose padded data is in the chunk
    status = "more"
    if complete == len(hdr) and nxt[-1] < nb:  # what follows the last member is no ustar header
        if a[nxt[-1]].any():
            return None, start, "general"
        status = "end"
    if final and status != "end" and complete < len(hdr):
        return None, start, "general"  # a truncated last member: the general path says where
    holding_back = status == "more" and not final
    taken = start + min(int(nxt[complete - 1]), nb) * BLOCK if complete else start  # all complete members
    regular = np.flatnonzero(np.isin(typ[:complete], _REGULAR))
    if len(regular) == 0:  # only directories (or nothing complete) so far
        return None, start if holding_back else taken, status
    names = h[regular, :100]  # (R, 100)
    length = np.where((names == 0).any(1), (names == 0).argmax(1), 100)  # (R,)
    width = int(length.max(initial=0))
    names, col = names[:, :width], np.arange(width)
    slash = np.where(names == ord("/"), col, -1).max(1, initial=-1)  # (R,) last '/'
    dot_mask = (names == ord(".")) & (col > slash[:, None]) & (col < length[:, None])
    has_dot = dot_mask.any(1)
    dot = dot_mask.argmax(1)  # first '.' of the basename: key = before it, extension = after
    regular, names, length, dot = regular[has_dot], names[has_dot], length[has_dot], dot[has_dot]
    keyrows = np.where(col < dot[:, None], names, 0)  # (R, width)
    first = np.ones(len(regular), bool)
    first[1:] = (keyrows[1:] != keyrows[:-1]).any(1)  # a member that starts a sample
    sample = np.cumsum(first) - 1  # (R,) sample index of each member
    if holding_back:
        if len(regular) == 0 or sample[-1] == 0:
            return None, start, "more"  # at most one (maybe unfinished) sample: needs a larger chunk
        keep = sample < sample[-1]  # hold the last sample back
        resume = start + int(hdr[regular[np.argmax(~keep)]]) * BLOCK
        regular, names, length, dot, keyrows, first, sample = (
            v[keep] for v in (regular, names, length, dot, keyrows, first, sample))
    else:
        resume = taken
    n = int(sample[-1]) + 1 if len(sample) else 0
    if n == 0:
        return None, resume, status
    keys = [k.decode("utf-8") for k in np.ascontiguousarray(keyrows[first]).view(f"S{width}")[:, 0].tolist()]
    extrows = np.ascontiguousarray(np.where((col > dot[:, None]) & (col < length[:, None]), names, 0))
    kinds, which = np.unique(extrows.view(f"V{width}")[:, 0], return_inverse=True)
    offset = start + (hdr[regular] + 1) * BLOCK  # (R,) where each member's data starts in `data`
    members: dict[str, list] = {}
    for j, row in enumerate(kinds):
        raw = np.frombuffer(row.tobytes(), np.uint8)
        ext = raw[raw != 0].tobytes().decode("utf-8")  # keys of other lengths give the same ext again
        if exts is not None and ext not in exts:
            continue
        sel = np.flatnonzero(which == j)
        col_data = [data[o:o + k] for o, k in zip(offset[sel].tolist(), size[regular[sel]].tolist())]
        if ext not in members and len(sel) == n and (sample[sel] == np.arange(n)).all():
            members[ext] = col_data  # the common case: every sample has this member once
            continue
        out = members.setdefault(ext, [None] * n)
        for i, d in zip(sample[sel].tolist(), col_data):
            out[i] = d  # a repeated extension within a sample: the last one wins, as in webdataset
    return (keys, members), resume, status


def _sequential_blocks(f: BinaryIO, source: str, exts=None) -> Iterator[Block]:
    """Blocks from the general path (`iter_members`), grouped by key like the fast path."""
    keys: list[str] = []
    rows: list[dict[str, bytes]] = []
    try:
        for name, data in iter_members(f, source):
            dot = name.find(".", name.rfind("/") + 1)
            if dot < 0:
                continue  # no extension: not a sample member
            if not keys or name[:dot] != keys[-1]:
                if len(keys) == SEQUENTIAL_BLOCK:
                    yield _columns(keys, rows)
                    keys, rows = [], []
                keys.append(name[:dot])
                rows.append({})
            if exts is None or name[dot + 1:] in exts:
                rows[-1][name[dot + 1:]] = data
    except (EOFError, ValueError):  # a truncated or damaged shard: the samples before the damage still count
        if keys:
            yield _columns(keys, rows)
        raise
    if keys:
        yield _columns(keys, rows)


def _columns(keys: list[str], rows: list[dict[str, bytes]]) -> Block:
    exts = dict.fromkeys(e for r in rows for e in r)
    return keys, {e: [r.get(e) for r in rows] for e in exts}


class _Prefixed:
    """A reader that returns `head` first, then the rest of `f`."""

    def __init__(self, head: bytes, f: BinaryIO):
        self.head, self.f = head, f

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.f.read(n)
        out, self.head = (self.head, b"") if n < 0 or n >= len(self.head) else (self.head[:n], self.head[n:])
        return out


def read_blocks(f: BinaryIO, source: str = "<stream>", exts=None) -> Iterator[Block]:
    """Blocks of whole samples from a tar stream: the fast path chunk by chunk, the general path from the
    first chunk it does not take on."""
    buf, final, want = b"", False, READ_SIZE
    while True:
        while not final and len(buf) < want:  # pipes and sockets may return short reads
            more = f.read(want - len(buf))
            final = not more
            buf += more
        block, resume, status = _index_chunk(buf, 0, len(buf), final, exts)
        if status == "general":
            yield from _sequential_blocks(_Prefixed(buf, f), source, exts)
            return
        if block is not None:
            yield block
        if status == "end" or (final and resume == len(buf)):
            return
        buf = buf[resume:]
        want = READ_SIZE if resume else 2 * max(len(buf), READ_SIZE)  # a sample larger than a chunk


def _mapped_blocks(path: str, exts=None) -> Iterator[Block]:
    """`read_blocks` for a local file, over a read-only memory map: the chunks are views of the page cache,
    so no chunk is copied whole (a read copies every byte, a MNIST sample's tar padding included).
    A shard truncated in place while mapped would kill the reader with SIGBUS; `data pack` and
    `data encode` replace shards by renaming a finished file over them, which is safe."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            if hasattr(mm, "madvise"):  # not on Windows
                mm.madvise(mmap.MADV_SEQUENTIAL)
            pos, span = 0, READ_SIZE
            while True:
                stop = min(pos + span, len(mm))
                block, resume, status = _index_chunk(mm, pos, stop, stop == len(mm), exts)
                if status == "general":
                    f.seek(pos)
                    yield from _sequential_blocks(f, path, exts)
                    return
                if block is not None:
                    yield block
                if status == "end" or (stop == len(mm) and resume == stop):
                    return
                span = READ_SIZE if resume > pos else 2 * span  # a sample larger than a chunk
                pos = resume
        finally:
            try:
                mm.close()
            except BufferError:  # an exception's traceback still holds a numpy view of it: freed with that
                pass


def iter_blocks(url: str, exts=None) -> Iterator[Block]:
    """Blocks of samples of one shard; the key is everything before the first '.' of the basename, and the
    members of one sample are adjacent (as WebDataset requires). `exts`: the members to keep (default all);
    a sample keeps its key even when it has none of them."""
    if os.path.isfile(url):
        yield from _mapped_blocks(url, exts)
        return
    from webdataset.gopen import gopen

    with gopen(url, "rb") as f:
        yield from read_blocks(f, url, exts)


def iter_samples(url: str) -> Iterator[dict]:
    """Samples of one shard as WebDataset dicts: {'__key__', '__url__', ext: bytes, ...}."""
    for keys, members in iter_blocks(url):
        for i, key in enumerate(keys):
            s = {"__key__": key, "__url__": url}
            s.update((e, col[i]) for e, col in members.items() if col[i] is not None)
            yield s


# ------------------------------------------------------------------------------------------------
# samples split across two shards, and header-only scans
# ------------------------------------------------------------------------------------------------
def shard_blocks(url: str, exts=None, head_key: str | None = None, tail_url: str | None = None) -> Iterator[Block]:
    """`iter_blocks` of one shard, with WebDataset's rule for a sample split across two tars (the same key
    at the end of one and the start of the next, as a tar writer that rolls over mid-sample leaves it).
    The sample belongs to the shard it starts in: `head_key` (the first key, when it continues the
    previous shard's last sample) is dropped here, and `tail_url` (the next shard, when it holds the rest
    of this shard's last sample) is opened for its first sample, whose members join this last one.
    `ldm-lightning data index` finds both and records them in the manifest, so counts stay exact."""
    blocks = iter_blocks(url, exts)
    if head_key is not None:
        blocks = _drop_head(blocks, head_key)
    if tail_url is None:
        yield from blocks
        return
    held: Block | None = None  # a block is held back until it is known not to be the last
    try:
        for block in blocks:
            if held is not None:
                yield held
            held = block
    except (EOFError, ValueError, OSError):
        if held is not None:
            yield held  # a damaged shard: the samples before the damage still count
        raise
    if held is not None:
        yield _join_tail(held, tail_url, exts)


def _drop_head(blocks: Iterator[Block], head_key: str) -> Iterator[Block]:
    for i, (keys, members) in enumerate(blocks):
        if i == 0 and keys and keys[0] == head_key:
            keys, members = keys[1:], {e: col[1:] for e, col in members.items()}
        yield keys, members


def _join_tail(block: Block, tail_url: str, exts) -> Block:
    keys, members = block
    if not keys:
        return block
    try:
        nkeys, nmembers = next(iter_blocks(tail_url, exts), ([], {}))
    except (EOFError, ValueError, OSError):
        return block  # the continuation is unreadable: the partial sample is used as it is (or counted bad)
    if not nkeys or nkeys[0] != keys[-1]:
        return block
    members = dict(members)
    for e, col in nmembers.items():
        if col[0] is None:
            continue
        own = list(members.get(e) or [None] * len(keys))
        if own[-1] is None:  # a member in both parts: the first part's wins
            own[-1] = col[0]
        members[e] = own
    return keys, members


def iter_headers(fd: int, source: str = "<stream>") -> Iterator[tuple[str, int]]:
    """(name, size) of every regular-file member of the tar file open as `fd`, reading only the 512-byte
    headers (one pread each) and skipping the data: `data index` counts a shard's samples without reading
    its images (a 65 MB shard of 2000 samples: 3 MB read instead of 65)."""
    long_name: str | None = None
    pos, total = 0, os.fstat(fd).st_size
    while True:
        header = os.pread(fd, BLOCK, pos)
        if len(header) < BLOCK:
            if header.strip(b"\x00"):
                raise EOFError(f"{source}: truncated tar (a member header is cut after {len(header)} bytes)")
            return
        if header == _ZERO_BLOCK:
            return
        _check_header(header, source)
        name, size_field, kind, magic, prefix = _HEADER.unpack_from(header)
        size = _octal(size_field)
        data_at, pos = pos + BLOCK, pos + BLOCK + size + (-size) % BLOCK
        name, long_name = _member_name(kind, name, magic, prefix, long_name,
                                       lambda: os.pread(fd, size, data_at), source)
        if name is None:
            continue
        if total < data_at + size:
            raise EOFError(f"{source}: truncated tar (member {name!r} needs {size} bytes)")
        yield name, size


def scan_keys(path: str) -> list[str]:
    """The sample keys of a local shard in order (consecutive members with one key are one sample; key =
    the basename up to its first dot), from the headers alone."""
    keys: list[str] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, _ in iter_headers(fd, path):
            dot = name.find(".", name.rfind("/") + 1)
            if dot < 0:
                continue
            if not keys or name[:dot] != keys[-1]:
                keys.append(name[:dot])
    finally:
        os.close(fd)
    return keys
