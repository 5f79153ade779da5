"""Evaluation of digit generators: a classifier trained on real digits (train split), prompt accuracy,
Frechet distance in the classifier's feature space against held-out real digits, and within-prompt diversity.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from data_pipeline.digits import load_digits_split


class DigitClassifier(nn.Module):
    def __init__(self, hidden: int = 128, feature_dim: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, feature_dim),
                                   nn.GELU())
        self.out = nn.Linear(feature_dim, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:  # (N, 1, 8, 8) -> (N, feature_dim)
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(images))


def train_classifier(seed: int = 0, epochs: int = 300) -> tuple[DigitClassifier, float]:
    """Full-batch AdamW with light noise augmentation; returns (classifier, held-out accuracy)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train, test = load_digits_split("train"), load_digits_split("test")
    clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(epochs):
        x = train.images + 0.1 * torch.randn(train.images.shape, generator=g)
        loss = nn.functional.cross_entropy(clf(x), train.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(test.images).argmax(1) == test.labels).float().mean().item()
    return clf, acc


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}), in float64."""
    from scipy import linalg

    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * covmean))


def mean_pairwise_distance(images: torch.Tensor) -> float:
    flat = images.reshape(len(images), -1).double()
    d = torch.cdist(flat, flat)
    n = len(flat)
    return float(d.sum() / (n * (n - 1)))


def real_diversity(split: str = "test") -> float:
    """Mean over classes of the within-class mean pairwise distance of real digits."""
    real = load_digits_split(split)
    return float(np.mean([mean_pairwise_distance(real.images[real.labels == c]) for c in range(10)]))


@torch.no_grad()
def evaluate_digits(clf: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """images (N, 1, 8, 8) in [-1, 1] generated for prompts of digit `labels` (N,)."""
    images = images.float().clamp(-1, 1)
    test = load_digits_split("test")
    accuracy = (clf(images).argmax(1) == labels).float().mean().item()
    fd = frechet_distance(clf.features(images).numpy(), clf.features(test.images).numpy())
    per_class = [mean_pairwise_distance(images[labels == c]) for c in range(10) if int((labels == c).sum()) > 1]
    diversity = float(np.mean(per_class)) / real_diversity("test")
    return {"prompt_accuracy": accuracy, "frechet_distance": fd, "diversity": diversity}


# ----------------------------------------------------------------------------------------- the demo's table
# (who, steps): the teacher's Euler sampler, or a student exported by the demo (data-free / data-based pi-ID)
DEMO_METHODS = (("teacher", 32), ("teacher", 4), ("data-free", 4), ("data-free", 1), ("data-based", 4),
                ("data-based", 1))


REAL_ROW = "real (held-out)"


def demo_grid(rows: dict[str, torch.Tensor], path, tile: int = 40) -> list[str]:
    """One grid PNG, one row per entry of `rows` (name -> (N, 1, 8, 8) images in [-1, 1]), each row labelled
    with its name by the evaluation job's `grid_png` (trainer/evaluation/report.py). Returns the labels in order."""
    from pathlib import Path

    from trainer.evaluation.report import grid_png

    grid_png({name: (x.float().clamp(-1, 1) + 1) / 2 for name, x in rows.items()}, Path(path), tile=tile)
    return list(rows)


def evaluate_demo(cfg, export_dir, out_dir, samples_per_digit: int = 100, seed: int = 1234,
                  data_export_dir=None) -> dict:
    """Teacher (32 and 4 Euler steps) vs the exported students loaded through PiFlowPipeline (4 and 1 steps):
    data-free (`export_dir`) and data-based (`data_export_dir`, when given), on the same noise per sample;
    metrics at temperature 1 (fidelity), plus PNG grids per prompt. The bars hold for each student."""
    from pathlib import Path

    from data_pipeline import storage
    from data_pipeline.digits import DIGIT_WORDS, prompt_for
    from models.families import get_family, load_text_encoder
    from models.pipeline import PiFlowPipeline
    from trainer.evaluation.generate import teacher_euler

    out_dir = Path(out_dir)
    (out_dir / "grids").mkdir(parents=True, exist_ok=True)
    clf, clf_acc = train_classifier(seed=0)
    labels = torch.arange(10).repeat_interleave(samples_per_digit)  # (N,)
    prompts = [prompt_for(int(c)) for c in labels]
    noise = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    teacher = get_family(cfg.model.family).build_teacher(cfg)
    cond = load_text_encoder(cfg)(prompts)
    pipes = {}
    if export_dir is not None:
        pipes["data-free"] = PiFlowPipeline.from_pretrained(str(export_dir))
    if data_export_dir is not None:
        pipes["data-based"] = PiFlowPipeline.from_pretrained(str(data_export_dir))

    images, rows = {}, []
    for who, steps in DEMO_METHODS:
        if who == "teacher":
            x = teacher_euler(teacher, noise, cond, steps, cfg.distill.shift)
            name = f"teacher {steps}-step"
        elif who in pipes:
            x = pipes[who](prompts, num_inference_steps=steps, latents=noise, temperature=1.0, output_type="latent")
            name = f"student {steps}-step ({who})"
        else:
            continue
        images[name] = x
        m = evaluate_digits(clf, x, labels)
        rows.append({"method": name, "nfe": steps, **m})
    base = rows[0]
    lines = ["| method | NFE | prompt accuracy | Frechet distance | diversity (vs real) |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['method']} | {r['nfe']} | {100 * r['prompt_accuracy']:.1f}% | {r['frechet_distance']:.2f} | "
              f"{r['diversity']:.3f} |" for r in rows]
    bars = {}
    for who in pipes:
        student4 = next(r for r in rows if r["method"] == f"student 4-step ({who})")
        prefix = "" if who == "data-free" else "data_based_"
        bars.update({
            f"{prefix}accuracy_within_3_points": 100 * (base["prompt_accuracy"] - student4["prompt_accuracy"]) <= 3.0,
            f"{prefix}frechet_at_most_1.5x_teacher": student4["frechet_distance"] <= 1.5 * base["frechet_distance"],
            f"{prefix}diversity_at_least_0.8x_teacher": student4["diversity"] >= 0.8 * base["diversity"],
        })
    outputs = {"table": str(out_dir / "demo_table.md"), "results": str(out_dir / "demo_results.json"),
               "grids": str(out_dir / "grids"), "export": str(export_dir or data_export_dir),
               "checkpoints": storage.join(cfg.run.output, "checkpoints"),
               "rollouts": storage.join(cfg.run.output, "rollouts"),
               "metrics": storage.join(cfg.run.output, "metrics.jsonl")}
    if data_export_dir is not None:  # the data-based run beside the data-free one (cluster/demo.py)
        outputs["export_data"] = str(data_export_dir)
        outputs["run_data"] = cfg.run.output.rstrip("/") + "_data"
    real = load_digits_split("test")
    for c in range(10):
        sel = labels == c
        grid_labels = demo_grid({REAL_ROW: real.images[real.labels == c][:12],
                                 **{name: images[name][sel][:12] for name in images}},
                                out_dir / "grids" / f"{DIGIT_WORDS[c]}.png")
    table = "\n".join(lines) + (f"\n\nrows of each grid in {outputs['grids']} (labelled): " +
                                 ", ".join(grid_labels) +
                                f"; classifier held-out accuracy {100 * clf_acc:.1f}%; "
                                f"{samples_per_digit} samples per digit, same noise for every method")
    (out_dir / "demo_table.md").write_text(table + "\n")
    return {"rows": rows, "bars": bars, "table": table, "classifier_accuracy": clf_acc, "outputs": outputs,
            "grid_labels": grid_labels}
