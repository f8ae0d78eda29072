"""``python -m trustrl.classic ...`` -- see :mod:`trustrl.classic.cli`."""

from trustrl.classic.cli import main

raise SystemExit(main())
