"""`python -m sae_selfexplain_plugin.adapters.cli`: the `sae-selfexplain` command."""

from . import main

raise SystemExit(main())
