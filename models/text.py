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
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    AutoTokenizer,
    CLIPTextModel,
    Gemma2Model,
    T5EncoderModel,
)

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
