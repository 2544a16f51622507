"""Named extension points (vision towers, LLM families, projectors, tasks, ...) with "did you mean" errors."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterable, TypeVar

from moebench.errors import UserError

T = TypeVar("T")


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Generic[T]):
    """A name -> object table; unknown names raise a UserError listing the known ones."""

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self._items[name] = obj

    def remove(self, name: str) -> None:
        """Forget `name` (a test that registers its own entry removes it again)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UserError(f"unknown {self.what} {name!r}{did_you_mean(name, self._items)}; known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def values(self) -> list[T]:
        """The registered objects, in the order they were registered."""
        return list(self._items.values())

    def __contains__(self, name: str) -> bool:
        return name in self._items
