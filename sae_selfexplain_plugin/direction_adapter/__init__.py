"""Trained maps from a feature's unit direction to the vector injected at the placeholder.

    adapter = DirectionAdapter.load("adapter.safetensors")
    SelfExplainer(backend, SelfExplainConfig(adapter=adapter, template=adapter.metadata.template))

The model stays frozen; only the adapter is trained (direction_adapter/training.py), after Pepper et al. 2026,
"Learning Self-Interpretation from Interpretability Artifacts" (arXiv 2602.10352). For a unit direction x:

| architecture | injected vector | parameters |
|---|---|---|
| `scale` | s·x | 1 |
| `scalar-affine` | s·x + b | d + 1 |
| `scalar-affine-low-rank` | s·x + (x U) Vᵀ + b | d + 2dr + 1 |

The bias b is what the bare direction lacks: a decoder row is a direction *relative to* the mean residual
that every real token's residual carries, and the model reads a vector with that mean far better.

One file: safetensors tensors, with the metadata as JSON in the safetensors header.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError

ARCHITECTURES = ("scale", "scalar-affine", "scalar-affine-low-rank")
METADATA_KEY = "sae_selfexplain_adapter"


@dataclass
class AdapterMetadata:
    """What an adapter was trained for and on; checked against the model and settings it is used with."""

    model_id: str  # the model it was trained on (short names compared, docs/usage.md)
    d_model: int
    source: str  # where the explained directions live, e.g. "blocks.15.hook_resid_post"
    layer: int  # injection block
    template: str
    architecture: str = "scalar-affine"
    rank: int = 0
    slots: int = 1  # injected vectors per direction: 1 for every placeholder, or one per placeholder of the template
    trained_on: str = ""  # a sentence: the data (kinds, counts, what was held out)
    validation: dict[str, float] = field(default_factory=dict)  # figures measured on held-out data
    # SAE latents the adapter saw in training or validation, as [first, last] ranges: never score it on them
    trained_latents: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "adapter metadata") -> AdapterMetadata:
        """Metadata read from a file (`where` names it in errors): every field of its type and range."""
        if not isinstance(d, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(d).__name__}; re-save the adapter.")
        missing = sorted({"model_id", "d_model", "source", "layer", "template"} - set(d))
        if missing:
            raise InputError(f"{where} lacks {missing}; the file was not written by DirectionAdapter.save.")
        kept = {k: v for k, v in d.items() if k in _FIELD_RULES}
        for name, value in kept.items():
            kind, low = _FIELD_RULES[name]
            # bool is an int to Python, and "576" or 576.0 would be coerced elsewhere: exact types only
            exact = type(value) is kind
            ok = exact and (low is None or value >= low)
            if name == "validation" and ok:
                ok = all(type(v) in (int, float) for v in value.values())
            if name == "trained_latents" and ok:
                ok = all(
                    type(r) is list and len(r) == 2 and all(type(i) is int for i in r) and 0 <= r[0] <= r[1]
                    for r in value
                )
            if not ok:
                want = {
                    int: "an integer",
                    str: "a string",
                    dict: "an object of numbers",
                    list: "a list of [first, last] latent ranges",
                }[kind]
                want += f" >= {low}" if low is not None else ""
                raise InputError(
                    f"{where}: field {name!r} must be {want}, got {repr(value)[:80]} ({type(value).__name__}); "
                    "correct the field or re-save the adapter with DirectionAdapter.save."
                )
        return cls(**kept)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each weight a DirectionAdapter with this metadata holds (computed, nothing allocated)."""
        arch, d, rank, slots = self.architecture, self.d_model, self.rank, self.slots
        if arch not in ARCHITECTURES:
            raise InputError(f"unknown adapter architecture {arch!r}; choose one of {list(ARCHITECTURES)}.")
        if (arch == "scalar-affine-low-rank") != (rank > 0):
            raise InputError(f"rank must be > 0 exactly for 'scalar-affine-low-rank', got {arch!r} with rank {rank}.")
        if slots < 1 or (slots > 1 and arch == "scale"):
            raise InputError(f"slots must be >= 1, and 1 for 'scale' (nothing differs between slots), got {slots}.")
        per_slot = (slots,) if slots > 1 else ()
        shapes: dict[str, tuple[int, ...]] = {"scale": ()}
        if arch != "scale":
            shapes["bias"] = (*per_slot, d)
        if rank:
            shapes.update(U=(d, rank), V=(*per_slot, d, rank))
        return shapes


