"""Scores and outputs of `piflow eval`: per method (teacher many-step, teacher few-step Euler, student few-step)
FID against the teacher's many-step images (and against a reference set when given), the prompt alignment
(CLIP score / digit accuracy / class accuracy), within-prompt diversity, and for classifiers IS and
precision/recall; written to OUT/results.json, OUT/table.md and OUT/grids/NNN.png (one grid per prompt, one
labelled row per method), and logged through trainer/metrics.py (wandb when the run's config enables it)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from trainer.evaluation import metrics as M
from trainer.evaluation.features import optional_logits


def score(net, images: dict[str, torch.Tensor], prompts: list[str], groups: list[int], reference_name: str,
          reference_images: Optional[torch.Tensor] = None, reference_stats: Optional[tuple] = None) -> list[dict]:
    """images: method -> (N, C, H, W) in [0, 1], row i generated for prompts[i] (prompt index groups[i])."""
    logits = optional_logits(net)
    ref_feats = M.FloatFeatures(net)(reference_images) if reference_images is not None else None
    rows = []
    for method, x in images.items():
        feats = M.FloatFeatures(net)(x)
        row: dict[str, Any] = {"method": method, "n": len(x)}
        if method != reference_name:
            row["fid_vs_teacher"] = M.fid(net, images[reference_name], x)  # vs the many-step teacher
        if reference_images is not None:
            row["fid_vs_reference"] = M.fid(net, reference_images, x)
            row["precision"], row["recall"] = M.precision_recall(ref_feats, feats)
        if reference_stats is not None:
            mu, sigma = M.feature_stats(net, x)
            row["fid_vs_reference_stats"] = M.frechet_from_stats(mu, sigma, *reference_stats)
        row.update(net.alignment(x, prompts))
        row["diversity"] = M.within_prompt_diversity(feats, groups)
        if logits is not None:
            row["inception_score"] = M.inception_score(logits, x)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k not in ("method", "n")]
    for r in rows[1:]:
        keys += [k for k in r if k not in keys and k not in ("method", "n")]
    lines = ["| method | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 1) + "|"]
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_png(rows: dict[str, torch.Tensor], path: Path, tile: int = 64, label_width: int = 170) -> None:
    """One labelled row per method: rows name -> (S, C, H, W) images in [0, 1] (the seeds of one prompt)."""
    from PIL import Image, ImageDraw

    n = max(len(v) for v in rows.values())
    canvas = Image.new("RGB", (label_width + n * (tile + 2), len(rows) * (tile + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (name, imgs) in enumerate(rows.items()):
        y = i * (tile + 2)
        draw.text((4, y + tile // 2 - 6), name, fill=(0, 0, 0))
        for j, img in enumerate(imgs):
            arr = (img.clamp(0, 1) * 255).round().to(torch.uint8)
            arr = arr.expand(3, -1, -1) if arr.shape[0] == 1 else arr
            tile_img = Image.fromarray(arr.permute(1, 2, 0).numpy()).resize((tile, tile), Image.NEAREST)
            canvas.paste(tile_img, (label_width + j * (tile + 2), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def write_outputs(out: Path, rows: list[dict], images: dict[str, torch.Tensor], prompt_list: list[str],
                  groups: list[int], info: dict, cfg=None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    g = np.asarray(groups)
    grids = []
    for p, prompt in enumerate(prompt_list):
        path = out / "grids" / f"{p:03d}-{slug(prompt)}.png"
        grid_png({name: x[g == p] for name, x in images.items()}, path)
        grids.append(str(path))
    result = {**info, "rows": rows, "table": table, "grids": grids}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(table + "\n")
    if cfg is not None:
        from trainer.metrics import MetricsLogger

        logger = MetricsLogger(cfg, out, console_every=0)
        values = {f"eval_job/{slug(r['method'])}/{k}": v for r in rows for k, v in r.items()
                  if isinstance(v, float)}
        logger.log(int(info.get("step", 0)), values)
        logger.close()
    return result
