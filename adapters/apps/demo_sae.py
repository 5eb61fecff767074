"""The demo SAEs that ship inside the package: TopK SAEs trained with SAELens on embedded models
(scripts/train_demo_sae.py; figures in docs/demo_sae.md), each with its activation examples from held-apart
text. One per model that has one (`DEMO_SAES`); the default model's is `DEMO_SAE_DIR`.

Public SAEs live on a model hub this project cannot reach at run time; these need no network.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_selfexplain_plugin import InputError
from sae_selfexplain_plugin.activation_examples import EXAMPLES_FILE, ActivationExamples

from ..backends.embedded import DEFAULT_MODEL, QWEN_1_5B

if TYPE_CHECKING:
    from sae_lens import SAE

_DATA = Path(str(resources.files("sae_selfexplain_plugin"))) / "data"
DEMO_SAE_DIR = _DATA / "demo_sae"
# embedded model -> the folder of the demo SAE trained on it
DEMO_SAES = {DEFAULT_MODEL: DEMO_SAE_DIR, QWEN_1_5B.name: _DATA / "demo_sae_qwen2.5-coder-1.5b"}


def demo_model(asked: str | None) -> tuple[str, str | None]:
    """The model `demo` explains, and why when it was not asked for: `asked`, else the 1.5B model (the one
    big enough to explain itself; docs/models.md) when its packages are installed, else the default model."""
    if asked is not None:
        return asked, None
    if QWEN_1_5B.installed():
        return QWEN_1_5B.name, None
    return DEFAULT_MODEL, f"{QWEN_1_5B.name} is not installed ({QWEN_1_5B.install_hint}): showing {DEFAULT_MODEL}"


def demo_sae_dir(model: str = DEFAULT_MODEL) -> Path:
    """The folder of the demo SAE shipped for embedded model `model`; InputError naming those that have one."""
    if model not in DEMO_SAES:
        raise InputError(f"no demo SAE ships for {model!r}; the models with one: {sorted(DEMO_SAES)}.")
    return DEMO_SAES[model]


def load_demo_sae(device: str = "cpu", model: str = DEFAULT_MODEL) -> SAE[Any]:
    """The SAE shipped for `model`, as a SAELens `SAE` (fp16 on disk, fp32 in memory)."""
    from ..sae_lens import load_sae_folder  # here: the CLI lists the demo SAEs without SAELens

    return load_sae_folder(demo_sae_dir(model), device=device)


def demo_examples(model: str = DEFAULT_MODEL) -> ActivationExamples:
    """The explain split of the activation examples shipped with `model`'s demo SAE (top and random
    non-activating contexts per feature)."""
    return ActivationExamples.load(demo_sae_dir(model) / EXAMPLES_FILE)


def training_report(model: str = DEFAULT_MODEL) -> dict[str, Any]:
    """The metrics the training script measured on held-apart text (L0, explained variance, ...)."""
    report: dict[str, Any] = json.loads((demo_sae_dir(model) / "training_report.json").read_text())
    return report