class DirectionAdapter(nn.Module):
    """s·x (+ x U Vᵀ) (+ b) for unit directions x [..., d_model]; see the module docstring."""

    def __init__(self, metadata: AdapterMetadata, init_scale: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        arch, d, rank, slots = metadata.architecture, metadata.d_model, metadata.rank, metadata.slots
        metadata.tensor_shapes()  # checks the architecture, rank and slots
        self.metadata = metadata
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))
        per_slot = (slots,) if slots > 1 else ()  # one bias and one V per slot; U (what is read) is shared
        self.bias = nn.Parameter(torch.zeros(*per_slot, d)) if arch != "scale" else None
        # V starts at zero, so a new low-rank adapter is exactly its scalar-affine part; U's random start is
        # seeded, so a training run is reproducible
        generator = torch.Generator().manual_seed(seed)
        self.U = nn.Parameter(torch.randn(d, rank, generator=generator) / d**0.5) if rank else None
        self.V = nn.Parameter(torch.zeros(*per_slot, d, rank)) if rank else None

    def forward(self, unit: torch.Tensor) -> torch.Tensor:
        """[..., d_model] unit directions -> injected vectors [..., d_model], or [..., slots, d_model]."""
        unit = unit.to(self.scale.dtype)
        slotted = self.metadata.slots > 1
        out = self.scale * (unit.unsqueeze(-2) if slotted else unit)  # [..., 1, d] broadcasts over the slots
        if self.U is not None and self.V is not None:
            read = unit @ self.U  # [..., rank]
            out = out + (torch.einsum("...r,sdr->...sd", read, self.V) if slotted else read @ self.V.T)
        if self.bias is not None:
            out = out + self.bias
        return out

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def fingerprint(self) -> str:
        """Short hash of the weights and metadata: stands for the adapter in settings hashes and notes."""
        h = hashlib.sha256(json.dumps(self.metadata.to_dict(), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (weights, metadata in its header), atomically."""
        from safetensors.torch import save

        from ..files import atomic_writer

        path = Path(path)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        blob = save(tensors, metadata={METADATA_KEY: json.dumps(self.metadata.to_dict())})
        with atomic_writer(path, "wb") as f:
            f.write(blob)
        return path

    @classmethod
    def load(cls, path: str | Path, d_model: int | None = None) -> DirectionAdapter:
        """Read a file written by `save`; a missing, foreign or damaged file is a clear error. With `d_model`
        (the model's), an adapter for another width is refused before anything is allocated."""
        from safetensors import safe_open

        from ..files import parse_json

        path = Path(path)
        if not path.is_file():
            raise InputError(f"no adapter file at {path}; train one with `sae-selfexplain train-adapter`.")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not iterable)
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise InputError(f"{path} is not a readable safetensors file ({e}); re-save or re-train it.") from None
        if METADATA_KEY not in header:
            raise InputError(f"{path} holds no adapter metadata; it was not written by DirectionAdapter.save.")
        where = f"{path}: adapter metadata"
        metadata = AdapterMetadata.from_dict(parse_json(header[METADATA_KEY], where), where)
        try:
            expected = metadata.tensor_shapes()
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        if d_model is not None and metadata.d_model != d_model:
            raise InputError(
                f"{where}: field 'd_model' is {metadata.d_model}, but the model's d_model is {d_model}; "
                "use an adapter trained for this model, or train one with `sae-selfexplain train-adapter`."
            )
        # the file's own tensors bound every size the metadata claims, so a forged d_model allocates nothing
        if shapes != expected:
            differ = [
                f"{k} {shapes.get(k, 'absent')} (needs {expected.get(k, 'none')})"
                for k in sorted(set(shapes) | set(expected))
                if shapes.get(k) != expected.get(k)
            ]
            raise InputError(
                f"{path}: weights do not match its metadata: architecture {metadata.architecture!r} with "
                f"d_model={metadata.d_model}, rank={metadata.rank}, slots={metadata.slots}, but the file holds "
                f"{', '.join(differ[:5])}; re-save the adapter with DirectionAdapter.save."
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in shapes}
        except Exception as e:
            raise InputError(f"{path} is not a readable safetensors file ({e}); re-save or re-train it.") from None
        _check_weights(tensors, str(path))
        adapter = cls(metadata)
        adapter.load_state_dict(tensors)
        return adapter.eval()

    def check_held_out(self, features: Sequence[int], name: str = "the adapter") -> None:
        """Refuse to score this adapter on latents it was trained or validated on (`trained_latents`): its
        figures there would be in-sample."""
        seen = [f for f in features if any(lo <= f <= hi for lo, hi in self.metadata.trained_latents)]
        if seen:
            ranges = ", ".join(f"{lo}-{hi}" for lo, hi in self.metadata.trained_latents)
            raise InputError(
                f"{len(seen)} of the latents to score ({seen[:5]}{'...' if len(seen) > 5 else ''}) are ones {name} was "
                f"trained or validated on (latents {ranges}): its scores there are in-sample. Score held-out latents "
                "(--features outside those ranges, or a smaller --limit), or pass --adapter none."
            )

    def mismatches(self, model_id: str, d_model: int, layer: int, template: str) -> list[str]:
        """How this adapter differs from the model, injection layer and template it would be used with."""
        from ..results import short_model_name

        m = self.metadata
        problems = []
        if m.d_model != d_model:
            problems.append(f"d_model {m.d_model} != the model's {d_model}")
        if short_model_name(m.model_id) != short_model_name(model_id):
            problems.append(f"model {m.model_id!r} != {model_id!r}")
        if m.layer != layer:
            problems.append(f"injection layer {m.layer} != {layer}")
        if m.template != template:
            problems.append(f"template {m.template!r} != {template!r}")
        return problems

    def check_slots(self, placeholders: int) -> None:
        """Raise InputError unless the rendered prompt has a placeholder for each of this adapter's slots."""
        slots = self.metadata.slots
        if slots > 1 and slots != placeholders:
            raise InputError(
                f"an adapter with {slots} slots injects one vector per placeholder, but the prompt of template "
                f"{self.metadata.template!r} has {placeholders}; use slots=1"
                + (f" or slots={placeholders}." if placeholders > 1 else ".")
            )

    def check(self, model_id: str, d_model: int, layer: int, template: str) -> None:
        """Raise InputError unless this adapter was trained for this model, injection layer and template."""
        m = self.metadata
        problems = self.mismatches(model_id, d_model, layer, template)
        _check_weights(self.state_dict(), "the adapter")
        if problems:
            raise InputError(
                f"the adapter does not fit these settings: {'; '.join(problems)}. Use the adapter's own settings "
                f"(layer={m.layer}, template={m.template!r}), train one for yours, or pass adapter=None."
            )


_FIELD_RULES: dict[str, tuple[type, int | None]] = {  # AdapterMetadata's fields: (type, least value)
    "model_id": (str, None),
    "d_model": (int, 1),
    "source": (str, None),
    "layer": (int, 0),
    "template": (str, None),
    "architecture": (str, None),
    "rank": (int, 0),
    "slots": (int, 1),
    "trained_on": (str, None),
    "validation": (dict, None),
    "trained_latents": (list, None),
}


def _check_weights(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise InputError naming the first weight that is not floating point or holds NaN or inf: such an
    adapter injects NaN, and the model answers every feature with nothing."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise InputError(f"{where}: tensor {name!r} has dtype {tensor.dtype}, not floating point; re-save it.")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise InputError(
                f"{where}: tensor {name!r} holds {bad} NaN or infinite values of {tensor.numel()}; "
                "its training diverged or the file was altered: re-train the adapter."
            )


SHIPPED_DIR = Path(__file__).parent.parent / "data" / "adapters"
# Demo SAE latents below this never train a shipped adapter: `eval`, the sae-latent benchmark and the demo
# use them, so their figures are on held-out latents.
HELD_OUT_LATENTS = 1024


def shipped_adapter(model_id: str, d_model: int, source: str, layer: int, template: str) -> Path | None:
    """The adapter file shipped with the package for this model, source hook, injection layer and template."""
    for path in sorted(SHIPPED_DIR.glob("*.safetensors")):
        adapter = DirectionAdapter.load(path)
        if adapter.metadata.source == source and not adapter.mismatches(model_id, d_model, layer, template):
            return path
    return None
