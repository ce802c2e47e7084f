"""The tuning knobs read from the environment (`BATCH_INFER_*`): the numbers parsed and
checked in one place (`KNOBS`), the text ones (`TEXT_KNOBS`) passed on as they are.

A knob is read where it is used, and a run checks every knob before it starts, so a bad
value stops it with one line naming the variable before anything is written. Before, a bad
value was a traceback at import, a shard retried until it failed, or a silent fall back
to the slow CPU image decoder. `submit` checks them too and carries those set to the job;
Ray's tasks and actors read them from their own environment. `inf` turns the stall notice off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from batch_infer.errors import SettingError


@dataclass(frozen=True)
class Knob:
    kind: type[int] | type[float]
    default: int | float | None  # None: the code chooses (see where it is read)
    minimum: int | float
    means: str


KNOBS: dict[str, Knob] = {
    "BATCH_INFER_STALL_NOTICE_SECONDS": Knob(
        float, 60.0, 0.1, "seconds of silence before a run or a followed job says what it waits for"
    ),
    "BATCH_INFER_DECODE_PROCESSES": Knob(
        int, None, 0, "processes the run's own process decodes images with on the CPU"
    ),
    "BATCH_INFER_GPU_DECODERS": Knob(int, 3, 1, "GPU image decoders in a process"),
    "BATCH_INFER_NVIMGCODEC_THREADS": Knob(
        int, None, 1, "CPU threads of each GPU image decoder's own pool"
    ),
}


def setting(name: str) -> int | float | None:
    """The knob's value from the environment, else its default; SettingError if it is set
    to anything but a number of its kind at or above its minimum."""
    knob = KNOBS[name]
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return knob.default
    try:
        value = knob.kind(raw.strip())
    except ValueError:
        value = None
    if value is None or value < knob.minimum or value != value:  # value != value: NaN
        kind = "a whole number" if knob.kind is int else "a number"
        raise SettingError(
            f"environment variable {name}={raw!r}: expected {kind} >= {knob.minimum} "
            f"({knob.means}), or unset for the default"
        )
    return value


# Read as text, passed to nvImageCodec as they are (its decoder options string).
TEXT_KNOBS = ("BATCH_INFER_NVIMGCODEC_OPTIONS",)


def check_settings() -> None:
    """Every knob read once: the first bad one raises SettingError."""
    for name in KNOBS:
        setting(name)


def settings_set_here() -> dict[str, str]:
    """The knobs this process's environment sets: what `submit` carries to the job (having
    checked them first), so that a knob set where a job is submitted holds where it runs."""
    return {k: os.environ[k] for k in (*KNOBS, *TEXT_KNOBS) if os.environ.get(k, "").strip()}
