"""``python -m deltadist.cli``: the ``deltadist`` command."""

from deltadist.cli.main import main

raise SystemExit(main())
