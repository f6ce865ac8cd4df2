"""Several captions per image: which one a sample's caption is in a given epoch.

A sample's caption member (`txt`, ...) may hold a JSON list of strings (`["a cat", "a cat on a mat"]`), and a json
caption field (`data.caption_key`) a list; anything else is one caption, as before. The member is read as a list
only when its text starts with `[` and parses as a JSON list of strings, so a caption that merely starts with a
bracket stays text.

Per epoch one caption of the list is used, chosen from (seed, epoch, sample key) alone: not from the rank, the
worker or the position in the stream, so exact resume and any world size / num_workers see the same choice. Over
each round of n epochs (n = the sample's caption count) every caption is used once, in an order shuffled per round
and sample, so consecutive epochs within a round always differ.
"""

from __future__ import annotations

import json
import random

from ldm_lightning.errors import UserError


class EmptyCaptionList(UserError, ValueError):
    """A sample whose caption member or json field holds an empty list."""


def parse_caption_member(raw: bytes) -> str | tuple[str, ...]:
    """A caption member's bytes -> its caption, or a tuple of captions when it holds a JSON list of strings."""
    text = raw.decode("utf-8")
    if text[:1] != "[":
        return text
    captions = _as_list(text)
    return text if captions is None else captions


def _as_list(text: str) -> tuple[str, ...] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def caption_field(value) -> str | tuple[str, ...]:
    """A json caption field's value -> its caption ("" when absent), a tuple when it is a list of strings (several
    captions), the JSON text of any other structure (e.g. a layout's boxes, for conditioning.kind layout)."""
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def choose_caption(captions: str | tuple[str, ...], seed: int, epoch: int, key: str, where: str = "") -> str:
    """The caption a sample uses in `epoch`: the one it has, or one of its list (see the module docstring)."""
    if type(captions) is str:
        return captions
    n = len(captions)
    if n == 0:
        raise EmptyCaptionList(f"sample {key!r}{' of ' + where if where else ''}: its caption list is empty; give at "
                               "least one caption in its txt member or json caption field (or a plain caption)")
    if n == 1:
        return captions[0]
    order = list(range(n))
    random.Random(f"{seed}/{key}/{epoch // n}").shuffle(order)  # str seeds hash via sha512: stable across runs
    return captions[order[epoch % n]]


def every_caption(captions: str | tuple[str, ...], key: str, where: str = "") -> list[str]:
    """All captions of a sample (the text cache stores each one's embedding); an empty list is refused."""
    if type(captions) is str:
        return [captions]
    if not captions:
        choose_caption(captions, 0, 0, key, where)  # raises, with the one message
    return list(captions)
