"""Layout-to-image conditioning (LDM, Rombach et al. 2022, §4.3.1 / App. D.3): bounding boxes as tokens for τθ.

A layout is a list of boxes `[class, x0, y0, x1, y1]`, coordinates in [0, 1] of the image side (x to the right,
y down, x0 < x1, y0 < y1): the `boxes` of `data pack --source mnist-canvas`. As in the paper, each box becomes
the tokens (class, x0, y0, x1, y1) over one shared vocabulary of the class tokens and `position_bins` quantised
positions; a begin token starts every sequence (so the empty layout, the guidance's null condition, is one real
token and attention never sees only padding) and a pad token fills it to 1 + 5 * max_boxes tokens.

    ids 0 .. num_classes-1                      the classes
    ids num_classes .. num_classes+bins-1       position bin b = floor(v * bins), clamped to bins-1
    id  num_classes+bins                        begin
    id  num_classes+bins+1                      pad (masked out of attention)

The token ids go through the trainable transformer τθ inside the backbone (text_transformer.py, the same module
as LDM's trained text encoder; its vocab_size and max_length follow this tokenizer) into cross-attention.
`BoxFourierEmbedding` (trainable_text.box_fourier) optionally adds each box's geometry to all five of its tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm_lightning.errors import UserError


class LayoutError(UserError, ValueError):
    """A layout that cannot be used (the message names the box and the fix)."""


@dataclass
class LayoutConfig:
    """The layout tokenizer: how many classes, how finely positions are quantised, how many boxes at most."""

    num_classes: int = 10
    """Object classes; a box's class is 0 .. num_classes-1."""
    position_bins: int = 32
    """Quantised positions per coordinate (32 on a 64-px canvas: 2-px steps)."""
    max_boxes: int = 8
    """Boxes per layout at most (the token sequence is 1 + 5 * max_boxes long)."""

    def __post_init__(self):
        for name in ("num_classes", "position_bins", "max_boxes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"conditioning.layout.{name} must be >= 1, got {getattr(self, name)}")


def bin_centre(token, num_classes: int, position_bins: int):
    """The coordinate (a fraction of the image side) that a position token, an int or a tensor of them, stands for:
    its bin's centre (position tokens follow the class tokens in the vocabulary)."""
    return (token - num_classes + 0.5) / position_bins


class LayoutTokenizer:
    """Layouts <-> token ids (see the module docstring for the vocabulary)."""

    def __init__(self, cfg: LayoutConfig):
        self.cfg = cfg
        self.bos = cfg.num_classes + cfg.position_bins
        self.pad = self.bos + 1

    @property
    def vocab_size(self) -> int:
        return self.pad + 1

    @property
    def length(self) -> int:
        return 1 + 5 * self.cfg.max_boxes

    def check(self, layout, where: str = "layout") -> list[list]:
        """`layout` as a list of [int class, x0, y0, x1, y1] boxes, or a LayoutError naming what is wrong."""
        c = self.cfg
        if not isinstance(layout, (list, tuple)):
            raise LayoutError(f"{where}: expected a list of boxes [class, x0, y0, x1, y1], got {layout!r}")
        if len(layout) > c.max_boxes:
            raise LayoutError(f"{where}: {len(layout)} boxes, more than this model's max_boxes={c.max_boxes}; "
                              f"give at most {c.max_boxes}")
        boxes = []
        for k, box in enumerate(layout):
            if not isinstance(box, (list, tuple)) or len(box) != 5 or \
                    not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
                raise LayoutError(f"{where}: box {k} is {box!r}; each box is 5 numbers [class, x0, y0, x1, y1]")
            cls, x0, y0, x1, y1 = box
            if cls != int(cls) or not 0 <= cls < c.num_classes:
                raise LayoutError(f"{where}: box {k} {list(box)} has class {cls}; this model's classes are "
                                  f"0-{c.num_classes - 1}")
            if not all(math.isfinite(v) and 0 <= v <= 1 for v in (x0, y0, x1, y1)):
                raise LayoutError(f"{where}: box {k} {list(box)} has a coordinate outside [0, 1]; coordinates are "
                                  "fractions of the image side")
            if not (x0 < x1 and y0 < y1):
                raise LayoutError(f"{where}: box {k} {list(box)} needs x0 < x1 and y0 < y1 (the top-left corner "
                                  "first, then the bottom-right one)")
            boxes.append([int(cls), float(x0), float(y0), float(x1), float(y1)])
        return boxes

    def _bin(self, v: float) -> int:
        return self.cfg.num_classes + min(self.cfg.position_bins - 1, int(v * self.cfg.position_bins))

    def encode(self, layout, where: str = "layout") -> list[int]:
        """Token ids of one layout, padded to `length`."""
        ids = [self.bos]
        for cls, *xy in self.check(layout, where):
            ids += [cls, *(self._bin(v) for v in xy)]
        return ids + [self.pad] * (self.length - len(ids))

    def decode(self, ids) -> list[list]:
        """The layout of token ids (positions at their bins' centres)."""
        c, bins = self.cfg.num_classes, self.cfg.position_bins
        body = [int(i) for i in ids[1:] if int(i) != self.pad]
        return [[body[k], *(bin_centre(body[k + j], c, bins) for j in range(1, 5))] for k in range(0, len(body), 5)]

    def batch(self, layouts: list, device=None, where: str = "layout") -> dict:
        """{'context_ids' (B, L) int64, 'context_mask' (B, L) bool (False = pad)}: τθ's input."""
        ids = torch.tensor([self.encode(lay, f"{where} {i}" if len(layouts) > 1 else where)
                            for i, lay in enumerate(layouts)], dtype=torch.long, device=device)  # (B, L)
        return {"context_ids": ids, "context_mask": ids != self.pad}


class BoxFourierEmbedding(nn.Module):
    """GLIGEN's box embedding (Li et al. 2023, §3.2: Fourier features of the box coordinates through a learned map),
    added to the paper's tokens: token ids (B, 1 + 5 K) -> (B, 1 + 5 K, width), where each box's 5 tokens all get
    Linear([sin(2^j pi v), cos(2^j pi v)] for its 4 coordinates v (read back from its position tokens, bin centres)
    and j < frequencies) (plus, with with_class, an embedding of the box's class) and the begin token and empty
    boxes get 0.

    Why: with plain tokens the class token learns where its box is only through τθ's attention to the 4 position
    tokens after it (32 unrelated embeddings per coordinate, each seen rarely); with this it knows from the first
    step, and nearby boxes get nearby features, so cross-attention can learn to send the image tokens under a box to
    that box's class early."""

    def __init__(self, num_classes: int, position_bins: int, frequencies: int, width: int, with_class: bool = False):
        super().__init__()
        self.num_classes, self.position_bins = num_classes, position_bins
        self.register_buffer("scales", math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float32),
                             persistent=False)  # (F,)
        self.proj = nn.Linear(8 * frequencies, width)
        # GLIGEN's grounding token joins the object's class and its box: with_class adds a class embedding to the
        # box's features too, so whichever of the box's 5 tokens a cross-attention query lands on carries the class
        self.class_embedding = nn.Embedding(num_classes, width) if with_class else None
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, L = ids.shape
        if (L - 1) % 5:
            raise ValueError(f"box_fourier: {L} layout tokens; a layout is 1 + 5 * max_boxes tokens")
        boxes = ids[:, 1:].reshape(B, (L - 1) // 5, 5)  # (B, K, 5): class, x0, y0, x1, y1
        real = (boxes[..., 0] < self.num_classes).unsqueeze(-1)  # (B, K, 1); pad boxes are not real
        positions = boxes[..., 1:].clamp(self.num_classes, self.num_classes + self.position_bins - 1)  # pad: any bin
        xy = bin_centre(positions.float(), self.num_classes, self.position_bins)  # (B, K, 4) in (0, 1)
        angles = xy.unsqueeze(-1) * self.scales  # (B, K, 4, F)
        feats = torch.cat([angles.sin(), angles.cos()], -1).flatten(2)  # (B, K, 8 F)
        emb = self.proj(feats)  # (B, K, width)
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(boxes[..., 0].clamp(max=self.num_classes - 1))
        emb = emb * real
        per_token = emb.unsqueeze(2).expand(-1, -1, 5, -1).reshape(B, L - 1, -1)  # (B, 5 K, width)
        return torch.cat([per_token.new_zeros(B, 1, per_token.shape[-1]), per_token], 1)  # (B, L, width)


def parse_layout_text(text: str, where: str) -> list:
    """A layout from its JSON text (a batch's `txt`: data.caption_key boxes gives the boxes' JSON)."""
    try:
        layout = json.loads(text) if text else []
    except json.JSONDecodeError as e:
        raise LayoutError(f"{where}: {text[:60]!r} is not a layout's JSON ({e}); layout models read the boxes "
                          "from the sample's json (data.caption_key: boxes)") from None
    return layout["boxes"] if isinstance(layout, dict) and "boxes" in layout else layout


def read_layouts(spec: str) -> list:
    """`--layout`: JSON text or a .json file holding one layout (a list of boxes, or {"boxes": [...]}) or a list of
    layouts. Returns a list of layouts (each a list of boxes, not yet checked)."""
    path = Path(spec)
    text = spec
    if not spec.lstrip().startswith(("[", "{")):
        if not path.is_file():
            raise LayoutError(f"--layout {spec!r}: neither JSON (e.g. '[[3, 0.1, 0.1, 0.5, 0.6]]') nor a .json file "
                              "that exists")
        text = path.read_text(encoding="utf-8")
    data = parse_layout_text(text, f"--layout {spec if len(spec) < 60 else spec[:57] + '...'}")
    if isinstance(data, list) and data and all(isinstance(b, dict) or
                                               (isinstance(b, list) and b and isinstance(b[0], list)) for b in data):
        return [d["boxes"] if isinstance(d, dict) else d for d in data]  # several layouts
    return [data]
