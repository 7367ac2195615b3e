"""``python -m ofa_lib.data`` is ``ofa-data`` (:mod:`ofa_lib.data.cli`)."""

from ofa_lib.data.cli import main

raise SystemExit(main())
