"""Training a DirectionAdapter on a frozen model (Pepper et al. 2026): the loss is the teacher-forced
cross-entropy of each direction's label right after the template, with the adapter's vector injected at the
placeholder. Only the adapter's parameters learn; the model's are frozen for the run.

    report = train_adapter(adapter, backend, prompt, train, validation, TrainingSettings(), checkpoint=path)

Checkpoints (adapter, optimiser, step, best validation loss; safetensors with JSON, never pickle) are written
atomically after every evaluation, and a run given the same checkpoint path resumes from it, once it has
checked that the checkpoint was made with the same adapter, settings, data and identity. Training stops
early when the validation loss has not improved for `patience` evaluations, and the best adapter is kept.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from ..backend import Backend, Injection
from ..checkpoint import check_fields, load_checkpoint, restore_generator, save_checkpoint, take
from ..errors import InputError
from ..templates import RenderedPrompt
from . import DirectionAdapter

# The recipe of the shipped adapter (docs/adapters.md); `train-adapter` uses it by default.
DEFAULT_ARCHITECTURE = "scalar-affine-low-rank"
DEFAULT_RANK = 64
DEFAULT_WORDS = 2000  # vocabulary words in the training data (4,000 named fewer latents; docs/adapters.md)
# how an SAE's training latents are labelled; the first is the default (adapters/apps/train_direction_adapter.py)
LATENT_LABELS = ("tokens", "word", "descriptions", "mixed")


@dataclass(frozen=True)
class TrainingSettings:
    """Optimisation settings. `lr` is in units of the adapter's own size (see `_param_groups`)."""

    steps: int = 650
    batch_size: int = 16
    lr: float = 0.02
    eval_every: int = 130
    patience: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "patience"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise InputError(f"lr must be > 0, got {self.lr}.")


@dataclass
class LabelledDirections:
    """Directions [n, d_model] with one label each: the text the model should say for the direction."""

    directions: torch.Tensor
    labels: list[str]

    def __post_init__(self) -> None:
        if self.directions.ndim != 2 or len(self.directions) != len(self.labels):
            raise InputError(
                f"need directions [n, d_model] and n labels, got {tuple(self.directions.shape)} and "
                f"{len(self.labels)} labels."
            )
        if not self.labels or any(not label.strip() for label in self.labels):
            raise InputError("every direction needs a non-empty label, and at least one is needed.")

    def __len__(self) -> int:
        return len(self.labels)

    def units(self) -> torch.Tensor:
        d = self.directions.float()
        units: torch.Tensor = d / d.norm(dim=-1, keepdim=True)
        return units


@dataclass
class TrainingReport:
    steps: int
    stopped_early: bool
    initial_validation_loss: float
    best_validation_loss: float
    history: list[dict[str, float]] = field(default_factory=list)  # {"step", "train_loss", "validation_loss"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _State:
    step: int = 0
    best: float = math.inf
    bad: int = 0  # evaluations since the last improvement
    initial: float = math.nan
    history: list[dict[str, float]] = field(default_factory=list)


class TrainableModel(Backend, Protocol):
    """A backend that can score continuations with gradients flowing into the injected vectors."""

    def continuation_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, injection: Injection, start: int
    ) -> torch.Tensor:
        """log P(input_ids[:, t] | input_ids[:, :t]) for t >= start, [B, T - start], with the injection;
        differentiable with respect to injection.vectors."""


