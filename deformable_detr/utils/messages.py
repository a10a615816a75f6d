"""Text for error and warning messages: a long list of files or keys is named by its first few and a count."""

from collections.abc import Iterable


def listed(items: Iterable, shown: int = 3, sort: bool = False, quote: bool = False) -> str:
    """The first `shown` of `items` and how many more: "a, b, c and 2 more"; with `quote`, each as its repr
    ("'a', 'b', 'c' and 2 more"), as for keys that may hold spaces; with `sort`, the first in sorted order."""
    items = sorted(items) if sort else list(items)
    named = [repr(item) if quote else str(item) for item in items[:shown]]
    return ", ".join(named) + (f" and {len(items) - shown} more" if len(items) > shown else "")
