"""Prompt encoders of the large families: `load_text_encoder(cfg) -> encode(list[str]) -> dict[str, Tensor]`.

- flux: CLIP-L pooled output `pooled_prompt_embeds` (B, 768) and the T5 sequence `prompt_embeds`
  (B, max_sequence_length, 4096), both padded to their maximum length as in FluxPipeline (no T5 mask).
- qwen_image: Qwen2.5-VL last hidden states of the prompt inside the chat template, template prefix dropped,
  `prompt_embeds` (B, T, 3584) + `prompt_embeds_mask` (B, T); also the empty prompt's embeddings (the CFG
  negative) as `negative_prompt_embeds` (B, T0, 3584) + `negative_prompt_embeds_mask`.
- dit: class ids written as text ("207") -> `class_labels` (B,).

Encoders and tokenizers load with from_pretrained from a diffusers-format root (`model.text_encoder`, default
`model.pretrained`): subfolders text_encoder/tokenizer (and text_encoder_2/tokenizer_2 for FLUX). With
`model.tiny: true` tiny random encoders and a word-level tokenizer are built in memory (no files, no downloads);
`save_tiny_text_encoders` writes the same layout to a directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from models.types import Config


Encoded = dict[str, torch.Tensor]

# Qwen-Image's prompt template; the first 34 tokens (the system turn and the user header) are dropped from the
# hidden states (the values diffusers' QwenImagePipeline uses).
QWEN_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                 "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                 "<|im_end|>\n<|im_start|>assistant\n")
QWEN_TEMPLATE_DROP = 34
QWEN_TOKENIZER_MAX = 1024

_TINY_WORDS = ("a an the of and in on with photo picture painting drawing handwritten digit zero one two three "
               "four five six seven eight nine cat dog red blue green small large image describe color shape size "
               "texture quantity text spatial relationships objects background system user assistant").split()
_SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(model_max_length: int, add_eos: bool = False):
    """A word-level tokenizer built on the fly (STACK.md): unknown words map to [UNK]."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_SPECIALS)}
    for w in _TINY_WORDS + [",", ":", ".", "\n"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    # words, punctuation runs and newlines are tokens: Qwen's template prefix is then 34 tokens, as with the
    # real tokenizer (QWEN_TEMPLATE_DROP)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), behavior="removed", invert=True)
    if add_eos:
        tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   model_max_length=model_max_length)


