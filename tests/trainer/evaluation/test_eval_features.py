"""The feature networks of `piflow eval` for text-to-image (a CLIPModel: CLIP score, diversity, FID) and
class-conditional DiT (an image classifier: IS, precision/recall, class accuracy), as tiny randomly initialised
transformers models saved to a directory and loaded by path, as a hub id would be."""
from __future__ import annotations

import pytest
import torch

from trainer.evaluation.features import ClassifierFeatures, ClipFeatures
from trainer.evaluation.metrics import clip_score
from trainer.evaluation.report import score


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from models.text_encoders import tiny_tokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=32),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    d = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).eval().save_pretrained(d)
    tiny_tokenizer(32).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32,
                    patch_size=8, num_labels=10)
    d = tmp_path_factory.mktemp("vit")
    ViTForImageClassification(cfg).eval().save_pretrained(d)
    return str(d)


def test_clip_features_and_score_match_the_model(tiny_clip):
    net = ClipFeatures(tiny_clip)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 64, 64, generator=g)
    prompts = ["a red cat", "a blue dog", "a small house", "a photo"]
    got = net.alignment(images, prompts)["clip_score"]
    # independent path: the model's own forward (image_embeds / text_embeds are its projected features)
    from trainer.evaluation.features import CLIP_MEAN, CLIP_STD, _prep

    ids = net.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = net.model(input_ids=ids.input_ids, attention_mask=ids.attention_mask,
                        pixel_values=_prep(images * 2 - 1, 32, CLIP_MEAN, CLIP_STD))
    assert got == pytest.approx(clip_score(out.image_embeds, out.text_embeds), rel=1e-5)
    rows = score(net, {"teacher 8-step": images, "student 2-step": images.flip(-1)}, prompts * 1, [0, 0, 1, 1],
                 "teacher 8-step")
    assert rows[1]["fid_vs_teacher"] > 0 and 0 <= rows[0]["diversity"] <= 2 and "clip_score" in rows[0]


def test_classifier_gives_is_precision_recall_and_class_accuracy(tiny_classifier):
    net = ClassifierFeatures(tiny_classifier)
    g = torch.Generator().manual_seed(1)
    real = torch.rand(40, 3, 32, 32, generator=g)
    fake = torch.rand(40, 3, 32, 32, generator=g)
    prompts = [str(i % 10) for i in range(40)]
    rows = score(net, {"teacher 8-step": real, "student 1-step": fake}, prompts, list(range(40)),
                 "teacher 8-step", reference_images=real)
    t, s = rows
    assert 1.0 <= s["inception_score"] <= 10.0
    assert t["precision"] == 1.0 and t["recall"] == 1.0 and t["fid_vs_reference"] == pytest.approx(0.0, abs=1e-6)
    assert 0 <= s["precision"] <= 1 and 0 <= s["recall"] <= 1 and s["fid_vs_reference"] > 0
    logits = net.model(pixel_values=(torch.nn.functional.interpolate(fake, size=(32, 32)) - 0.5) / 0.5).logits
    acc = float((logits.argmax(-1) == torch.tensor([int(p) for p in prompts])).float().mean())
    assert s["class_accuracy"] == pytest.approx(acc)
