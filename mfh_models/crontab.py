"""Validation of the five-field crontab expressions the scheduler takes (``scheduler.audit_cron``).

A strict subset of what APScheduler's ``CronTrigger.from_crontab`` accepts, checked here so that a
bad value fails ``mfh config show`` and start-up with one line instead of a scheduler traceback
(``mfh_models`` imports no scheduler library).
"""

from __future__ import annotations

import re

__all__ = ["validate_crontab"]

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

#: (name, lowest, highest, names or None): the five fields in order.
_FIELDS: tuple[tuple[str, int, int, tuple[str, ...] | None], ...] = (
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day of month", 1, 31, None),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 6, _DAYS),
)

_PART = re.compile(r"^(?P<range>\*|[A-Za-z0-9]+(?:-[A-Za-z0-9]+)?)(?:/(?P<step>\d+))?$")


def _value(text: str, low: int, high: int, names: tuple[str, ...] | None, field: str) -> int:
    if text.isdigit():
        n = int(text)
    elif names is not None and text.lower() in names:
        return names.index(text.lower()) + low
    else:
        raise ValueError(f"{field} {text!r} is not a number{' or a name' if names else ''}")
    if not low <= n <= high:
        raise ValueError(f"{field} {n} is out of range {low}-{high}")
    return n


def validate_crontab(expr: str) -> str:
    """Return ``expr`` if it is ``minute hour day-of-month month day-of-week``; else raise ValueError."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"{expr!r} is not a crontab expression: it needs 5 fields, it has {len(fields)}")
    for text, (field, low, high, names) in zip(fields, _FIELDS, strict=True):
        for part in text.split(","):
            m = _PART.match(part)
            if m is None:
                raise ValueError(f"{field} {part!r} is not *, a value, a range a-b, or one of them /step")
            if m["step"] is not None and int(m["step"]) == 0:
                raise ValueError(f"{field} {part!r}: the step must be at least 1")
            if m["range"] == "*":
                continue
            first, _, last = m["range"].partition("-")
            named = not first.isdigit() or (bool(last) and not last.isdigit())
            if named and (m["step"] is not None or (last and first.isdigit() != last.isdigit())):
                raise ValueError(f"{field} {part!r}: a name takes no step and pairs only with a name")
            a = _value(first, low, high, names, field)
            if last and a > _value(last, low, high, names, field):
                raise ValueError(f"{field} range {m['range']!r} runs backwards")
    return expr
