"""One way to write a module's hyper-parameters (what a checkpoint stores under `hyper_parameters`, what a resume
compares): every argument of its `__init__`, so an argument added there is recorded without a second edit, as
plain values (dataclasses as dicts) so checkpoints load with `torch.load(weights_only=True)`."""

from __future__ import annotations

import dataclasses
import inspect


def plain(value):
    """A config dataclass as its dict of fields; any other value unchanged."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


def init_hparams(init, arguments: dict, resolved: dict | None = None, omit_none: tuple[str, ...] = (),
                 ignore: tuple[str, ...] = ()) -> dict:
    """{argument: value} for every parameter of `init` but self: the value the module resolved it to when
    `resolved` has it (a config built from a dict or from a preset, a normalised path), else the one passed
    (`arguments`: `dict(locals())` taken first thing in `__init__`), made plain. `omit_none`: arguments left out
    when None (a None that would disagree with the same-named data setting Lightning compares); `ignore`:
    arguments never recorded."""
    names = [n for n in inspect.signature(init).parameters if n != "self" and n not in ignore]
    resolved = dict(resolved or {})
    unknown = sorted(set(resolved) - set(names))
    if unknown:  # a programming error: the module resolved something that is not one of its arguments
        raise KeyError(f"{init.__qualname__} has no argument(s) {unknown}")
    out = {n: plain(resolved[n] if n in resolved else arguments[n]) for n in names}
    return {n: v for n, v in out.items() if not (v is None and n in omit_none)}
