"""Feature networks of `piflow eval`, chosen by family: images in [-1, 1] -> features (N, d).

- digits: the digit classifier of trainer/evaluation/digits.py (trained on real digits in seconds) gives the feature
  space (FID, diversity) and the prompt alignment (accuracy of the named digit).
- text-to-image (flux, qwen_image): a transformers CLIPModel (`--clip`: a hub id or dir, resolved like a teacher)
  gives image features (FID, diversity) and the CLIP score.
- class-conditional (dit): an image classifier (`--classifier`: transformers AutoModelForImageClassification)
  gives logits (IS, class accuracy) and its pooled features (FID, precision/recall).
Tests use tiny randomly initialised CLIP / classifier models saved to a directory.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _prep(x: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """[-1, 1] images -> resized, 3-channel, normalised model inputs."""
    x = (x.float() + 1) / 2
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


class DigitsFeatures(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        from trainer.evaluation.digits import train_classifier

        self.clf, self.clf_accuracy = train_classifier(seed=seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf.features(x)

    @torch.no_grad()
    def alignment(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        from data_pipeline.digits import label_for

        labels = torch.tensor([label_for(p) for p in prompts])
        return {"prompt_accuracy": float((self.clf(images * 2 - 1).argmax(1) == labels).float().mean())}


class ClipFeatures(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(name).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.size = self.model.config.vision_config.image_size

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=_prep(x, self.size, CLIP_MEAN, CLIP_STD))
        return getattr(out, "pooler_output", out)

    @torch.no_grad()
    def alignment(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        from trainer.evaluation.metrics import clip_score

        ids = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        text = self.model.get_text_features(**ids)
        text = getattr(text, "pooler_output", text)
        return {"clip_score": clip_score(self(images * 2 - 1), text)}


class ClassifierFeatures(nn.Module):
    """Pooled last hidden state (features) and logits of a transformers image classifier."""

    def __init__(self, name: str):
        super().__init__()
        from transformers import AutoModelForImageClassification

        self.model = AutoModelForImageClassification.from_pretrained(name).eval()
        self.size = getattr(self.model.config, "image_size", 224)

    @torch.no_grad()
    def _out(self, x: torch.Tensor):
        return self.model(pixel_values=_prep(x, self.size, (0.5,) * 3, (0.5,) * 3), output_hidden_states=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._out(x).hidden_states[-1].float().mean(1)

    def logits(self) -> nn.Module:
        parent = self

        class Logits(nn.Module):
            def forward(self, x):
                return parent._out(x).logits.float()

        return Logits()

    @torch.no_grad()
    def alignment(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        labels = torch.tensor([int(p) for p in prompts])
        pred = self._out(images * 2 - 1).logits.argmax(-1)
        return {"class_accuracy": float((pred == labels).float().mean())}


def feature_net(family: str, clip: str = "", classifier: str = "") -> nn.Module:
    if family == "digits":
        return DigitsFeatures()
    if family in ("flux", "qwen_image"):
        if not clip:
            raise ValueError("piflow eval: text-to-image families need --clip (a CLIP hub id or directory)")
        return ClipFeatures(clip)
    if family == "dit":
        if not classifier:
            raise ValueError("piflow eval: the dit family needs --classifier (an image classifier hub id or dir)")
        return ClassifierFeatures(classifier)
    raise ValueError(f"piflow eval: no evaluation features for family {family!r}")


def optional_logits(net: nn.Module) -> Optional[nn.Module]:
    return net.logits() if isinstance(net, ClassifierFeatures) else None
