"""One check for the choice fields of config dataclasses: each field annotated `Literal[...]` (or an optional one,
`Literal[...] | None`) must hold one of its choices. Called first in each config's `__post_init__`, beside
`check_finite_fields`, so a config built in Python is refused the same way as one `fit` parses with jsonargparse
(whose own refusal `training/cli_errors.choice_error` words alike)."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing

from ldm_lightning.errors import UserError


class ChoiceError(UserError, ValueError):
    """A config field holds a value outside its `Literal` choices (a ValueError too: callers catch that)."""


def literal_choices(annotation) -> tuple | None:
    """The choices of `Literal[...]`, of `Literal[...] | None` (None added), or None for any other annotation."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        literals = [a for a in args if typing.get_origin(a) is typing.Literal]
        if len(literals) == 1 and all(a is type(None) or a is literals[0] for a in args):
            return typing.get_args(literals[0]) + (None,)
    return None


@functools.cache
def choice_fields(cls: type) -> dict[str, tuple]:
    """{field name: its choices} of the `Literal` fields of dataclass `cls` (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: c for f in dataclasses.fields(cls) if (c := literal_choices(hints.get(f.name))) is not None}


def check_choices(config, prefix: str) -> None:
    """ChoiceError naming `<prefix>.<field>`, its value and the allowed choices for the first `Literal` field of
    dataclass `config` whose value is not one of them."""
    for name, allowed in choice_fields(type(config)).items():
        value = getattr(config, name)
        if value not in allowed:
            shown = ", ".join(repr(a) for a in allowed)
            raise ChoiceError(f"{prefix}.{name} must be one of {shown}; got {value!r}" if prefix else
                              f"{name} must be one of {shown}; got {value!r}")
