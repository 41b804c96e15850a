"""Frozen text encoders, loaded with transformers from local folders only, returning exactly the backbone's kwargs.

    encoder = load_text_encoder("path/to/FLUX.1-Krea-dev")    # or a SANA folder, or the toy zoo's folder
    v = model(x, t, **encoder(prompts))                       # FLUX: {txt, y}; SANA: {txt, txt_mask}
    v_null = model(x, t, **encoder.null(len(prompts)))        # empty prompt: CFG and DC-Gen's guide loss

The folder layout decides the family, once (diffusers' pipeline layout; `model_index.json` is not needed):
    FLUX  text_encoder/ CLIP-L text model + tokenizer/,  text_encoder_2/ T5-v1.1-XXL encoder + tokenizer_2/
    SANA  text_encoder/ Gemma-2-2B + tokenizer/
Each class reproduces its diffusers pipeline's `encode_prompt` exactly (tests/test_text.py checks to 1e-6):
  - FLUX (FluxPipeline): T5 `last_hidden_state` padded to max_length (512 at sampling; DC-Gen trains with 256),
    WITHOUT an attention mask, as FLUX was trained (the pads' states carry information); CLIP `pooler_output`
    (the final-norm state at the first end-of-text token) of the prompt padded to 77 tokens.
  - SANA (SanaPipeline, SANA §2.3): the prompt lower-cased, the "complex human instruction" prepended, Gemma-2's
    last hidden states; of [BOS, instruction, prompt, padding] only BOS and the last max_length - 1 positions are
    kept, with the padding mask: in effect BOS, the prompt's first max_length - 1 tokens, then padding (the
    instruction's trailing space merges into the prompt's first word). The empty/negative prompt is encoded
    WITHOUT the instruction.

The toy zoo's text encoders are a FLUX-layout folder in miniature, written by toy/text.py (build_toy_text_encoder),
so the toy runs exactly this code path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.loading import load_weights, read_config, read_state_dict

# SanaPipeline's default complex human instruction (diffusers 0.42 `SanaPipeline.__call__`; SANA's
# chi_prompt). Gemma-2 is a decoder-only LLM: prefixing an instruction to "enhance" the prompt makes
# its hidden states better conditioning (SANA §2.3). The lines are joined with "\n" and the user
# prompt follows "User Prompt: " directly.
SANA_INSTRUCTION = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",  # noqa: E501
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",  # noqa: E501
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",  # noqa: E501
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",  # noqa: E501
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",  # noqa: E501
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",  # noqa: E501
    "User Prompt: ",
]


def expand(emb: dict[str, Tensor], batch: int) -> dict[str, Tensor]:
    """A batch-1 embedding dict broadcast to `batch` rows (views, no copies)."""
    return {k: v.expand(batch, *v.shape[1:]) for k, v in emb.items()}


def drop_text(cond: dict[str, Tensor], null: dict[str, Tensor], drop: Tensor) -> dict[str, Tensor]:
    """Per-sample text dropout for CFG training: rows where `drop` (B,) is True take the null
    embedding."""
    return {
        k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), null[k].to(v.dtype), v)
        for k, v in cond.items()
    }


# ----------------------------------------------------------------------------------------------------------------
# FLUX: T5 token states + CLIP pooled vector


class FluxTextEncoder(nn.Module):
    """CLIP-L pooled (B, 768) -> `y`, T5-XXL states (B, max_length, 4096) -> `txt`. Frozen,
    inference only."""

    def __init__(
        self,
        clip: nn.Module,
        clip_tokenizer,
        t5: nn.Module,
        t5_tokenizer,
        max_length: int | None = None,
    ):
        super().__init__()
        self.clip, self.clip_tokenizer, self.t5, self.t5_tokenizer = (
            clip,
            clip_tokenizer,
            t5,
            t5_tokenizer,
        )
        self.requires_grad_(False).eval()
        # T5 length: 512 for real FLUX (256 in DC-Gen training); a tokenizer saved with a shorter
        # model_max_length (the toy's 32) caps it, so one call works for both
        self.max_length = min(max_length or 512, t5_tokenizer.model_max_length)
        # CLIP length: diffusers uses tokenizer.model_max_length (77); capped by the position table
        # for safety
        self.clip_length = min(clip_tokenizer.model_max_length, clip.config.max_position_embeddings)
        # the backbone's input widths
        self.txt_dim, self.vec_dim = t5.config.d_model, clip.config.hidden_size
        self._null: dict[str, Tensor] | None = None

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"txt": (B, max_length, d_T5), "y": (B, d_CLIP)} for a list of prompts; longer prompts
        are truncated."""
        assert isinstance(prompts, (list, tuple)), "pass a list of prompts"
        tok = dict(padding="max_length", truncation=True, return_tensors="pt")
        # (B, 77)
        clip_ids = self.clip_tokenizer(list(prompts), max_length=self.clip_length, **tok).input_ids
        # (B, L)
        t5_ids = self.t5_tokenizer(list(prompts), max_length=self.max_length, **tok).input_ids
        # (B, d_CLIP), at the first end-of-text token
        y = self.clip(clip_ids.to(self.clip.device)).pooler_output
        # (B, L, d_T5); no mask: FLUX attends to pads
        txt = self.t5(t5_ids.to(self.t5.device)).last_hidden_state
        return {"txt": txt, "y": y}

    def null(self, batch: int) -> dict[str, Tensor]:
        """The empty prompt's embedding, computed once and cached, broadcast to `batch` rows."""
        if self._null is None or self._null["txt"].device != self.t5.device:
            self._null = self([""])
        return expand(self._null, batch)


