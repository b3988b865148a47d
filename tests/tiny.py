"""Tiny random models and a word-level tokenizer, built from configs (no downloads)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
    PreTrainedTokenizerFast,
    RobertaConfig,
    T5Config,
)

WORDS = "the a movie film was is great good bad awful fine not very really plot actor story".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
VOCAB_SIZE = 64  # ≥ tokenizer vocab, room for position offsets


def tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over a small vocabulary, with BERT-style specials."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", bos_token="<s>", eos_token="</s>",
    )


COMMON = dict(vocab_size=VOCAB_SIZE, pad_token_id=0)

CONFIGS = {
    "bert": lambda: BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=64, **COMMON),
    "roberta": lambda: RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=70, bos_token_id=5, eos_token_id=6, **COMMON),
    "distilbert": lambda: DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                                           **COMMON),
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=5, eos_token_id=6,
                               **COMMON),
    "llama": lambda: LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=64, max_position_embeddings=64, bos_token_id=5, eos_token_id=6,
                                 tie_word_embeddings=True, **COMMON),
    # Qwen2: GQA, biases on q/k/v, an untied output head.
    "qwen2": lambda: Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=64, max_position_embeddings=64, bos_token_id=5, eos_token_id=6,
                                 tie_word_embeddings=False, **COMMON),
    "t5": lambda: T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                           decoder_start_token_id=0, eos_token_id=6, **COMMON),
}

# Auto classes each architecture is tested with (first: the class it is built and saved as).
AUTO_CLASSES = {
    "bert": ["AutoModelForSequenceClassification", "AutoModel", "AutoModelForMaskedLM"],
    "roberta": ["AutoModelForMaskedLM", "AutoModel", "AutoModelForSequenceClassification"],
    "distilbert": ["AutoModelForSequenceClassification", "AutoModel"],
    "gpt2": ["AutoModelForCausalLM", "AutoModel", "AutoModelForSequenceClassification"],
    "llama": ["AutoModelForCausalLM", "AutoModel"],
    "qwen2": ["AutoModelForCausalLM", "AutoModel", "AutoModelForSequenceClassification"],
    "t5": ["AutoModelForSeq2SeqLM", "AutoModel"],
}


def build(arch: str, auto_class: str | None = None, seed: int = 0, **overrides):
    """A tiny random model of ``arch`` built with ``auto_class`` (default: its first one)."""
    import transformers

    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    auto = getattr(transformers, auto_class or AUTO_CLASSES[arch][0])
    return auto.from_config(config).eval()


def inputs(arch: str, batch: int = 2, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Model inputs: random ids (above the specials) with a padded tail on the first row."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), len(SPECIALS) + len(WORDS), (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    result = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        result["decoder_input_ids"] = ids[:, :4]
    return result


def compressed(arch: str = "bert", auto_class: str | None = None, seed: int = 0, data=None, **config):
    """``(model, report)``: a tiny model of ``arch`` compressed with ``svd`` at kept ratio 0.5, or
    with the ``WSVDConfig`` fields in ``config`` (and importance ``data``)."""
    from hf_wsvd import WSVDConfig, compress

    config = {"method": "svd", "param_ratio": 0.5, **config}
    return compress(build(arch, auto_class, seed), WSVDConfig(**config), data, show_progress=False)


def save(model, path, with_tokenizer: bool = True):
    """``model`` saved to ``path`` with the tiny tokenizer (what the CLI and pipelines load);
    returns ``path``."""
    model.save_pretrained(path)
    if with_tokenizer:
        tokenizer().save_pretrained(path)
    return path


def save_compressed(path, arch: str = "bert", auto_class: str | None = None, with_tokenizer: bool = True, **config):
    """``compressed(arch, auto_class, **config)`` saved to ``path`` (with the tokenizer); returns
    ``(model, report)``."""
    model, report = compressed(arch, auto_class, **config)
    save(model, path, with_tokenizer)
    return model, report
