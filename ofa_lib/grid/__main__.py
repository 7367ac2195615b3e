"""``python -m ofa_lib.grid`` is ``ofa-grid`` (:mod:`ofa_lib.grid.cli`)."""

from ofa_lib.grid.cli import main

raise SystemExit(main())
