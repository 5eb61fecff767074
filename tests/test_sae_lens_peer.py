"""A peer check: SAELens's own public behaviours are the same with and without our plugin imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("sae_lens_peer.py")


def run(*args: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_sae_lens_behaves_the_same_with_the_plugin():
    without, with_plugin = run(), run("--plugin")
    assert without.pop("plugin") is False and with_plugin.pop("plugin") is True
    assert set(without) == {"StandardSAE", "TopKSAE", "JumpReLUSAE"}
    assert without == with_plugin
