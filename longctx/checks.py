"""The value rules every setting shares, for any module to check its own (no model imports)."""
from __future__ import annotations

from numbers import Integral


def is_int(x) -> bool:
    """An integer, bools excluded (YAML's true is not a size)."""
    return isinstance(x, Integral) and not isinstance(x, bool)


def is_positive_int(x) -> bool:
    """An integer >= 1 (bools excluded): the rule for every size and count in the project."""
    return is_int(x) and x >= 1


def check_positive_int(name: str, value) -> int:
    if not is_positive_int(value):
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value
