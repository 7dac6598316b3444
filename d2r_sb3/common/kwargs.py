"""The keyword arguments a class accepts, for checking user-given settings before anything is built."""

from __future__ import annotations

import inspect


def accepted_kwargs(cls: type) -> set[str]:
    """Names of the keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the class hierarchy.

    A subclass whose ``__init__`` ends in ``**kwargs`` passes them on to its parent, so the parent's names count
    too; the walk stops at the first ``__init__`` without ``**kwargs``. ``self`` is left out.
    """
    names: set[str] = set()
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names.update(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    names.discard("self")
    return names