def tiny_text_encoders(family: str, seed: int = 0) -> dict[str, object]:
    """Tiny random encoders + tokenizers with the diffusers component names, sized for the tiny transformers
    (text width 32)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family in ("flux", "digits"):  # digits: the FLUX architecture at toy scale
            from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

            tok, tok2 = tiny_tokenizer(77, add_eos=True), tiny_tokenizer(512, add_eos=True)
            V = len(tok)
            clip = CLIPTextModel(CLIPTextConfig(vocab_size=V, hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=77, pad_token_id=0, bos_token_id=2,
                                                eos_token_id=3))
            t5 = T5EncoderModel(T5Config(vocab_size=V, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                         pad_token_id=0, eos_token_id=3, decoder_start_token_id=0))
            return {"text_encoder": clip.eval(), "tokenizer": tok, "text_encoder_2": t5.eval(), "tokenizer_2": tok2}
        if family == "qwen_image":
            from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

            tok = tiny_tokenizer(QWEN_TOKENIZER_MAX + QWEN_TEMPLATE_DROP)
            config = Qwen2_5_VLConfig(
                text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                                 bos_token_id=2, eos_token_id=3, pad_token_id=0,
                                 rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
                vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                                   fullatt_block_indexes=[0]),
            )
            return {"text_encoder": Qwen2_5_VLForConditionalGeneration(config).eval(), "tokenizer": tok}
    raise ValueError(f"no tiny text encoders for family {family!r}")


def save_tiny_text_encoders(family: str, root: str | Path, seed: int = 0) -> Path:
    """Write tiny encoders/tokenizers in the diffusers layout under `root` (for from_pretrained tests)."""
    root = Path(root)
    for name, component in tiny_text_encoders(family, seed).items():
        component.save_pretrained(root / name)
    return root


def _load_components(cfg: Config, names: dict[str, type]) -> dict[str, object]:
    from transformers import AutoTokenizer, PretrainedConfig

    if cfg.model.tiny:
        return tiny_text_encoders(cfg.model.family, cfg.run.seed)
    root = cfg.model.text_encoder or cfg.model.pretrained
    if not root:
        raise ValueError(f"model.text_encoder (or model.pretrained) must name a diffusers-format dir or hub id "
                         f"holding {', '.join(names)} for family {cfg.model.family!r}")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.text_dtype]
    out: dict[str, object] = {}
    for sub, cls in names.items():
        if cls is None:
            # a diffusers-format tokenizer folder has no model config.json: without `config` transformers probes
            # for one, which fails on a hub id offline (HF_HUB_OFFLINE=1, found by `piflow rehearse`); the class
            # comes from tokenizer_config.json either way
            out[sub] = AutoTokenizer.from_pretrained(root, subfolder=sub, config=PretrainedConfig())
        else:
            out[sub] = cls.from_pretrained(root, subfolder=sub, torch_dtype=dtype).eval().requires_grad_(False)
    return out


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def encoder_to(encoder, device) -> object:
    """A prompt encoder (`load_text_encoder`'s object) with its networks moved to `device` (a GPU where there is
    one: T5-XXL / Qwen2.5-VL encode there, not on the CPU); its outputs still come back on the CPU."""
    for value in vars(encoder).values() if hasattr(encoder, "__dict__") else ():
        if isinstance(value, nn.Module):
            value.to(device)
    return encoder


class FluxTextEncoder:
    def __init__(self, text_encoder, tokenizer, text_encoder_2, tokenizer_2, max_sequence_length: int):
        self.clip, self.clip_tok = text_encoder, tokenizer
        self.t5, self.t5_tok = text_encoder_2, tokenizer_2
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Encoded:
        ids = self.clip_tok(prompts, padding="max_length", max_length=self.clip_tok.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
        pooled = self.clip(ids.to(_device(self.clip)), output_hidden_states=False).pooler_output  # (B, 768)
        ids2 = self.t5_tok(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                           return_tensors="pt").input_ids
        seq = self.t5(ids2.to(_device(self.t5)), output_hidden_states=False)[0]  # (B, T, 4096)
        return {"prompt_embeds": seq.float().cpu(), "pooled_prompt_embeds": pooled.float().cpu()}


class QwenImageTextEncoder:
    def __init__(self, text_encoder, tokenizer, max_sequence_length: int):
        self.model, self.tok = text_encoder, tokenizer
        self.max_sequence_length = max_sequence_length
        self._negative: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (embeds (B, T, D) float32, mask (B, T) int64), T = longest prompt after the template prefix."""
        batch = self.tok([QWEN_TEMPLATE.format(p) for p in prompts], max_length=QWEN_TOKENIZER_MAX + QWEN_TEMPLATE_DROP,
                         padding=True, truncation=True, return_tensors="pt")
        device = _device(self.model)
        hidden = self.model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                            output_hidden_states=True).hidden_states[-1].float().cpu()  # (B, L, D)
        # Each prompt's valid tokens, minus the template prefix, left-aligned and zero-padded.
        pieces = [h[m.bool()][QWEN_TEMPLATE_DROP:] for h, m in zip(hidden, batch.attention_mask)]
        T = max(p.shape[0] for p in pieces)
        embeds = hidden.new_zeros(len(pieces), T, hidden.shape[-1])
        mask = torch.zeros(len(pieces), T, dtype=torch.long)
        for i, p in enumerate(pieces):
            embeds[i, : p.shape[0]] = p
            mask[i, : p.shape[0]] = 1
        return embeds[:, : self.max_sequence_length], mask[:, : self.max_sequence_length]

    def __call__(self, prompts: list[str]) -> Encoded:
        embeds, mask = self.embed(prompts)
        if self._negative is None:
            self._negative = self.embed([""])  # the CFG negative: the empty prompt, encoded once
        neg, neg_mask = self._negative
        B = len(prompts)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask,
                "negative_prompt_embeds": neg.expand(B, -1, -1).clone(),
                "negative_prompt_embeds_mask": neg_mask.expand(B, -1).clone()}


def encode_class_labels(prompts: list[str]) -> Encoded:
    labels = []
    for p in prompts:
        try:
            labels.append(int(p.strip()))
        except ValueError:
            raise ValueError(f"family dit: a prompt must be an integer class id, got {p!r}") from None
    return {"class_labels": torch.tensor(labels, dtype=torch.long)}


def builtin_text_encoder(cfg: Config) -> Callable[[list[str]], Encoded]:
    """The prompt encoder of a built-in family (`cfg.model.family`: flux, digits, qwen_image, dit), loaded once;
    call it with a list of prompts. Callers use `models.families.load_text_encoder`, which asks the family
    (`Family.load_text_encoder` lands here; a family added by recipe overrides it)."""
    family = cfg.model.family
    if family in ("flux", "digits"):
        from transformers import CLIPTextModel, T5EncoderModel

        c = _load_components(cfg, {"text_encoder": CLIPTextModel, "tokenizer": None,
                                   "text_encoder_2": T5EncoderModel, "tokenizer_2": None})
        return FluxTextEncoder(c["text_encoder"], c["tokenizer"], c["text_encoder_2"], c["tokenizer_2"],
                               cfg.model.max_sequence_length)
    if family == "qwen_image":
        from transformers import Qwen2_5_VLForConditionalGeneration

        c = _load_components(cfg, {"text_encoder": Qwen2_5_VLForConditionalGeneration, "tokenizer": None})
        return QwenImageTextEncoder(c["text_encoder"], c["tokenizer"], cfg.model.max_sequence_length)
    if family == "dit":
        return encode_class_labels
    raise ValueError(f"model.family={family!r}: no prompt encoder")
