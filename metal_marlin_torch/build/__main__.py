"""``python -m metal_marlin_torch.build``: build the Metal extension now (see the package docstring)."""

from . import main

raise SystemExit(main())