# ----------------------------------------------------------------------------------------------------------------
# SANA: Gemma-2 states with the complex human instruction, plus the padding mask


class SanaTextEncoder(nn.Module):
    """Gemma-2 last hidden states (B, max_length, 2304) -> `txt`, padding mask (B, max_length) ->
    `txt_mask`."""

    def __init__(
        self,
        gemma: nn.Module,
        tokenizer,
        max_length: int = 300,
        instruction: list[str] | None = None,
    ):
        super().__init__()
        self.gemma, self.tokenizer, self.max_length = gemma, tokenizer, max_length
        self.requires_grad_(False).eval()
        # [] disables it
        self.instruction = "\n".join(SANA_INSTRUCTION if instruction is None else instruction)
        # diffusers' budget: instruction tokens (with BOS and the trailing "▁") + max_length - 2.
        # Right-padded, the kept window below then starts at the prompt's first token (that "▁"
        # merges into it when tokenized jointly).
        self.instruction_length = len(tokenizer.encode(self.instruction)) + max_length - 2
        self.txt_dim = gemma.config.hidden_size
        self._null: dict[str, Tensor] | None = None

    @torch.no_grad()
    def encode(self, prompts: list[str], instruction: bool = True) -> dict[str, Tensor]:
        """{"txt": (B, max_length, d), "txt_mask": (B, max_length) bool}; `instruction` prepends the
        instruction."""
        assert isinstance(prompts, (list, tuple)), "pass a list of prompts"
        # SanaPipeline's preprocessing (clean_caption=False)
        prompts = [p.lower().strip() for p in prompts]
        length = self.max_length
        if instruction and self.instruction:
            prompts, length = [self.instruction + p for p in prompts], self.instruction_length
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=length,
            truncation=True,
            padding_side="right",
            return_tensors="pt",
        )
        mask = tok.attention_mask.to(self.gemma.device)  # (B, length), 1 = real token
        # (B, length, d)
        txt = self.gemma(tok.input_ids.to(self.gemma.device), attention_mask=mask).last_hidden_state
        # SANA §2.3: keep BOS and the last max_length - 1 positions; with the instruction this cuts
        # it off (its information has flowed into the prompt's states through causal attention),
        # without it this keeps all.
        keep = [0, *range(length - self.max_length + 1, length)]
        return {"txt": txt[:, keep], "txt_mask": mask[:, keep].bool()}

    def forward(self, prompts: list[str]) -> dict[str, Tensor]:
        return self.encode(prompts, instruction=True)

    def null(self, batch: int) -> dict[str, Tensor]:
        """The empty prompt's embedding (no instruction, as SanaPipeline's negative prompt), cached,
        `batch` rows."""
        if self._null is None or self._null["txt"].device != self.gemma.device:
            self._null = self.encode([""], instruction=False)
        return expand(self._null, batch)


