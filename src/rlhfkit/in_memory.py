"""What a Python caller hands a stage that a config of strings cannot hold: data already in memory (a list of dicts, a
`datasets.Dataset`) and functions defined in a script or notebook.

`rlhfkit.api` registers each object under a name in angle brackets (`<data>`, `<reward_fn:my_module.exact>`) and puts
the name into the config where a path or `module:function` would go; the data loader and the reward-function loader
look names up here first. Everything else (checks, resume, logs) sees an ordinary string. Registered objects live in
this process only, so a run started on other processes (`nproc`) cannot use them, and a run resumed later needs them
handed over again.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

_OBJECTS: dict[str, Any] = {}


def is_name(spec: str) -> bool:
    """Whether `spec` has the form of a registered name (registered now or not)."""
    return isinstance(spec, str) and spec.startswith("<") and spec.endswith(">")


def lookup(spec: str) -> Any | None:
    return _OBJECTS.get(spec) if is_name(spec) else None


@contextlib.contextmanager
def registered(objects: dict[str, Any]) -> Iterator[None]:
    """Make `objects` (name -> object) visible to the loaders for the duration of one run."""
    _OBJECTS.update(objects)
    try:
        yield
    finally:
        for name in objects:
            _OBJECTS.pop(name, None)


def function_name(field: str, fn: Any) -> str:
    """The registered name of a function: stable across Python sessions for a function defined the same way, so that
    a resumed run's config matches the first run's."""
    qualified = f"{getattr(fn, '__module__', None) or 'function'}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    return f"<{field}:{qualified}>"


def missing_message(spec: str) -> str:
    return (f"{spec} was handed to an earlier run from Python and is not in this process; pass it again (the same "
            "keyword argument), or give a file or module:function")
