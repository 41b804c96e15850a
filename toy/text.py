"""The toy zoo's text encoders: a FLUX text layout in miniature (tiny frozen T5 and CLIP, a
word-level tokenizer fitted to the toy captions), so the toy runs exactly the real FLUX code path;
and the prompt conventions of such an encoder, which sample.py reads from the model folder.

    build_toy_text_encoder("out/toy/text", captions, roles=[caption_roles(c) for c in captions])
    encoder = models.text.load_text_encoder("out/toy/text")   # FluxTextEncoder, as for FLUX.1
    if knows_only_toy_captions(model_folder):                 # what sample.py does
        prompts = toy_prompts(prompts)  # complete a missing background, note unknown prompts

The toy tokenizers' tokenizer_config.json carry "toy_captions": true when their corpus is the
captions of toy/shapes.py: such an encoder knows those words and that grammar only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toy.shapes import parse_caption

if TYPE_CHECKING:  # transformers is imported where an encoder is built: sample.py never needs it
    from transformers import PreTrainedTokenizerFast, T5EncoderModel

# the key build_toy_text_encoder writes into its tokenizers' tokenizer_config.json
TOY_CAPTIONS = "toy_captions"


def caption_words(text: str) -> list[str]:
    """How the toy tokenizer splits text: lower-cased runs of letters/digits, and runs of other
    non-space marks."""
    return re.findall(r"\w+|[^\w\s]+", text.lower())


def word_tokenizer(
    words: list[str], template: str, max_length: int, toy_captions: bool = False
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` plus <pad> 0, </s> 1, <unk> 2, <s> 3; unknown words map
    to <unk>. `toy_captions` is saved in its tokenizer_config.json (see knows_only_toy_captions)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "<s>", *words])}
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()  # the regex \w+|[^\w\s]+, as caption_words
    specials = [("<s>", 3), ("</s>", 1)]
    tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
        toy_captions=toy_captions,  # TOY_CAPTIONS: an extra init kwarg, saved as it is
    )


def caption_problem(text: str) -> str | None:
    """Why `text` is not a caption of toy/shapes.py's grammar (the parser's message), or None."""
    try:
        parse_caption(text)
    except ValueError as e:
        return str(e)
    return None


def build_toy_text_encoder(
    folder: str | Path,
    corpus: list[str],
    seed: int = 0,
    dim: int = 64,
    max_length: int = 32,
    roles: list[list[int]] | None = None,
    pretrain_steps: int = 400,
) -> Path:
    """Write a FLUX text layout in miniature to `folder` and return it.

    CLIP and T5 of width `dim` (2 layers, 4 heads, deterministic from `seed`), with a word-level
    tokenizer over the words of `corpus` (CLIP: "<s> words </s>", 77 tokens; T5: "words </s>",
    `max_length` tokens). Both tokenizers say "toy_captions": true when every caption of `corpus`
    is one of toy/shapes.py's. CLIP stays random. T5 is random too without `roles`; with them (one
    label per word of each caption, -1 for none; the toy zoo's, toy.shapes.caption_roles, are read
    off the caption alone) it is pretrained on `corpus` for `pretrain_steps` (pretrain_toy_t5).
    Load it with models.text.load_text_encoder.

    Why pretrain T5: FLUX puts every text token at RoPE position 0, so the DiT sees T5's states as
    a set, and which object a colour belongs to, and where that object goes, reach it only through
    what each state says about its sentence. Real T5 learned to say it from language; a random one
    says little: with the transformers init each state is nearly context-free (a relative-position
    bias of std 3, kept as the init, makes heads attend to fixed neighbours), and toy DiTs trained
    on it drew the two colours wherever the noise put them, whichever was named first
    (docs/toy-zoo.md: a DiT trained on the pretrained T5 follows the words).
    """
    import transformers  # here, not at the top: sample.py imports this file and never builds

    folder = Path(folder)
    words = sorted({w for caption in corpus for w in caption_words(caption)})
    toy = all(caption_problem(caption) is None for caption in corpus)
    word_tokenizer(words, "<s> $A </s>", 77, toy).save_pretrained(folder / "tokenizer")
    word_tokenizer(words, "$A </s>", max_length, toy).save_pretrained(folder / "tokenizer_2")
    V = len(words) + 4
    clip_cfg = transformers.CLIPTextConfig(
        vocab_size=V,
        hidden_size=dim,
        intermediate_size=2 * dim,
        projection_dim=dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
    )
    t5_cfg = transformers.T5Config(
        vocab_size=V,
        d_model=dim,
        d_kv=dim // 4,
        d_ff=2 * dim,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=16,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left untouched
        torch.manual_seed(seed)
        clip, t5 = transformers.CLIPTextModel(clip_cfg), transformers.T5EncoderModel(t5_cfg)
        # NOTE(deviation): toy-only init and pretraining (see the docstring); real encoders are
        # loaded as stored.
        bias = t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        nn.init.normal_(bias.weight, std=3.0)
        if roles is not None:
            tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer_2")
            tok = dict(padding="max_length", max_length=max_length, truncation=True)
            ids = tokenizer(corpus, return_tensors="pt", **tok).input_ids  # (N, max_length)
            labels = torch.full_like(ids, -100)  # T5's tokens are the words, then </s> and pads
            for row, r in zip(labels, roles, strict=True):
                r = [x if x >= 0 else -100 for x in r][:max_length]
                row[: len(r)] = torch.tensor(r)
            pretrain_toy_t5(t5, ids, labels, pretrain_steps)
    clip.save_pretrained(folder / "text_encoder")
    t5.save_pretrained(folder / "text_encoder_2")
    return folder


def pretrain_toy_t5(
    t5: T5EncoderModel,
    ids: Tensor,
    roles: Tensor,
    steps: int,
    reach: int = 4,
    batch: int = 256,
    lr: float = 3e-3,
) -> tuple[float, float]:
    """Pretrain a toy T5 in place on padded token ids (N, L), by two linear read-outs of every
    state. Draws from the caller's RNG. Returns the last step's two losses.

    - Context prediction, a cousin of T5's span corruption: the words at offsets -reach..reach
      (the state keeps its word and says where it stands; pads are targets, never sources).
    - The token's role label (N, L; -100: none), here the side of the picture its object stands on.
    """
    L, V, n_roles = ids.shape[1], t5.config.vocab_size, int(roles.max()) + 1
    offsets = list(range(-reach, reach + 1))
    # -100: no word there (ignored by cross_entropy)
    context = torch.full((len(ids), L, len(offsets)), -100)  # (N, L, 2·reach + 1)
    for j, o in enumerate(offsets):
        context[:, max(0, -o) : L - max(0, o), j] = ids[:, max(0, o) : L - max(0, -o)]
    context[ids == 0] = -100  # pad sources
    read_context = nn.Linear(t5.config.d_model, len(offsets) * V)
    read_role = nn.Linear(t5.config.d_model, n_roles)
    params = [*t5.parameters(), *read_context.parameters(), *read_role.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    t5.train()
    for _ in range(steps):
        rows = torch.randint(len(ids), (batch,))
        h = t5(input_ids=ids[rows]).last_hidden_state  # (batch, L, d)
        loss_context = F.cross_entropy(read_context(h).reshape(-1, V), context[rows].flatten())
        loss_role = F.cross_entropy(read_role(h).reshape(-1, n_roles), roles[rows].flatten())
        opt.zero_grad(set_to_none=True)
        (loss_context + loss_role).backward()
        opt.step()
    t5.eval()
    return loss_context.item(), loss_role.item()


# ------------------------------------------------------------------------------------------------
# the prompt conventions of a toy encoder, read from a model folder


def knows_only_toy_captions(folder: str | Path) -> bool:
    """Whether a model folder's text encoder knows only toy/shapes.py's captions: its
    tokenizer/tokenizer_config.json says "toy_captions": true. Read from the folder, not its path,
    so a copied zoo behaves as zoo/ does."""
    config = Path(folder) / "tokenizer" / "tokenizer_config.json"
    return config.is_file() and json.loads(config.read_text()).get(TOY_CAPTIONS) is True


def toy_prompts(prompts: list[str], background: str = "black") -> list[str]:
    """Prompts for an encoder that knows only toy/shapes.py's captions, which always end 'on a
    <colour> background'. A prompt that is such a caption but for the background gets `background`
    (said aloud; without one the toy models misdraw, e.g. both objects red). Any other prompt
    outside the grammar gets a note, once."""
    out = []
    for prompt in prompts:
        completed = f"{prompt} on a {background} background"
        if caption_problem(prompt) and not caption_problem(completed):
            print(f"note: the toy zoo's captions always name a background; sampling {completed!r}")
            prompt = completed
        out.append(prompt)
    if unknown := next(filter(None, map(caption_problem, out)), None):
        note = "note: the toy zoo knows only the captions it was trained on"
        print(f"{note}; {unknown}. Expect a poor image.")
    return out
