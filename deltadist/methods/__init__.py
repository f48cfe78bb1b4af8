"""Delta methods, one file each: config dataclass, the math (a ``DeltaModule``), the user class.

A new method registers with one line in ``deltadist/api/registry.py``.
"""
