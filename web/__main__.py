"""``python -m web serve``: the same as the ``keepstream`` console script."""

from __future__ import annotations

from ._cli import main

raise SystemExit(main())
