"""Which tar members make a sample, and which samples the json filters keep (foreign WebDataset layouts).

Our own shards hold `png`/`cls`/`txt`; img2dataset writes `jpg`/`txt`/`json`, Hugging Face and LAION
shards use `jpeg`, `webp`, `caption`, `text` or put the caption only in the json. A `MemberSpec` names,
in priority order, the members that give a sample's image, caption and class, or the json fields that
give them, and a few `FIELD OP VALUE` filters on json fields (`pwatermark < 0.5`, `original_width >= 256`,
`aspect <= 2`). It parses a block's columns at once, as the stream's records need them: a class column
(int, -1 when absent) and a caption column (str, "" when absent, or a tuple of a sample's several captions:
captions.py). An unusable entry becomes a
`BadSample` in the class column and a filtered-out sample a `Filtered` there; the stream raises either
when it uses the record, in play and in the resume skip alike, so both see the same samples.
"""

from __future__ import annotations

import json
import math
import operator
import re
from dataclasses import dataclass

from ldm_lightning.data.captions import caption_field, parse_caption_member
from ldm_lightning.data.transforms import IMAGE_KEYS, BadSample
from ldm_lightning.errors import UserError

CAPTION_EXTS = ("txt", "text", "caption")
LATENT_EXTS = ("moments.npy",)
CLASS_EXTS = ("cls",)
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
        "!=": operator.ne}
_FILTER = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|==|!=|<|>)\s*(.+?)\s*$")


class Filtered(BadSample):
    """A sample a json filter leaves out: counted (the DataModule's `filtered_samples`), never an error."""


class MemberSpecError(UserError, ValueError):
    """A member list or filter that cannot be used as given (the message names it and the fix)."""


@dataclass(frozen=True)
class SampleFilter:
    """`field op value` on the sample's json: a number compares as a number; a word only with == / !=.
    `aspect` is width / height from the json's original_width / original_height (else width / height).
    A sample whose json lacks the field (or holds null there) is filtered out."""

    field: str
    op: str
    value: float | str

    @classmethod
    def parse(cls, text: str) -> "SampleFilter":
        m = _FILTER.match(str(text))
        if not m:
            raise MemberSpecError(f"data.filters: cannot read {text!r}; write 'FIELD OP VALUE' with OP one of "
                                  f"{' '.join(_OPS)} (e.g. 'pwatermark < 0.5', 'original_width >= 256', 'aspect <= 2')")
        field, op, raw = m.groups()
        try:
            value: float | str = float(raw)
        except ValueError:
            value = raw.strip("'\"")
            if op not in ("==", "!="):
                raise MemberSpecError(f"data.filters: {text!r} compares the word {value!r} with {op}; words only "
                                      "with == or != (numbers with any operator)") from None
        if isinstance(value, float) and not math.isfinite(value):  # 'x < nan' keeps nothing, 'x < inf' everything
            raise MemberSpecError(f"data.filters: {text!r} compares with {raw}; give a finite number")
        return cls(field, op, value)

    def passes(self, meta: dict) -> bool:
        v = _aspect(meta) if self.field == "aspect" else meta.get(self.field)
        if v is None:
            return False
        if isinstance(self.value, float):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                return False
            return _OPS[self.op](float(v), self.value)
        return _OPS[self.op](str(v), self.value)

    def __str__(self) -> str:
        return f"{self.field} {self.op} {self.value:g}" if isinstance(self.value, float) else \
            f"{self.field} {self.op} {self.value}"


def _aspect(meta: dict) -> float | None:
    for w, h in (("original_width", "original_height"), ("width", "height")):
        a, b = meta.get(w), meta.get(h)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
            return a / b
    return None


def _exts(name: str, exts) -> tuple[str, ...]:
    out = tuple(str(e).lstrip(".") for e in exts)
    if any(not e or "/" in e for e in out):
        raise MemberSpecError(f"data.{name}: {list(exts)!r} must be member extensions like 'jpg' or 'b.jpg'")
    return out


