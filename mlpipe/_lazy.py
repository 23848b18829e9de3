"""`lazy_import("polars")`: a module stand-in that imports the module at its first attribute
access. The modules the CLI needs only to register their options (compare, report) bind
their heavy dependencies this way, so `mlpipe --help` never imports polars, numpy, scipy or
DuckDB."""

from __future__ import annotations

import importlib


class _LazyModule:
    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_module", None)

    def __getattr__(self, attr: str):
        module = object.__getattribute__(self, "_module")
        if module is None:
            module = importlib.import_module(object.__getattribute__(self, "_name"))
            object.__setattr__(self, "_module", module)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {object.__getattribute__(self, '_name')!r}>"


def lazy_import(name: str):
    """The module `name`, imported when first used."""
    return _LazyModule(name)
