"""`python -m unionfs` runs the `pyunion` command line."""
from unionfs.cli import main

raise SystemExit(main())