@dataclass(frozen=True)
class MemberSpec:
    """Members and json fields of a sample (the DataModule's options of the same names document them)."""

    image_exts: tuple[str, ...] = IMAGE_KEYS
    caption_exts: tuple[str, ...] = CAPTION_EXTS
    caption_key: str | None = None
    class_exts: tuple[str, ...] = CLASS_EXTS
    class_key: str | None = None
    filters: tuple[SampleFilter, ...] = ()
    latent_exts: tuple[str, ...] = LATENT_EXTS
    map_ext: str | None = None
    """A per-pixel class map member decoded beside the image (the stream's `class_map`), or None."""

    @classmethod
    def build(cls, image_exts=IMAGE_KEYS, caption_exts=CAPTION_EXTS, caption_key=None, class_exts=CLASS_EXTS,
              class_key=None, filters=(), latent_exts=LATENT_EXTS, map_ext=None) -> "MemberSpec":
        """Validated, from the DataModule's plain options (lists, filter strings)."""
        image, latent = _exts("image_exts", image_exts), _exts("latent_exts", latent_exts)
        if not image or not latent:
            raise MemberSpecError("data.image_exts and data.latent_exts must each name at least one member, "
                                  "e.g. [jpg, png] and [moments.npy]")
        return cls(image, _exts("caption_exts", caption_exts), caption_key, _exts("class_exts", class_exts),
                   class_key, tuple(f if isinstance(f, SampleFilter) else SampleFilter.parse(f) for f in filters or ()),
                   latent, None if map_ext is None else _exts("map_ext", [map_ext])[0])

    @property
    def needs_json(self) -> bool:
        return bool(self.caption_key or self.class_key or self.filters)

    def wanted(self, payload_exts: tuple[str, ...]) -> tuple[str, ...]:
        """The members a block must copy out: payload, class, caption (and json when a field is read)."""
        extra = (*self.class_exts, *self.caption_exts, *(("json",) if self.needs_json else ()),
                 *((self.map_ext,) if self.map_ext else ()))
        return tuple(dict.fromkeys((*payload_exts, *extra)))

    def columns(self, members: dict[str, list], n: int) -> tuple[list, list]:
        """(cls, txt) columns of a block of n samples: int (-1 absent) or a BadSample / Filtered; str ("" absent) or
        a tuple of captions (captions.py: one is chosen per epoch)."""
        cls = _parsed(None if self.class_key else _first(members, self.class_exts, n), n, int, -1)
        txt = _parsed(None if self.caption_key else _first(members, self.caption_exts, n),
                      n, parse_caption_member, "")
        if not self.needs_json:
            return cls, txt
        col = members.get("json") or [None] * n
        for i, raw in enumerate(col):
            if type(cls[i]) is BadSample:
                continue
            try:
                meta = json.loads(raw) if raw is not None else {}
                if not isinstance(meta, dict):
                    raise ValueError(f"a json {type(meta).__name__}, not an object")
            except (ValueError, UnicodeDecodeError) as e:
                cls[i] = BadSample(f"unreadable json member: {e}")
                continue
            failed = next((f for f in self.filters if not f.passes(meta)), None)
            if failed is not None:
                got = _aspect(meta) if failed.field == "aspect" else meta.get(failed.field)
                cls[i] = Filtered(f"filter {failed} left it out ({failed.field} = {got!r})")
                continue
            if self.class_key:
                v = meta.get(self.class_key)
                try:
                    cls[i] = -1 if v is None else int(v)
                except (TypeError, ValueError):
                    cls[i] = BadSample(f"json field {self.class_key!r} = {v!r} is not a class number")
            if self.caption_key:
                txt[i] = caption_field(meta.get(self.caption_key))
        return cls, txt


def _first(members: dict[str, list], exts: tuple[str, ...], n: int) -> list | None:
    """Per sample, the first of `exts` it has (None when none)."""
    cols = [members[e] for e in exts if e in members]
    if len(cols) <= 1:
        return cols[0] if cols else None
    return [next((c[i] for c in cols if c[i] is not None), None) for i in range(n)]


def _parsed(col: list | None, n: int, parse, absent) -> list:
    """A block's class or caption column, parsed in one pass; an unreadable entry becomes a BadSample."""
    if col is None:
        return [absent] * n
    try:
        return [absent if b is None else parse(b) for b in col]
    except (ValueError, UnicodeDecodeError):
        out = []
        for b in col:
            try:
                out.append(absent if b is None else parse(b))
            except (ValueError, UnicodeDecodeError) as e:
                out.append(BadSample(f"unreadable cls/txt member {b[:40]!r}: {e}"))
        return out
