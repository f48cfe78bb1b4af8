"""``python -m deltadist`` runs the command line."""

from deltadist.cli.main import main

raise SystemExit(main())
