"""NaN and infinity are refused wherever a float comes from the user: `sample --cfg nan` would otherwise write
black images with exit 0, and `optim.lr nan` passes every `> 0` check (a comparison with NaN is False).

- `finite_float`: the argparse `type=` of every float option of the tools;
- `check_finite_fields(config, prefix)`: called first in each config dataclass's `__post_init__` (the configs
  `fit` parses with jsonargparse, and the ones built in Python); its ValueError names the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import math


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite (argparse prints the message, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def check_finite(name: str, value) -> None:
    """ValueError naming `name` when `value` (a float, or a list/tuple of them) holds NaN or infinity."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_finite_fields(config, prefix: str) -> None:
    """Every float field (or tuple/list of floats) of dataclass `config` is finite; the error names
    `<prefix>.<field>` as the config spells it (e.g. 'optim.lr')."""
    for field in dataclasses.fields(config):
        check_finite(f"{prefix}.{field.name}" if prefix else field.name, getattr(config, field.name))
