"""Small models made locally: a byte-level BPE tokenizer trained in seconds and tiny Llama, GPT-2, OPT, Qwen2 and
GPT-NeoX models.

Used by the tests, the offline demo and the benchmarks, where no model hub is reachable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig, PreTrainedTokenizerFast,
                          Qwen2Config)

BOS, EOS = "<s>", "</s>"


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 512, bos: bool = True,
                    chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer saved in Hugging Face format. Like GPT-2 it has no pad token (rlhfkit adds one);
    with `bos`, it prepends BOS to every text as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS] if bos else [EOS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=BOS if bos else None)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(arch: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                ffn: int | None = None, max_positions: int = 512, bos_id: int | None = None, eos_id: int = 0):
    ffn = ffn or 4 * hidden
    common = dict(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id)
    if arch == "llama":
        return LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
                           tie_word_embeddings=False, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=max_positions,
                          **common)
    if arch == "opt":
        return OPTConfig(hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=max_positions, word_embed_proj_dim=hidden, **common)
    if arch == "qwen2":  # grouped-query attention (two query heads per key/value head) and biased q/k/v projections
        return Qwen2Config(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                           max_position_embeddings=max_positions, tie_word_embeddings=False, **common)
    if arch == "gpt_neox":  # rotary embeddings on a quarter of each head, parallel residual
        return GPTNeoXConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                             num_attention_heads=heads, max_position_embeddings=max_positions, rotary_pct=0.25,
                             tie_word_embeddings=False, **common)
    raise ValueError(f"unknown tiny architecture {arch!r} (llama, gpt2, opt, qwen2 or gpt_neox)")


def make_tiny_model(arch: str, tokenizer, out_dir: str | Path, *, seed: int = 0, **sizes) -> Path:
    """Build a randomly initialised model from a config and save it with the tokenizer."""
    import torch

    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer), bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, **sizes)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
