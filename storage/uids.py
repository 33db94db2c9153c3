"""UID validation: the only gate between network input and file-system paths."""

from __future__ import annotations

import re

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_UID_LOOSE_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def check_uid(value: object, name: str, strict: bool = False) -> str:
    """Return ``value`` if it is a usable UID, else raise ``ValueError`` naming it and the rule.

    A UID is 1 to 64 characters of digits and dots, with no empty component (PS3.5 9.1). Real
    equipment sometimes writes components with a leading zero; those are accepted unless
    ``strict``, since they are still safe as path components.

    Parameters
    ----------
    value : object
        The candidate, usually straight from a received data set.
    name : str
        The attribute name used in the error message, e.g. ``'SOPInstanceUID'``.
    strict : bool
        Also refuse components with leading zeros.

    Raises
    ------
    ValueError
        ``value`` is missing, not a string, too long or holds other characters.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"Invalid '{name}' value {value!r} - missing or empty")
    if len(value) > 64:
        raise ValueError(f"Invalid '{name}' value {value[:80]!r} - longer than 64 characters")
    pattern = _UID_RE if strict else _UID_LOOSE_RE
    if not pattern.match(value):
        raise ValueError(
            f"Invalid '{name}' value {value[:80]!r} - only digits and dots, no empty component"
        )
    return value


def is_valid_uid(value: object) -> bool:
    """Whether :func:`check_uid` accepts ``value``."""
    try:
        check_uid(value, "UID")
    except ValueError:
        return False
    return True