# ----------------------------------------------------------------------------------------------------------------
# loading


FLUX_LAYOUT = {
    "text_encoder": "CLIP text model",
    "tokenizer": "CLIP tokenizer",
    "text_encoder_2": "T5 encoder",
    "tokenizer_2": "T5 tokenizer",
}
SANA_LAYOUT = {"text_encoder": "Gemma-2 model", "tokenizer": "Gemma tokenizer"}
LAYOUTS = "FLUX (text_encoder/ CLIP + tokenizer/, text_encoder_2/ T5 + tokenizer_2/) or SANA (text_encoder/ Gemma-2 + tokenizer/)"  # noqa: E501


def load_text_encoder(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    max_length: int | None = None,
) -> FluxTextEncoder | SanaTextEncoder:
    """The frozen text encoder of a model folder, on `device`, in `dtype` (default: as stored).

    `max_length`: T5 tokens for FLUX (default 512; at most the T5 tokenizer's model_max_length, 32
        for the toy), Gemma tokens kept for SANA (default 300). Nothing is downloaded: every part must
        be in the folder."""
    folder = Path(folder)
    cfg = folder / "text_encoder" / "config.json"
    model_type = json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
    if (
        model_type == "clip_text_model"
        or (folder / "text_encoder_2").exists()
        or (folder / "tokenizer_2").exists()
    ):
        family, layout = "FLUX", FLUX_LAYOUT
    elif model_type in ("gemma2", "gemma2_text"):
        family, layout = "SANA", SANA_LAYOUT
    else:
        what = (
            f"text_encoder/ holds model_type {model_type!r}"
            if model_type
            else "there is no text_encoder/config.json"
        )
        raise FileNotFoundError(
            f"{folder}: no text encoder found ({what}); expected the layout of {LAYOUTS}"
        )
    missing = [f"{sub}/ ({what})" for sub, what in layout.items() if not (folder / sub).is_dir()]
    if missing:
        want = ", ".join(f"{sub}/ ({what})" for sub, what in layout.items())
        raise FileNotFoundError(
            f"{folder}: {family} text layout is missing {', '.join(missing)}; it needs {want}"
        )

    if family == "FLUX" and toy_tokenizers(folder):
        return load_toy_flux_text(folder, device, dtype, max_length)
    # imported here: transformers takes seconds to import, and the toy zoo's encoders do not need it
    from transformers import AutoTokenizer, CLIPTextModel, Gemma2Model, T5EncoderModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its "Loading weights" bars on every run

    # strict: transformers would fill a missing weight with random numbers and go on
    def load(cls, sub: str):
        model, info = cls.from_pretrained(
            folder / sub, dtype=dtype or "auto", local_files_only=True, output_loading_info=True
        )
        if bad := info["missing_keys"] or info["mismatched_keys"]:
            raise ValueError(
                f"{folder / sub}: the weights do not fit its config.json ({sorted(bad)[:4]}, ...)"
            )
        return model.to(device)

    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    if family == "FLUX":
        clip, t5 = load(CLIPTextModel, "text_encoder"), load(T5EncoderModel, "text_encoder_2")
        t5_tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True)
        return FluxTextEncoder(clip, tokenizer, t5, t5_tokenizer, max_length)
    return SanaTextEncoder(load(Gemma2Model, "text_encoder"), tokenizer, max_length or 300)


# ----------------------------------------------------------------------------------------------------------------
# the toy zoo's CLIP and T5 in plain PyTorch: the same functions as transformers' CLIPTextModel and T5EncoderModel
# (tests/test_text.py checks to 1e-6), loaded without importing transformers, which costs 2-3 s of every demo run.
# Word-level tokenizers are read with the `tokenizers` library that transformers itself calls.


