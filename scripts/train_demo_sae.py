"""Train the demo SAE that ships inside the package, with SAELens's own trainer, then build its activation examples.

    python scripts/train_demo_sae.py                       # the shipped SAE (about 40 minutes on 2 CPU cores)
    python scripts/train_demo_sae.py --model DIR --corpus FILE --tokens 20000 --out OUT   # any HF model, any text
    python scripts/train_demo_sae.py --model qwen2.5-coder-1.5b-instruct --hook-layer 9 ... # hours: it resumes

Resumable: the token rows, the residuals (in shards) and SAELens's training checkpoints are kept in --run-dir;
rerun the same command after an interruption and it continues where it stopped (other settings: another run dir).

Steps: corpus (scripts/demo_corpus.py, or --corpus) -> packed sequences of `context` tokens, each starting with BOS
-> residuals at the hook, computed with the model cut after the hooked block, BOS positions dropped -> SAELens
`SAETrainer` on a TopK SAE -> metrics on held-apart text (L0, explained variance, dead fraction, CE loss recovered)
-> `cfg.json` + fp16 `sae_weights.safetensors` (SAELens's disk format) + the activation examples of the held-apart
documents in two splits by document (`activation_examples.safetensors`, explain; `.score.safetensors`, score).
CI never runs this on the real model; tests run it on a tiny one.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from sae_selfexplain_plugin.adapters import backends
from sae_selfexplain_plugin.adapters.apps.contexts import collect_split_contexts
from sae_selfexplain_plugin.adapters.apps.demo_sae import DEMO_SAE_DIR
from sae_selfexplain_plugin.adapters.backends.embedded import EMBEDDED_MODELS, cache_root
from sae_selfexplain_plugin.adapters.backends.transformers import TransformersBackend
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sae_selfexplain_plugin.activation_examples import EXAMPLES_FILE

sys.path.insert(0, str(Path(__file__).parent))
import demo_corpus

SHARD_ROWS = 256  # rows of residuals per saved shard: a few minutes of work on the 1.5B model


def load_model(name: str) -> TransformersBackend:
    """An embedded model by name, or a transformers checkpoint folder (the CLI's `--model` resolver)."""
    backend = backends.load_model(name)
    if not isinstance(backend, TransformersBackend):
        raise SystemExit(f"{name}: training needs a transformers model")
    return backend


def pack(tokenizer: Any, docs: list[str], context: int, n_tokens: int) -> torch.Tensor:
    """Documents joined by blank lines, cut into rows of BOS + (context - 1) tokens, until n_tokens non-BOS tokens."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    body = context - 1
    rows: list[list[int]] = []
    buffer: list[int] = []
    for doc in docs:
        buffer += tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"]
        while len(buffer) >= body:
            rows.append([bos, *buffer[:body]])
            buffer = buffer[body:]
            if len(rows) * body >= n_tokens:
                return torch.tensor(rows)
    if not rows:
        raise SystemExit(f"the corpus is shorter than one row of {context} tokens")
    return torch.tensor(rows)


def document_parts(docs: list[str]) -> dict[str, list[str]]:
    """One source's documents by split: the first 5% evaluation, the next 5% activation examples, the rest
    training (no document in two)."""
    cut_e, cut_x = len(docs) // 20, len(docs) // 10
    return {"eval": docs[:cut_e], "examples": docs[cut_e:cut_x], "train": docs[cut_x:]}


def held_documents(sources: dict[str, list[str]]) -> list[str]:
    """The documents held apart for activation examples, every source's examples part, interleaved."""
    parts = [document_parts(docs)["examples"] for docs in sources.values()]
    return [d for group in itertools.zip_longest(*parts) for d in group if d is not None]


def split_corpus(
    tokenizer: Any, sources: dict[str, list[str]], context: int, n_train: int, n_held: int, n_eval: int = 0
) -> dict[str, torch.Tensor]:
    """Disjoint train / eval rows; each source gives an equal share of every split, rows shuffled. `n_eval` 0:
    an eighth of `n_held` (the activation examples are read from the held-apart documents: `held_documents`)."""
    share = {"train": n_train, "eval": max(n_eval or n_held // 8, context)}
    splits: dict[str, list[torch.Tensor]] = {k: [] for k in share}
    for docs in sources.values():
        parts = document_parts(docs)
        for split, want in share.items():
            splits[split].append(pack(tokenizer, parts[split], context, want // len(sources)))
    g = torch.Generator().manual_seed(0)
    out = {}
    for split, chunks in splits.items():
        rows = torch.cat(chunks)
        out[split] = rows[torch.randperm(len(rows), generator=g)]
    return out


@torch.no_grad()
def residuals(
    backend: TransformersBackend, rows: torch.Tensor, block: int, shards: Path | None = None, batch: int = 32
) -> torch.Tensor:
    """The residual entering `block` (= hook_resid_post of block - 1) at every non-BOS position, as fp16 [N, d].
    With `shards`, each SHARD_ROWS rows' residuals are saved there as computed and reused on a rerun."""
    per_row = rows.shape[1] - 1
    out = torch.empty(len(rows) * per_row, backend.d_model, dtype=torch.float16)
    t0, computed = time.perf_counter(), 0
    for first in range(0, len(rows), SHARD_ROWS):
        chunk = rows[first : first + SHARD_ROWS]
        at = slice(first * per_row, (first + len(chunk)) * per_row)
        path = None if shards is None else shards / f"{first // SHARD_ROWS:05d}.safetensors"
        if path is not None and path.is_file():
            out[at] = load_file(path)["residuals"]
            continue
        acts = torch.cat([
            backend.residual(ids, torch.ones_like(ids), block)[:, 1:].reshape(-1, backend.d_model).to(torch.float16)
            for ids in chunk.split(batch)
        ])  # fmt: skip
        out[at] = acts
        if path is not None:
            _save_atomic({"residuals": acts}, path)
        computed += len(acts)
        rate = computed / (time.perf_counter() - t0)
        print(f"  activations {at.stop:,}/{len(out):,} ({rate:,.0f} tok/s)", flush=True)
    return out


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def prepared_rows(run: Path | None, settings: dict[str, Any], build: Any) -> dict[str, torch.Tensor]:
    """The token rows of every split: `build()`, saved in the run dir with `settings`, or reused from it when the
    settings match (they decide the rows, so a run dir holds one run)."""
    if run is None:
        return dict(build())
    run.mkdir(parents=True, exist_ok=True)
    path, wanted = run / "rows.safetensors", json.dumps(settings, sort_keys=True)
    if path.is_file():
        with safe_open(path, "pt") as f:
            saved = (f.metadata() or {}).get("settings")
        if saved != wanted:
            raise SystemExit(f"{run} holds a run with other settings ({saved}); pass another --run-dir.")
        return load_file(path)
    rows = dict(build())
    _save_atomic(rows, path, {"settings": wanted})
    return rows


def batches(acts: torch.Tensor, batch_size: int, seed: int = 0, skip: int = 0) -> Iterator[torch.Tensor]:
    """Shuffled fp32 training batches, epoch after epoch (SAELens's data provider); the first `skip` are passed
    over (a resumed run continues with the batch it would have seen next)."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    while True:
        order = torch.randperm(len(acts), generator=g)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            n += 1
            if n > skip:
                yield acts[order[i : i + batch_size]].float()


def train(
    acts: torch.Tensor, args: argparse.Namespace, metadata: dict[str, Any], checkpoints: Path | None = None
) -> TopKTrainingSAE:
    """SAELens's trainer on `acts`; with `checkpoints`, it saves SAELens checkpoints there (weights and trainer
    state) and resumes from the latest one."""
    cfg = TopKTrainingSAEConfig(
        d_in=acts.shape[1],
        d_sae=args.width,
        k=args.k,
        normalize_activations="expected_average_only_in",
        metadata=SAEMetadata(**metadata),
    )
    sae = TopKTrainingSAE(cfg)
    total = args.epochs * len(acts)
    n_norm = min(100, len(acts) // args.batch_size)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=args.batch_size,
        lr=args.lr,
        lr_warm_up_steps=max(total // args.batch_size // 20, 1),
        lr_decay_steps=total // args.batch_size // 5,
        lr_end=args.lr / 10,
        dead_feature_window=max(total // args.batch_size // 10, 10),
        feature_sampling_window=max(total // args.batch_size // 5, 10),
        n_batches_for_norm_estimate=n_norm,
        n_checkpoints=args.checkpoints if checkpoints else 0,
        checkpoint_path=str(checkpoints) if checkpoints else None,
    )
    done = sorted((p for p in checkpoints.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)) if (
        checkpoints and checkpoints.is_dir()
    ) else []  # fmt: skip
    skip = 0
    if done:
        sae.load_state_dict(load_file(done[-1] / "sae_weights.safetensors"))
    trainer: SAETrainer[Any, Any] = SAETrainer(trainer_cfg, sae, iter(()))
    if done:
        trainer.load_trainer_state(done[-1])
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t > trainer.n_training_samples]
        # SAELens checkpoints after a step and before counting it: the steps done are the samples seen
        trainer.n_training_steps = trainer.n_training_samples // args.batch_size
        skip = n_norm + trainer.n_training_steps  # the fresh run drew the norm estimate's batches first
        print(f"  resuming training at step {trainer.n_training_steps} from {done[-1]}", flush=True)
    trainer.data_provider = batches(acts, args.batch_size, skip=skip)
    return trainer.fit()


@torch.no_grad()
def evaluate(
    sae: SAE[Any], backend: TransformersBackend, rows: torch.Tensor, held: torch.Tensor, block: int
) -> dict[str, float]:
    """L0 and explained variance on `held` residuals; CE loss recovered when the reconstruction replaces the
    residual entering `block` at non-BOS positions (0 = as bad as zero-ablating it, 1 = as good as the clean run)."""
    x = held.float()
    z = sae.encode(x)
    recon = sae.decode(z)
    fvu = ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    losses = {mode: 0.0 for mode in ("clean", "sae", "zero")}
    layer = backend.layers[block]
    for mode in losses:

        def splice(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], mode: str = mode) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            body = hidden[:, 1:]
            new = sae.decode(sae.encode(body)) if mode == "sae" else torch.zeros_like(body)
            hidden = torch.cat([hidden[:, :1], new.to(hidden.dtype)], dim=1)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        handle = layer.register_forward_pre_hook(splice, with_kwargs=True) if mode != "clean" else None
        try:
            for i in range(0, len(rows), 16):
                ids = rows[i : i + 16]
                logits = backend.model(input_ids=ids, use_cache=False).logits[:, 1:-1]
                losses[mode] += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), ids[:, 2:].reshape(-1), reduction="sum"
                ).item()
        finally:
            if handle is not None:
                handle.remove()
    n = rows[:, 2:].numel()
    ce = {k: v / n for k, v in losses.items()}
    return {
        "l0": float((z > 0).float().sum(-1).mean()),
        "explained_variance": float(1 - fvu),
        "ce_loss_clean": ce["clean"],
        "ce_loss_with_sae": ce["sae"],
        "ce_loss_zero_ablation": ce["zero"],
        "ce_loss_recovered": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
    }


def save_fp16(sae: SAE[Any], out: Path) -> None:
    """SAELens's disk format with fp16 weights (halves the package size); cfg.dtype stays float32, so
    `SAE.load_from_disk` computes in fp32."""
    sae.save_model(out)
    weights = out / "sae_weights.safetensors"
    save_file({k: v.half().contiguous() for k, v in load_file(weights).items()}, weights)


@torch.no_grad()
def _default_run_dir(short: str, settings: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "sae-runs" / f"{Path(short).name}-{settings['hook_layer']}-{key}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="embedded model name or a transformers folder")
    p.add_argument("--hook-layer", type=int, default=15, help="train on blocks.N.hook_resid_post")
    p.add_argument("--corpus", help="a text file (documents separated by blank lines) instead of the registry corpus")
    p.add_argument("--workdir", default=str(Path.home() / ".cache/sae-selfexplain/corpus"))
    p.add_argument("--tokens", type=int, default=2_600_000, help="training tokens (non-BOS)")
    p.add_argument("--held-tokens", type=int, default=200_000, help="tokens held apart for activation examples")
    p.add_argument(
        "--split-tokens", type=int, default=0, help="tokens per activation-examples split (0: --held-tokens)"
    )
    p.add_argument("--eval-tokens", type=int, default=0, help="held-apart evaluation tokens (0: --held-tokens / 8)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--neuronpedia-id", help="default: <model>/<layer>-selfexplain-res-<width>")
    p.add_argument("--checkpoints", type=int, default=20, help="training checkpoints kept in --run-dir (resume points)")
    p.add_argument("--run-dir", help="keeps rows, residual shards and checkpoints for a resume (default: in the cache)")
    p.add_argument("--out", default=str(DEMO_SAE_DIR))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    random.seed(0)

    backend = load_model(args.model)
    block = args.hook_layer + 1
    if args.corpus:
        docs = [d for d in Path(args.corpus).read_text().split("\n\n") if d.strip()]
        sources = {"corpus": docs}
    else:
        sources = demo_corpus.documents(Path(args.workdir))
    short = args.model if args.model in EMBEDDED_MODELS else Path(args.model).name
    settings = {
        "model": backend.model_id,
        "corpus": {k: hashlib.sha256("\n\n".join(v).encode()).hexdigest()[:16] for k, v in sources.items()},
        **{k: getattr(args, k) for k in ("hook_layer", "tokens", "held_tokens", "eval_tokens", "context")},
    }
    run = Path(args.run_dir) if args.run_dir else _default_run_dir(short, settings)
    print(f"run dir: {run}", flush=True)
    split = prepared_rows(
        run,
        settings,
        lambda: split_corpus(backend.tokenizer, sources, args.context, args.tokens, args.held_tokens, args.eval_tokens),
    )
    print({k: f"{v.shape[0]} rows x {v.shape[1]}" for k, v in split.items()}, flush=True)

    t0 = time.perf_counter()
    (run / "residuals").mkdir(exist_ok=True)
    train_acts = residuals(backend, split["train"], block, shards=run / "residuals")
    t_acts = time.perf_counter() - t0
    metadata = {
        "model_name": backend.model_id,
        "hook_name": f"blocks.{args.hook_layer}.hook_resid_post",
        "hf_hook_name": f"model.layers.{args.hook_layer}",
        "prepend_bos": True,
        "context_size": args.context,
        "neuronpedia_id": args.neuronpedia_id
        or f"{short}/{args.hook_layer}-selfexplain-res-{math.ceil(args.width / 1024)}k",
        "dataset_path": "sae-selfexplain demo corpus: " + ", ".join(sources),
    }
    t0 = time.perf_counter()
    training = {k: getattr(args, k) for k in ("width", "k", "epochs", "batch_size", "lr", "checkpoints")}
    key = hashlib.sha256(json.dumps(training, sort_keys=True).encode()).hexdigest()[:12]
    checkpoints = run / f"checkpoints-{key}"  # one folder per training setting: a resume never mixes two
    sae = train(train_acts, args, metadata, checkpoints)
    t_train = time.perf_counter() - t0
    del train_acts

    out = Path(args.out)
    save_fp16(sae, out)
    shipped = SAE.load_from_disk(out)  # measure what ships (fp16 weights)
    held = residuals(backend, split["eval"], block)
    metrics = evaluate(shipped, backend, split["eval"], held, block)
    # both activation-example splits (explain, score: by document) from the held-apart documents, as `contexts`
    # collects them; resumable through their .partial checkpoints in --out
    explain, score = collect_split_contexts(
        shipped, backend, lambda: iter(held_documents(sources)), out / EXAMPLES_FILE,
        max_tokens=args.split_tokens or args.held_tokens, resume=True,
    )  # fmt: skip
    live = set(explain.live_features()) | set(score.live_features())
    metrics["dead_fraction"] = 1 - len(live) / shipped.cfg.d_sae  # fired in neither split
    report = {
        **metrics,
        "train_tokens": int(split["train"][:, 1:].numel()),
        "epochs": args.epochs,
        "sources": {k: len(v) for k, v in sources.items()},
        "seconds_activations": round(t_acts, 1),
        "seconds_training": round(t_train, 1),
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
