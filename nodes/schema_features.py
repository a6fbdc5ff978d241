"""Schema features newer ComfyUI has and v0.3.75 lacks, used only where the installed ComfyUI has them.

* ``advanced=True`` on an input: newer frontends fold such inputs under "advanced", so a node shows
  the settings people change and keeps the rare ones (memory options, model flags, seam handling) a
  click away. v0.3.75's ``io.*.Input`` has no such keyword and would raise TypeError.
* ``search_aliases`` on a Schema: extra words the node search matches (paper names, "CLIP guidance",
  ...). v0.3.75's ``io.Schema`` has no such field.

Each is checked on the installed class's signature, so the pack runs unchanged on both, and nodes mark
inputs the same way on every version.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Callable

from comfy_api.latest import io


@lru_cache(maxsize=None)
def accepts_keyword(factory: Callable, keyword: str) -> bool:
    """Whether ``factory(..., keyword=...)`` is accepted (a named parameter or ``**kwargs``)."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no introspectable signature: do not guess
        return False
    return keyword in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def advanced(input_class: Callable, *args: Any, **kwargs: Any) -> Any:
    """``input_class(*args, **kwargs)`` marked advanced where this ComfyUI supports it, e.g.
    ``advanced(io.Boolean.Input, "gradient_checkpointing", default=False, tooltip=...)``."""
    if accepts_keyword(input_class, "advanced"):
        kwargs["advanced"] = True
    return input_class(*args, **kwargs)


def schema(*, search_aliases: list[str], **kwargs: Any) -> io.Schema:
    """``io.Schema(**kwargs)`` with ``search_aliases`` where this ComfyUI's Schema has the field."""
    if accepts_keyword(io.Schema, "search_aliases"):
        kwargs["search_aliases"] = list(search_aliases)
    return io.Schema(**kwargs)
