"""Column names as safe SQL identifiers: the ``normalize_column_names`` rule.

One rule, used both when planning a recipe against a schema and when running it, so the
planned output schema and the written one cannot disagree:

1. lower-case (``str.lower``);
2. replace every character outside ``[a-z0-9_]`` with ``_`` (so ``"Pop. 2020"`` becomes
   ``"pop__2020"`` and ``"é"`` becomes ``"_"``; runs are not collapsed, which keeps more
   names distinct);
3. prefix a leading digit with ``_`` (``"2020"`` -> ``"_2020"``); an empty name becomes ``"_"``;
4. truncate to 63 bytes (PostgreSQL's identifier limit; every character is ASCII by now);
5. de-duplicate in column order: the first column keeps the name, later ones get ``_2``,
   ``_3``, ... (the base truncated so the result still fits 63 bytes). A suffixed name never
   takes a name that another column gets by itself or a reserved name (``_row_id``,
   ``geometry``, ``bbox``), so the outcome depends only on the list of names.

SQL keywords (``order``, ``select``) stay as they are: the loader quotes identifiers.
"""

from __future__ import annotations

import re

from libs.manifest.recipe import RESERVED_COLUMNS

MAX_IDENTIFIER_BYTES = 63
_UNSAFE = re.compile(r"[^a-z0-9_]")


def safe_identifier(name: str) -> str:
    """Steps 1-4 of the rule for one name (no de-duplication)."""
    cleaned = _UNSAFE.sub("_", name.lower())
    if not cleaned:
        cleaned = "_"
    if cleaned[0].isdigit():
        cleaned = "_" + cleaned
    return cleaned[:MAX_IDENTIFIER_BYTES]


def normalized_names(names: list[str]) -> list[str]:
    """The whole rule: safe, distinct names in the order given."""
    wanted = [safe_identifier(n) for n in names]
    # Names a column gets without a suffix, and names never handed out: a suffixed name
    # must avoid both so that one column's suffix never steals another column's name.
    unavailable = set(wanted) | set(RESERVED_COLUMNS)
    taken: set[str] = set()
    result = []
    for name in wanted:
        if name not in taken and name not in RESERVED_COLUMNS:
            chosen = name
        else:
            n = 2
            while True:
                suffix = f"_{n}"
                chosen = name[: MAX_IDENTIFIER_BYTES - len(suffix)] + suffix
                if chosen not in taken and chosen not in unavailable:
                    break
                n += 1
        taken.add(chosen)
        result.append(chosen)
    return result
