"""``python -m spatial_assets.cli`` (same as the ``spatial-assets`` console script)."""

from spatial_assets.cli import main

raise SystemExit(main())
