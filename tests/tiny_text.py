"""Tiny random text-encoder folders in the real layouts, built offline with transformers (no hub): the FLUX pair
(CLIP BPE tokenizer + CLIP text model, T5 Unigram tokenizer + T5 encoder) and SANA's Gemma-2 with a byte-fallback
BPE tokenizer. The tokenizer classes are the real ones (CLIPTokenizer, T5Tokenizer, GemmaTokenizer), only their
vocabularies are tiny. A helper for tests (test_text.py; sample.py's pipeline parity can reuse it), not a test file.
"""

import string
from pathlib import Path

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

LETTERS = list(string.ascii_lowercase)
WORDS = ["a", "cat", "the", "on", "red", "blue", "circle", "square", "above", "photo", "of"]


def clip_tokenizer() -> CLIPTokenizer:
    """BPE over letters (word-final letters carry </w>) with merges that build a few whole words."""
    letters = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS)]
    vocab = {tok: i for i, tok in enumerate(letters)}
    merges = []
    for w in WORDS:  # merge left to right: "c a" -> "ca", "ca t</w>" -> "cat</w>"
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """Unigram over letters and a few words, "<pad>" 0, "</s>" 1, "<unk>" 2 as in T5."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += (
        [(c, -3.0) for c in LETTERS]
        + [("▁" + c, -2.5) for c in LETTERS]
        + [("▁" + w, -1.0) for w in WORDS]
    )
    return T5Tokenizer(vocab=list(dict.fromkeys(pieces)), extra_ids=0, model_max_length=512)


def gemma_tokenizer() -> GemmaTokenizer:
    """Byte-fallback BPE (any character encodes), BOS added, like Gemma's."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    vocab = {
        tok: i
        for i, tok in enumerate([*specials, *(f"<0x{i:02X}>" for i in range(256)), *LETTERS, "▁"])
    }
    merges = []
    for w in WORDS:
        pieces = ["▁", *w]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), add_bos_token=True)


def build_flux_text(folder: Path, seed: int = 0) -> Path:
    """text_encoder/ (CLIP), tokenizer/, text_encoder_2/ (T5), tokenizer_2/ in `folder`."""
    torch.manual_seed(seed)
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=16,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=24,
            d_kv=6,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
        )
    )
    clip.save_pretrained(folder / "text_encoder")
    clip_tok.save_pretrained(folder / "tokenizer")
    t5.save_pretrained(folder / "text_encoder_2")
    t5_tok.save_pretrained(folder / "tokenizer_2")
    return folder


def build_sana_text(folder: Path, seed: int = 0) -> Path:
    """text_encoder/ (Gemma-2) and tokenizer/ in `folder`."""
    torch.manual_seed(seed)
    tok = gemma_tokenizer()
    gemma = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tok),
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            sliding_window=64,
        )
    )
    gemma.save_pretrained(folder / "text_encoder")
    tok.save_pretrained(folder / "tokenizer")
    return folder