class WordTokenizer:
    """A saved `tokenizers` tokenizer (tokenizer.json) with transformers' call: padded to
    max_length, truncated, ids as a LongTensor."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        self.model_max_length = config["model_max_length"]
        self.pad_id = self.tokenizer.token_to_id(config["pad_token"])

    def __call__(self, prompts: list[str], max_length: int, **_) -> SimpleNamespace:
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(length=max_length, pad_id=self.pad_id)
        ids = [e.ids for e in self.tokenizer.encode_batch(list(prompts))]
        return SimpleNamespace(input_ids=torch.tensor(ids, dtype=torch.long))  # (B, max_length)


def embedding(n: int, d: int) -> nn.Embedding:
    """An nn.Embedding left uninitialised: its weights are always loaded. (Its random init on the meta
    device would import torch._dynamo, 1.5 s of the 4096 px demo's start-up.)"""
    return nn.Embedding(n, d, _weight=torch.empty(n, d))


class ClipLayer(nn.Module):
    """Pre-LN transformer layer: causal multi-head attention, then an MLP with quick-GELU."""

    def __init__(self, d: int, heads: int, d_ff: int, eps: float):
        super().__init__()
        self.heads = heads
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(d, eps), nn.LayerNorm(d, eps)
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, nn.Linear(d, d))
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x: Tensor) -> Tensor:
        a, h = self.self_attn, self.layer_norm1(x)  # (B, L, d)
        q, k, v = (
            p(h).unflatten(-1, (self.heads, -1)).transpose(1, 2)
            for p in (a.q_proj, a.k_proj, a.v_proj)
        )
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, L, d_head)
        x = x + a.out_proj(h.transpose(1, 2).flatten(2))
        h = self.mlp.fc1(self.layer_norm2(x))
        return x + self.mlp.fc2(h * torch.sigmoid(1.702 * h))  # quick-GELU


class ClipText(nn.Module):
    """CLIPTextModel: token + position embeddings, causal layers, final LayerNorm; pooled at the
    first end-of-text token."""

    def __init__(self, config: dict):
        super().__init__()
        d, eps = config["hidden_size"], config["layer_norm_eps"]
        self.config = SimpleNamespace(**config)
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = embedding(config["vocab_size"], d)
        self.embeddings.position_embedding = embedding(config["max_position_embeddings"], d)
        heads, d_ff = config["num_attention_heads"], config["intermediate_size"]
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            ClipLayer(d, heads, d_ff, eps) for _ in range(config["num_hidden_layers"])
        )
        self.final_layer_norm = nn.LayerNorm(d, eps)

    @property
    def device(self) -> torch.device:
        return self.final_layer_norm.weight.device

    def forward(self, ids: Tensor) -> SimpleNamespace:
        e = self.embeddings
        x = e.token_embedding(ids) + e.position_embedding.weight[: ids.shape[1]]  # (B, L, d)
        for layer in self.encoder.layers:
            x = layer(x)
        x = self.final_layer_norm(x)
        eos = (ids == self.config.eos_token_id).int().argmax(-1)  # (B,) first end-of-text token
        return SimpleNamespace(last_hidden_state=x, pooler_output=x[torch.arange(len(x)), eos])


def t5_buckets(length: int, buckets: int, max_distance: int) -> Tensor:
    """T5's bidirectional relative-position buckets (L, L): half per direction, exact up to
    buckets/4, then logarithmic up to max_distance (T5 §2.1; transformers `_relative_position_bucket`)."""
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # key - query
    half = buckets // 2
    exact = half // 2
    far = exact + (
        torch.log(rel.abs().float() / exact) / math.log(max_distance / exact) * (half - exact)
    ).to(torch.long)
    return (rel > 0).long() * half + torch.where(
        rel.abs() < exact, rel.abs(), far.clamp(max=half - 1)
    )


class T5Norm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, statistics in fp32 (T5LayerNorm)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


