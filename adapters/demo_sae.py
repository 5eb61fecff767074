"""Deprecated import path: moved to `sae_selfexplain_plugin.adapters.apps.demo_sae` (works until 0.3)."""

from sae_selfexplain_plugin.adapters import _moved

_moved(__name__, "sae_selfexplain_plugin.adapters.apps.demo_sae")
