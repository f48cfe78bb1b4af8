"""Delta methods, one file each: config dataclass, the math (a ``DeltaModule``), the user class.

A method's class registers itself with ``@register_method`` (:mod:`deltadist.core.registry`); no
other file lists the methods.
"""
