"""How much of a layer may be rejected as bad data, and how a breach is reported.

Every row a stage refuses is a reject (``<layer>_rejects``, with its step and reason). Rows
a recipe selects away on purpose (``SELECTION_STEPS``) are rejects too, but not problems:
only the others count towards the manifest's ``max_reject_fraction``. When a layer's
problems exceed it, the run fails before anything is published, and the message lists the
first ``LISTED_PROBLEMS`` problems grouped by reason (their file and 1-based row included).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Default of ``max_reject_fraction``: a tenth of a layer's rows. More bad rows than that
#: usually means a wrong declaration (encoding, columns, CRS), not a few broken features.
DEFAULT_MAX_REJECT_FRACTION = 0.1
#: Recipe steps that reject rows by design (a selection, not bad data).
SELECTION_STEPS = ("filter", "filter_bbox", "drop_duplicates")
#: Problems listed in a breach's message.
LISTED_PROBLEMS = 20
_LOCATION = re.compile(r"^.*?, (?:row|data line) \d+(?:, column '[^']*')?: ")
_VALUES = re.compile(r"(?<!\w)b?'[^']*'(?!\w)"
                     r"|(?<![\w.-])[-+]?(?:\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?|nan|inf)(?!\w)")


def counts_as_problem(step: str) -> bool:
    """Whether a reject of ``step`` counts towards ``max_reject_fraction``."""
    return step not in SELECTION_STEPS


def reason_kind(reason: str) -> str:
    """A reason without its location and values: what rejects of one kind share."""
    return _VALUES.sub("…", _LOCATION.sub("", reason, count=1))


def grouped_problems(problems: Iterable[tuple[str, str]], limit: int = LISTED_PROBLEMS) -> str:
    """The first ``limit`` (step, reason) pairs as lines grouped by step and kind of reason."""
    groups: dict[tuple[str, str], list[str]] = {}
    for count, (step, reason) in enumerate(problems):
        if count == limit:
            break
        groups.setdefault((step, reason_kind(reason)), []).append(reason)
    lines = []
    for (step, kind), reasons in groups.items():
        lines.append(f"  {step}: {kind} ({len(reasons)} listed)")
        lines += [f"    - {reason}" for reason in reasons]
    return "\n".join(lines)


def breach_message(layer: str, rejected: int, total: int, limit: float,
                   problems: Iterable[tuple[str, str]]) -> str | None:
    """The failure message when ``rejected`` of ``total`` rows exceed ``limit``, else None."""
    if not rejected or rejected <= limit * total:
        return None
    return (f"layer {layer!r}: {rejected:,} of {total:,} rows were rejected as bad data "
            f"({rejected / total:.1%}), more than its max_reject_fraction {limit:g} allows. "
            f"The first problems, by reason:\n{grouped_problems(problems)}\n"
            "Fix those rows, or, to publish the good rows and keep the bad ones in "
            f"{layer}_rejects, land the batch under a new batch_id with a higher "
            "max_reject_fraction for the layer (or the right encoding, columns or CRS).")
