"""The core of a delta: its record, its modules, attaching and detaching, freezing, logical shapes
on meta, the backbone fingerprint, typed configs and the method registry.

Everything above (mechanisms, checkpoints, the delta object, methods) builds on these; they import
only :mod:`deltadist.addressing`, :mod:`deltadist.engines` and :mod:`deltadist.errors`.
"""
