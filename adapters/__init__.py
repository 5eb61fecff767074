"""Ecosystem glue: backends and loaders that connect the core engine to other libraries.

Installed as `sae_selfexplain_plugin.adapters`. Adapters import the core; the core never imports them.
"""
