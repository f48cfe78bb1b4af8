"""Delta methods, one file each: config dataclass, the math (a ``DeltaModule``), the user class.

A method's class registers itself with ``@register_method`` (:mod:`deltadist.core.registry`).
Every module of this package is imported here, so a new method file needs no edit elsewhere to be
known to ``AutoDeltaConfig`` / ``AutoDeltaModel``.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
