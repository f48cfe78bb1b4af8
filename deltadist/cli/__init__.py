"""The ``deltadist`` command line (``deltadist.cli.main:main``)."""
