"""Activate ecosystem integrations declared as entry points, without importing their libraries early.

An entry point in the group `sae_selfexplain_plugin.integrations` is named after the library it
extends (e.g. `sae_lens`) and points to a module with `install()` and `uninstall()`. If the library is
already imported, install runs now; otherwise right after the library's first import (a post-import
hook). So `import sae_selfexplain_plugin` stays fast, and the core never imports an adapter by name.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType

GROUP = "sae_selfexplain_plugin.integrations"


def _call(ep: EntryPoint, action: str) -> None:
    try:
        getattr(ep.load(), action)()
    except Exception as e:  # an optional integration must never break the core
        warnings.warn(f"sae-selfexplain: the {ep.name!r} integration failed to {action}: {e}", stacklevel=2)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of watched modules so that their integration installs after they execute.

    A name stays watched until its module has executed: `importlib.util.find_spec(name)` alone (as
    optional-dependency checks do) only builds a spec, so it must not end the watch."""

    def __init__(self) -> None:
        self.pending: dict[str, list[EntryPoint]] = {}
        self._resolving: set[str] = set()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.pending or fullname in self._resolving:
            return None
        self._resolving.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # the real finders (we skip ourselves meanwhile)
        finally:
            self._resolving.discard(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_install(module: ModuleType) -> None:
            exec_module(module)
            for ep in self.pending.pop(fullname, []):
                _call(ep, "install")

        spec.loader.exec_module = exec_and_install  # type: ignore[method-assign]
        return spec


_FINDER = _PostImportFinder()


def _declared(eps: Sequence[EntryPoint] | None) -> Sequence[EntryPoint]:
    return list(entry_points(group=GROUP)) if eps is None else eps


def activate(eps: Sequence[EntryPoint] | None = None) -> None:
    """Install every declared integration now, or on its library's first import. Idempotent."""
    for ep in _declared(eps):
        if ep.name in sys.modules:
            _call(ep, "install")
        else:
            waiting = _FINDER.pending.setdefault(ep.name, [])
            if ep not in waiting:
                waiting.append(ep)
    if _FINDER.pending and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def deactivate(eps: Sequence[EntryPoint] | None = None) -> None:
    """Undo `activate`: uninstall what was installed and stop watching for imports."""
    for ep in _declared(eps):
        _FINDER.pending.pop(ep.name, None)
        if ep.name in sys.modules:
            _call(ep, "uninstall")
    if not _FINDER.pending and _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
