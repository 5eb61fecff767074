"""The demo SAE that ships inside the package: a TopK SAE trained with SAELens on the default embedded model
(scripts/train_demo_sae.py; figures in docs/demo_sae.md), and its activation examples from held-apart text.

Public SAEs live on a model hub this project cannot reach at run time; this one needs no network.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from sae_lens import SAE

from sae_selfexplain_plugin.activation_examples import EXAMPLES_FILE, ActivationExamples

from ..sae_lens import load_sae_folder

DEMO_SAE_DIR = Path(str(resources.files("sae_selfexplain_plugin"))) / "data" / "demo_sae"


def load_demo_sae(device: str = "cpu") -> SAE[Any]:
    """The shipped SAE, as a SAELens `SAE` (fp16 on disk, fp32 in memory)."""
    return load_sae_folder(DEMO_SAE_DIR, device=device)


def demo_examples() -> ActivationExamples:
    """The shipped SAE's activation examples (top and random non-activating contexts per feature)."""
    return ActivationExamples.load(DEMO_SAE_DIR / EXAMPLES_FILE)


def training_report() -> dict[str, Any]:
    """The metrics the training script measured on held-apart text (L0, explained variance, ...)."""
    report: dict[str, Any] = json.loads((DEMO_SAE_DIR / "training_report.json").read_text())
    return report
