"""Picking ``modified_modules`` on a local web page (OpenDelta's ``interactive_modify``).

``tree`` turns the backbone into the folded tree the page shows, ``patterns`` turns a selection into
the shortest patterns that select exactly it, ``server`` serves the page behind a token on
127.0.0.1, and ``picker`` ties them to a waiting ``DeltaBase`` call (and to ``deltadist pick``).
"""
