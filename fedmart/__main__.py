"""``python -m fedmart``: the same as the ``fedmart`` console script."""

from fedmart.cli import main

raise SystemExit(main())
