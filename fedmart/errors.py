"""User errors: one line that says what was wrong and how to fix it, and a non-zero exit."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

__all__ = ["UserError", "USER_ERRORS", "exit_on_user_error"]

F = TypeVar("F", bound=Callable)


class UserError(ValueError):
    """Raised for bad input a user can fix; its message is the whole story."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from clients.interactions import DataError
    from federation.catalog import CatalogError

    return (UserError, DataError, CatalogError)


USER_ERRORS = _user_error_types


def exit_on_user_error(fn: F) -> F:
    """Turn a user error raised by ``fn`` into ``fedmart: error: <message>`` and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_error_types() as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            sys.stderr.write(f"fedmart: error: {msg}\n")
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
