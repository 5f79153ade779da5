import numpy as np
import pytest
import torch

from data_pipeline.digits import label_for, load_digits_split, prompt_for
from trainer.digits_eval import evaluate_digits, frechet_distance, mean_pairwise_distance, train_classifier


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
