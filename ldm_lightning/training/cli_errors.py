"""User errors of `ldm-lightning fit|validate|test` as one paragraph: what went wrong, where, and the fix."""

from __future__ import annotations

import os
import re
import traceback

from ldm_lightning.errors import UserError, missing_extra_message

def check_hparams_agree(model, datamodule) -> None:
    """Model and data must agree on the fields both have (e.g. image_size): Lightning only finds out when it logs
    the hyper-parameters, with a message about merging hparams."""
    if datamodule is None:
        return
    m, d = getattr(model, "hparams", {}), getattr(datamodule, "hparams", {})
    for key in sorted(set(m) & set(d)):
        try:
            same = bool(m[key] == d[key])
        except Exception:  # values without a plain ==, e.g. tensors
            same = repr(m[key]) == repr(d[key])
        if not same:
            raise UserError(f"model.init_args.{key}={m[key]!r} but data.init_args.{key}={d[key]!r}: set both to the "
                            f"same value (e.g. --model.init_args.{key} {d[key]!r})")


_NUMBER = re.compile(r"-(\d|\.\d|inf$|nan$)")


def join_negative_values(argv: list[str]) -> list[str]:
    """`--key -1e-3` -> `--key=-1e-3`: argparse would read `-1e-3` as an option and say "expected one argument"."""
    out: list[str] = []
    for arg in argv:
        if out and _NUMBER.match(arg) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while exc is not None and all(exc is not c for c in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*?)\]\. Got value: ([^\n]*)")
# an optional choice (`Literal[...] | None`): jsonargparse lists the two refusals, then the value
_OPTIONAL_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*?)\]\s*- Expected a <class 'NoneType'>.*?"
                               r"Given value: ([^\n]*)", re.S)
_KEY = re.compile(r'Parser key "([^"]+)"')


def choice_error(text: str) -> str | None:
    """jsonargparse's refusal of a Literal (choice) field as the project says it, with the flag's full key:
    `model.init_args.optim.schedule must be one of 'constant', 'cosine'; got 'foo'`. `text` is the
    outermost error, which nests one `Parser key` per level down to the failing field."""
    m = _LITERAL.search(text)
    optional = m is None and (m := _OPTIONAL_LITERAL.search(text)) is not None
    if not m:
        return None
    keys = _KEY.findall(text[:m.start()])
    path = ".".join(keys[:1] + (["init_args"] if keys and keys[0] in ("model", "data") else []) + keys[1:])
    choices = f"{m.group(1)} or null" if optional else m.group(1)
    return f"invalid config: {path} must be one of {choices}; got {m.group(2).strip()!r}"


def config_error_message(exc: BaseException, subcommand: str = "fit") -> str:
    """One paragraph for an error raised while parsing/building: our own validation text when there is one
    (it names the field and the allowed values), else jsonargparse's innermost reason with its key."""
    chain = _chain(exc)
    for c in reversed(chain):  # innermost first
        tb = traceback.extract_tb(c.__traceback__)
        if isinstance(c, (ValueError, TypeError, UserError)) and tb and f"{os.sep}ldm_lightning{os.sep}" in tb[-1].filename:
            return f"invalid config: {c}"
    for c in chain:
        if isinstance(c, ModuleNotFoundError) and missing_extra_message(c):
            return missing_extra_message(c)
    if isinstance(chain[-1], (OSError, UserError)):
        return str(chain[-1])
    choice = choice_error(max((str(c) for c in chain), key=len))
    if choice:
        return choice
    where = str(chain[0]).splitlines()[0].strip() if str(chain[0]).strip() else type(chain[0]).__name__
    reasons = [str(c).strip().replace("\n", " ") for c in chain if "Problem with given class_path" in str(c)]
    reason = " ".join((reasons[-1] if reasons else str(chain[-1]).strip()).split()).rstrip(".")
    where = "" if reason.startswith(where.rstrip(":")) else f"{where} "
    return (f"invalid config: {where}{reason}. See `ldm-lightning {subcommand} --help` "
            "for the fields and their types, and --print_config for the resolved config.")


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}  # YAML lists and Python tuples compare equal


def hparams_differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(field, value in the checkpoint, value now) for every hyper-parameter that differs, dotted names."""
    a, b = _flatten(dict(saved or {})), _flatten(dict(current or {}))
    missing = object()
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        try:
            same = bool(va == vb)
        except Exception:  # values without a plain ==, e.g. tensors
            same = repr(va) == repr(vb)
        if not same:
            diffs.append((key, "(absent)" if va is missing else va, "(absent)" if vb is missing else vb))
    return diffs


def state_dict_mismatch_message(error: BaseException, ckpt_path: str, saved_hparams: dict | None, current_hparams: dict,
                                root_dir: str | None) -> str:
    """One paragraph for a resume whose weights do not fit the model the config builds (Lightning's
    `Error(s) in loading state_dict`, hundreds of lines): which config fields differ from the hyper-parameters
    the checkpoint was trained with, and the fix."""
    text = str(error)
    shapes = text.count("size mismatch for ")
    missing = "Missing key(s)" in text
    unexpected = "Unexpected key(s)" in text
    what = ", ".join(x for x in (f"{shapes} tensor(s) of another shape" if shapes else "",
                                 "tensors the checkpoint lacks" if missing else "",
                                 "tensors this model does not have" if unexpected else "") if x) or "other tensors"
    head = f"cannot resume from {ckpt_path}: its weights do not fit the model this config builds ({what})."
    fresh = f"a new --trainer.default_root_dir (this one, {root_dir}, holds that run)" if root_dir else \
        "a new --trainer.default_root_dir"
    if saved_hparams is None:
        return (f"{head} The checkpoint holds no saved hyper-parameters to compare with. Use the config it was "
                f"trained with to resume it, or {fresh} to train the changed model from scratch.")
    diffs = hparams_differences(saved_hparams, current_hparams)
    # A field only one side has comes from another ldm-lightning version, not from the user: named only when
    # nothing else differs.
    diffs = [d for d in diffs if "(absent)" not in (d[1], d[2])] or diffs
    if not diffs:
        return (f"{head} Its saved hyper-parameters equal this config's, so the difference comes from elsewhere "
                f"(another ldm-lightning version or a changed preset). Resume with the version that wrote it, or "
                f"use {fresh}.")
    def show(v) -> str:
        return v if v == "(absent)" else repr(v)

    shown = "; ".join(f"model.init_args.{k}: {show(v_saved)} in the checkpoint, {show(v_now)} now"
                      for k, v_saved, v_now in diffs[:6])
    more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
    return (f"{head} This config differs from the hyper-parameters the checkpoint was trained with in: {shown}{more}. "
            f"Set {'it' if len(diffs) == 1 else 'them'} back to the checkpoint's value{'s' if len(diffs) > 1 else ''} "
            f"to resume, or use {fresh} to train the changed model from scratch.")