def label_batch(
    prompt: RenderedPrompt, tokenizer: Any, layer: int, vectors: torch.Tensor, labels: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, Injection, torch.Tensor]:
    """Prompt + label + the template's first stop string per row, right-padded (so every row shares the
    prompt's prefix), with `vectors` injected at the placeholders: (ids, mask, injection, target mask
    [B, T - len(prompt)])."""
    stop = prompt.stop_strings[0] if prompt.stop_strings else ""
    targets = [tokenizer(label + stop, add_special_tokens=False)["input_ids"] for label in labels]
    n_prompt, width = len(prompt.input_ids), len(prompt.input_ids) + max(len(t) for t in targets)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    ids = torch.full((len(labels), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, target in enumerate(targets):
        ids[row, : n_prompt + len(target)] = torch.tensor([*prompt.input_ids, *target])
        mask[row, : n_prompt + len(target)] = 1
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[:, list(prompt.placeholder_positions)] = True
    return ids, mask, Injection(layer, positions, vectors), mask[:, n_prompt:].bool()


def label_loss(
    model: TrainableModel, adapter: DirectionAdapter, prompt: RenderedPrompt, layer: int, data: LabelledDirections
) -> torch.Tensor:
    """Mean cross-entropy per label token of `data`'s labels after the prompt, through the adapter."""
    ids, mask, injection, target = label_batch(prompt, model.tokenizer, layer, adapter(data.units()), data.labels)
    device = model.device
    injection = Injection(layer, injection.positions.to(device), injection.vectors.to(device))
    logprobs = model.continuation_logprobs(ids.to(device), mask.to(device), injection, len(prompt.input_ids))
    target = target.to(device)
    return -(logprobs * target).sum() / target.sum()


def train_adapter(
    adapter: DirectionAdapter,
    model: TrainableModel,
    prompt: RenderedPrompt,
    train: LabelledDirections,
    validation: LabelledDirections,
    settings: TrainingSettings,
    *,
    checkpoint: Path | None = None,
    progress: Callable[[int, float], None] | None = None,
    identity: dict[str, Any] | None = None,
) -> TrainingReport:
    """Train `adapter` in place (see the module docstring); returns the loss history. `identity` (e.g. the
    SAE's) is stored in the checkpoint and must match on resume, as must the adapter, settings and data."""
    layer = adapter.metadata.layer
    adapter.check_slots(len(prompt.placeholder_positions))
    optimizer = torch.optim.Adam(_param_groups(adapter, settings.lr))
    generator = torch.Generator().manual_seed(settings.seed)
    state = _State()
    best = {k: v.detach().clone() for k, v in adapter.state_dict().items()}
    run = {
        "identity": identity or {},
        "adapter": {k: v for k, v in adapter.metadata.to_dict().items() if k != "validation"},
        "settings": {k: v for k, v in asdict(settings).items() if k != "steps"},  # more steps continue a run
        "data_sha256": _data_hash(train, validation),
    }
    if checkpoint is not None and checkpoint.is_file():
        state, best = _load_checkpoint(checkpoint, run, adapter, optimizer, generator, settings)

    def evaluate() -> float:
        with torch.no_grad():
            losses = [
                float(label_loss(model, adapter, prompt, layer, chunk)) * len(chunk)
                for chunk in _chunks(validation, settings.batch_size * 2)
            ]
        return sum(losses) / len(validation)

    if math.isnan(state.initial):
        state.initial = state.best = evaluate()
    stopped_early = False
    with _frozen(model):
        while state.step < settings.steps:
            rows = torch.randint(len(train), (settings.batch_size,), generator=generator)
            batch = LabelledDirections(train.directions[rows], [train.labels[i] for i in rows.tolist()])
            loss = label_loss(model, adapter, prompt, layer, batch)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            state.step += 1
            if progress is not None:
                progress(1, float(loss.detach()))
            if state.step % settings.eval_every and state.step < settings.steps:
                continue
            val = evaluate()
            state.history.append({"step": state.step, "train_loss": float(loss.detach()), "validation_loss": val})
            if val < state.best:
                state.best, state.bad = val, 0
                best = {k: v.detach().clone() for k, v in adapter.state_dict().items()}
            else:
                state.bad += 1
            if checkpoint is not None:
                _save_checkpoint(checkpoint, run, adapter, optimizer, generator, state, best)
            if state.bad >= settings.patience:
                stopped_early = True
                break
    adapter.load_state_dict(best)
    return TrainingReport(state.step, stopped_early, state.initial, state.best, state.history)


def _param_groups(adapter: DirectionAdapter, lr: float) -> list[dict[str, Any]]:
    """Adam steps sized to each parameter's natural size (residual norms differ by orders of magnitude
    across models): the scale moves by ~lr of itself per step; a coordinate of the bias or of V (outputs in
    residual units) by ~lr of the scale's share per coordinate; an entry of U (which reads the unit
    direction) by ~lr of its initial size, 1/sqrt(d)."""
    size = float(adapter.scale.detach().abs().clamp(min=1e-3))
    per_coordinate = 1 / math.sqrt(adapter.metadata.d_model)
    groups: list[dict[str, Any]] = [{"params": [adapter.scale], "lr": lr * size}]
    outputs = [p for p in (adapter.bias, adapter.V) if p is not None]
    if outputs:
        groups.append({"params": outputs, "lr": lr * size * per_coordinate})
    if adapter.U is not None:
        groups.append({"params": [adapter.U], "lr": lr * per_coordinate})
    return groups


def _chunks(data: LabelledDirections, size: int) -> Iterator[LabelledDirections]:
    for start in range(0, len(data), size):
        yield LabelledDirections(data.directions[start : start + size], data.labels[start : start + size])


@contextmanager
def _frozen(model: Backend) -> Iterator[None]:
    """No gradients for the model's own parameters during training (restored after)."""
    module: Any = getattr(model, "model", None)
    params = list(module.parameters()) if module is not None else []
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


_CHECKPOINT = "adapter-training"
_OPTIMIZER_KEYS = ("step", "exp_avg", "exp_avg_sq")  # Adam's state per parameter


def _data_hash(train: LabelledDirections, validation: LabelledDirections) -> str:
    """sha256 of the training and validation data (directions and labels): what a resume must train on."""
    digest = hashlib.sha256()
    for part in (train, validation):
        digest.update(part.directions.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        digest.update(json.dumps(part.labels).encode())
    return digest.hexdigest()


def _save_checkpoint(
    path: Path,
    run: dict[str, Any],
    adapter: DirectionAdapter,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    state: _State,
    best: dict[str, torch.Tensor],
) -> None:
    tensors = {f"adapter.{k}": v for k, v in adapter.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in best.items()})
    for index, values in optimizer.state_dict()["state"].items():
        tensors.update(
            {f"optimizer.{index}.{k}": torch.as_tensor(values[k], dtype=torch.float32) for k in _OPTIMIZER_KEYS}
        )
    tensors["generator"] = generator.get_state()
    save_checkpoint(path, _CHECKPOINT, tensors, {**run, "state": asdict(state)})


def _load_checkpoint(
    path: Path,
    run: dict[str, Any],
    adapter: DirectionAdapter,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    settings: TrainingSettings,
) -> tuple[_State, dict[str, torch.Tensor]]:
    """Continue from checkpoint `path` after checking it was made by this run (same identity, adapter,
    settings and data): InputError naming the field or tensor otherwise."""
    fix = f"delete {path} to start over."
    tensors, info = load_checkpoint(path, _CHECKPOINT, fix)
    for name, value in run.items():
        check_fields(path, name, info.get(name), value, fix)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in adapter.state_dict().items()}
    weights = {k: take(path, tensors, f"adapter.{k}", *shape, fix) for k, shape in shapes.items()}
    best = {k: take(path, tensors, f"best.{k}", *shape, fix) for k, shape in shapes.items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = {k for k in tensors if k.startswith("optimizer.")}
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for index, param in enumerate(params):
        if f"optimizer.{index}.step" not in names:
            continue
        moments[index] = {
            k: take(
                path, tensors, f"optimizer.{index}.{k}", () if k == "step" else tuple(param.shape), torch.float32, fix
            )
            for k in _OPTIMIZER_KEYS
        }
    unknown = sorted(names - {f"optimizer.{i}.{k}" for i in moments for k in _OPTIMIZER_KEYS})
    if unknown:
        raise InputError(f"{path}: tensor {unknown[0]!r} is not part of this run's optimiser state; {fix}")
    state = _checked_state(path, info.get("state"), settings, fix)
    adapter.load_state_dict(weights)
    optimizer.load_state_dict({"state": moments, "param_groups": optimizer.state_dict()["param_groups"]})
    restore_generator(path, generator, take(path, tensors, "generator", (-1,), torch.uint8, fix), fix)
    return state, best


def _checked_state(path: Path, raw: Any, settings: TrainingSettings, fix: str) -> _State:
    """The training progress of a checkpoint, every field of its type."""
    if not isinstance(raw, dict) or set(raw) != {f.name for f in fields(_State)}:
        raise InputError(f"{path}: field 'state' must hold {[f.name for f in fields(_State)]}; {fix}")
    number = (int, float)
    if type(raw["step"]) is int and raw["step"] > settings.steps:
        raise InputError(
            f"{path}: field 'state.step' is {raw['step']}: the checkpoint has trained more steps than this run's "
            f"{settings.steps}; pass --steps {raw['step']} or more to continue it, or {fix}"
        )
    ok = {
        "step": type(raw["step"]) is int and raw["step"] >= 0,
        "bad": type(raw["bad"]) is int and raw["bad"] >= 0,
        "best": type(raw["best"]) in number,
        "initial": type(raw["initial"]) in number,
        "history": isinstance(raw["history"], list)
        and all(isinstance(h, dict) and all(type(v) in number for v in h.values()) for h in raw["history"]),
    }
    for name, good in ok.items():
        if not good:
            raise InputError(f"{path}: field 'state.{name}' is {raw[name]!r}, not a valid value; {fix}")
    return _State(**raw)