class T5Layer(nn.Module):
    """T5 encoder block: RMS-norm -> attention (unscaled, plus the shared position bias) ->
    RMS-norm -> gated-GELU MLP."""

    def __init__(
        self, d: int, heads: int, d_kv: int, d_ff: int, eps: float, has_bias: bool, buckets: int
    ):
        super().__init__()
        self.heads = heads
        att, ff = nn.Module(), nn.Module()
        for name, (n_in, n_out) in {
            "q": (d, heads * d_kv),
            "k": (d, heads * d_kv),
            "v": (d, heads * d_kv),
            "o": (heads * d_kv, d),
        }.items():
            setattr(att, name, nn.Linear(n_in, n_out, bias=False))
        if has_bias:
            att.relative_attention_bias = embedding(buckets, heads)
        ff.wi_0, ff.wi_1, ff.wo = (
            nn.Linear(d, d_ff, bias=False),
            nn.Linear(d, d_ff, bias=False),
            nn.Linear(d_ff, d, bias=False),
        )
        self.layer = nn.ModuleList([nn.Module(), nn.Module()])
        self.layer[0].SelfAttention, self.layer[1].DenseReluDense = att, ff
        self.layer[0].layer_norm, self.layer[1].layer_norm = T5Norm(d, eps), T5Norm(d, eps)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        a, ff = self.layer[0].SelfAttention, self.layer[1].DenseReluDense
        h = self.layer[0].layer_norm(x)  # (B, L, d)
        q, k, v = (p(h).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (a.q, a.k, a.v))
        # no 1/sqrt(d_kv) scaling in T5; the position bias is added to the scores
        h = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=1.0
        )  # (B, heads, L, d_kv)
        x = x + a.o(h.transpose(1, 2).flatten(2))  # (B, L, d)
        h = self.layer[1].layer_norm(x)
        g = ff.wi_0(h)
        g = (
            0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g.pow(3))))
        )  # gelu_new
        return x + ff.wo(g * ff.wi_1(h))


class T5Encoder(nn.Module):
    """T5EncoderModel (no attention mask, as FLUX encodes): embedding, blocks sharing block 0's
    position bias, final RMS-norm."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = SimpleNamespace(**config)
        c = self.config
        self.shared = embedding(c.vocab_size, c.d_model)
        self.encoder = nn.Module()
        self.encoder.block = nn.ModuleList(
            T5Layer(
                c.d_model,
                c.num_heads,
                c.d_kv,
                c.d_ff,
                c.layer_norm_epsilon,
                i == 0,
                c.relative_attention_num_buckets,
            )
            for i in range(c.num_layers)
        )
        self.encoder.final_layer_norm = T5Norm(c.d_model, c.layer_norm_epsilon)

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    def forward(self, ids: Tensor) -> SimpleNamespace:
        c, blocks = self.config, self.encoder.block
        buckets = t5_buckets(
            ids.shape[1], c.relative_attention_num_buckets, c.relative_attention_max_distance
        )
        bias = blocks[0].layer[0].SelfAttention.relative_attention_bias(buckets.to(ids.device))
        bias = bias.permute(2, 0, 1)[None]  # (1, heads, L, L)
        x = self.shared(ids)  # (B, L, d)
        for block in blocks:
            x = block(x, bias)
        return SimpleNamespace(last_hidden_state=self.encoder.final_layer_norm(x))


def toy_tokenizers(folder: Path) -> bool:
    """Whether both tokenizers are the toy zoo's word-level ones (tokenizer.json, "toy_captions")."""
    configs = [folder / sub / "tokenizer_config.json" for sub in ("tokenizer", "tokenizer_2")]
    return all(
        c.is_file() and json.loads(c.read_text()).get("toy_captions") is True for c in configs
    )


def load_toy_flux_text(folder: Path, device, dtype, max_length: int | None) -> FluxTextEncoder:
    """The toy zoo's FLUX text layout with the plain-PyTorch CLIP and T5 above."""
    models = []
    for cls, sub in ((ClipText, "text_encoder"), (T5Encoder, "text_encoder_2")):
        with torch.device("meta"):
            model = cls(read_config(folder / sub, f"toy {cls.__name__}"))
        sd = read_state_dict(folder / sub, name="model", dtype=dtype, device=device)
        load_weights(model, sd, str(folder / sub))
        models.append(model.eval())
    clip_tok, t5_tok = WordTokenizer(folder / "tokenizer"), WordTokenizer(folder / "tokenizer_2")
    return FluxTextEncoder(models[0], clip_tok, models[1], t5_tok, max_length)
