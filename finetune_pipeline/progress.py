"""How library code reports progress: a function taking one line (``print`` by default; an asset passes its
Dagster run log, a training child its Pipes log)."""

from collections.abc import Callable

LogFn = Callable[[str], None]
