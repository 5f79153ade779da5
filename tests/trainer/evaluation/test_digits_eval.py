import numpy as np
import pytest
import torch

from data_pipeline.digits import label_for, load_digits_split, prompt_for
from trainer.evaluation.digits import evaluate_digits, frechet_distance, mean_pairwise_distance, train_classifier


def test_split_is_disjoint_stratified_and_scaled():
    train, test = load_digits_split("train"), load_digits_split("test")
    assert len(train.labels) + len(test.labels) == 1797
    assert train.images.min() >= -1 and train.images.max() <= 1
    fractions = torch.bincount(test.labels, minlength=10).float() / torch.bincount(
        torch.cat([train.labels, test.labels]), minlength=10)
    assert torch.allclose(fractions, torch.full((10,), 0.2), atol=0.01)
    train_set = {tuple(x.flatten().tolist()) for x in train.images}
    overlap = sum(tuple(x.flatten().tolist()) in train_set for x in test.images)
    assert overlap <= 3  # the raw data holds a few exact duplicates


def test_prompt_roundtrip_and_bad_prompt():
    assert all(label_for(prompt_for(c)) == c for c in range(10))
    with pytest.raises(ValueError, match="names no digit"):
        label_for("a cat")


def test_frechet_distance_matches_gaussian_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200000, 2))
    b = rng.normal(size=(200000, 2)) * 2.0 + np.array([1.0, 0.0])
    # N(0, I) vs N((1,0), 4I): |dmu|^2 + tr(I + 4I - 2*2I) = 1 + 2
    assert frechet_distance(a, b) == pytest.approx(3.0, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_mean_pairwise_distance_brute_force():
    x = torch.randn(7, 1, 8, 8)
    brute = np.mean([float((x[i].double() - x[j].double()).norm()) for i in range(7) for j in range(7) if i != j])
    assert mean_pairwise_distance(x) == pytest.approx(brute, rel=1e-9)


def test_classifier_scores_real_digits_high_and_noise_low():
    clf, acc = train_classifier(epochs=200)
    assert acc > 0.93
    test = load_digits_split("test")
    real = evaluate_digits(clf, test.images, test.labels)
    assert real["prompt_accuracy"] == pytest.approx(acc)
    assert real["frechet_distance"] < 1.0 and real["diversity"] == pytest.approx(1.0)
    noise = evaluate_digits(clf, torch.rand_like(test.images) * 2 - 1, test.labels)
    assert noise["prompt_accuracy"] < 0.3 and noise["frechet_distance"] > 10 * max(real["frechet_distance"], 0.05)


def test_demo_grids_label_every_row_with_its_method(tmp_path):
    """The demo's grids carry a label strip naming each row's method (the evaluation job's grid_png): the labels
    are the table's methods in order, each strip holds text as wide as its name, and the tiles are the images."""
    from PIL import Image, ImageDraw

    from cluster.demo import DEFAULT_CONFIG
    from trainer.config import load_config
    from trainer.evaluation.digits import REAL_ROW, evaluate_demo

    cfg = load_config(DEFAULT_CONFIG)
    report = evaluate_demo(cfg, None, tmp_path, samples_per_digit=2)  # the teacher rows only (no export needed)
    methods = [r["method"] for r in report["rows"]]
    assert methods == ["teacher 32-step", "teacher 4-step"]
    assert report["grid_labels"] == [REAL_ROW, *methods]

    tile, label_width, n_tiles = 40, 170, 12  # the real row shows 12 digits, the method rows 2 each
    img = Image.open(tmp_path / "grids" / "seven.png").convert("L")
    assert img.size == (label_width + n_tiles * (tile + 2), 3 * (tile + 2))
    a = np.asarray(img).astype(int)
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    for i, name in enumerate(report["grid_labels"]):
        strip = a[i * (tile + 2): i * (tile + 2) + tile, :label_width]
        ink = np.nonzero((strip < 128).any(axis=0))[0]
        assert len(ink) > 0, f"row {i} ({name}) has no label"
        # the text starts at x = 4 and is as wide as this row's name (the three names differ in width)
        assert ink[0] >= 4 and abs((ink[-1] + 1) - (4 + measure.textlength(name))) <= 2, (name, ink[0], ink[-1])
    # the real row's first tile is the first held-out seven, upscaled nearest (pixel centres of its 8x8 cells)
    real = load_digits_split("test")
    seven = ((real.images[real.labels == 7][0, 0] + 1) * 127.5).round().numpy()
    centres = a[0:tile, label_width:label_width + tile][tile // 16::tile // 8, tile // 16::tile // 8]
    assert np.abs(centres - seven).max() <= 1
