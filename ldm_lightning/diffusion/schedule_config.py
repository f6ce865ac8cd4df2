"""`model.schedule`: which noise schedule (`kind`) and its fields, typed so `--help` lists them and a misspelt
field is refused when the config is parsed. What the module records (hyper-parameters, checkpoint metadata) and
`build_schedule` takes is the plain dict of the fields set: `schedule_settings`."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ldm_lightning.choices import check_choices
from ldm_lightning.optional_fields import optional_fields_dataclass, set_fields

from .schedules import FlowSchedule, VPSchedule

ScheduleKind = Literal["vp", "flow"]
SCHEDULE_CLASSES = {"vp": VPSchedule, "flow": FlowSchedule}  # keys: get_args(ScheduleKind)


def _check(self) -> None:
    check_choices(self, "schedule")
    schedule_fields(self.kind, set_fields(self))


ScheduleConfig = optional_fields_dataclass(
    "ScheduleConfig", __name__,
    "The noise schedule: `kind` and the fields of that kind's schedule (diffusion/schedules.py); a field left "
    "null keeps the schedule's default.",
    {"vp": VPSchedule, "flow": FlowSchedule},
    leading=(("kind", ScheduleKind, "vp", "'vp' (VPSchedule: DDPM / LDM / SD) or 'flow' (FlowSchedule: "
              "rectified flow, SD3). Default 'vp' with SD's scaled_linear betas."),),
    namespace={"__post_init__": _check})


def schedule_fields(kind: str, fields: dict) -> dict:
    """`fields` checked against the schedule of `kind`: ValueError naming a field the schedule lacks."""
    cls = SCHEDULE_CLASSES[kind]
    own = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(fields) - own - {"kind"})
    if bad:
        other = [k for k, c in SCHEDULE_CLASSES.items() if k != kind and set(bad) <= {f.name for f in
                                                                                 dataclasses.fields(c)}]
        hint = f" (a 'kind: {other[0]}' field)" if other else ""
        raise ValueError(f"schedule.kind={kind!r} has no field(s) {bad}{hint}; its fields are {sorted(own)}")
    return fields


def schedule_settings(schedule) -> dict:
    """{'kind': ..., fields set} from a ScheduleConfig, a plain dict (Python callers, checkpoint hyper-parameters
    written before the type existed) or None (the default VP schedule)."""
    if schedule is None:
        return {"kind": "vp"}
    if not isinstance(schedule, ScheduleConfig):
        given = dict(schedule)
        allowed = {f.name for f in dataclasses.fields(ScheduleConfig)}
        if set(given) - allowed:
            raise ValueError(f"schedule has no field(s) {sorted(set(given) - allowed)}; its fields are "
                             f"{sorted(allowed)}")
        schedule = ScheduleConfig(**given)
    return {"kind": schedule.kind, **{k: v for k, v in set_fields(schedule).items() if k != "kind"}}
