"""Config dataclasses made of other dataclasses' fields, each optional (None = keep that class's default or a
preset's value): `model.backbone_config` (every UNetConfig / DiTConfig / DDTConfig field) and `model.schedule`
(VPSchedule / FlowSchedule fields). Built from the sources, so a field added there is accepted here without an
edit; the sources' field docstrings become this class's, so `--help` shows them and jsonargparse refuses a
misspelt field when it parses the config."""

from __future__ import annotations

import dataclasses
import typing


def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring} of dataclass `cls` (the string literal under each field), {} when the source or
    docstring_parser (jsonargparse's own dependency for help texts) is unavailable."""
    try:
        import docstring_parser
        parsed = docstring_parser.parse_from_object(cls)
    except Exception:  # no source (frozen app) or no docstring_parser: fields then have no help text
        return {}
    return {p.arg_name: " ".join((p.description or "").split()) for p in parsed.params}


def optional_fields_dataclass(name: str, module: str, doc: str, sources: dict[str, type],
                              leading: tuple[tuple[str, object, object, str], ...] = (),
                              namespace: dict | None = None) -> type:
    """A dataclass `module.name` whose fields are `leading` ((name, type, default, doc) each) and then every field
    of the `sources` dataclasses ({label: class}; a field several have is listed once), typed `T | None` with
    default None. Its help text for a field says which sources have it."""
    types_: dict[str, list] = {}
    docs: dict[str, str] = {}
    owners: dict[str, list[str]] = {}
    for label, cls in sources.items():
        hints = typing.get_type_hints(cls)
        texts = field_docs(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] not in types_.setdefault(f.name, []):
                types_[f.name].append(hints[f.name])
            owners.setdefault(f.name, []).append(label)
            docs.setdefault(f.name, texts.get(f.name, ""))
    fields = [(n, t, dataclasses.field(default=d)) for n, t, d, _ in leading]
    fields += [(n, typing.Optional[typing.Union[tuple(ts)]], dataclasses.field(default=None))  # noqa: UP007
               for n, ts in types_.items()]
    lines = [f"    {n}: {d}" for n, _, _, d in leading]
    lines += [f"    {n}: ({', '.join(owners[n])}) {docs[n]}".rstrip() for n in types_]
    cls = dataclasses.make_dataclass(name, fields, namespace=namespace, frozen=True)
    cls.__module__ = module
    cls.__doc__ = f"{doc}\n\nAttributes:\n" + "\n".join(lines) + "\n"
    return cls


def set_fields(config) -> dict:
    """The fields of an optional-fields dataclass that are set (not None), as plain values (tuples as lists: what
    a YAML config gives, and what checkpoint hyper-parameters hold)."""
    return {f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(config) if (v := getattr(config, f.name)) is not None}
