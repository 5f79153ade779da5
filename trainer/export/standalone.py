"""The standalone half of `piflow export`: beside `student/` (this project's format), write the components and
the code that let `diffusers.DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)` load the student
in a process that has diffusers but not this project:

    model_index.json        {"_class_name": ["pipeline_piflow", "PiFlowPipeline"], components..., "piflow": {...}}
    pipeline_piflow.py      the sampler (models/standalone/pipeline_piflow.py: torch + diffusers only)
    transformer/            the student's trunk as a plain diffusers transformer: LoRA merged into the base
                            weights, the trained output norm in place (the teacher's proj_out kept, unused)
    policy_head/            the GM head (policy_head.py + config.json + safetensors)
    text_encoder*/ tokenizer*/ vae/   copied from a local base or the tiny build; a hub base is referenced by id
                            (loaded on first use) unless `--self-contained` copies it
    lora/                   LoRA students: pytorch_lora_weights.safetensors (diffusers/PEFT naming,
                            `transformer.<module>.lora_{A,B}.weight`) and policy_head.safetensors
    README.md               the model card (base model, licence, pi-Flow settings, steps, eval table)

Families: FLUX-architecture (flux, digits), Qwen-Image, DiT (its FM-DiT class ships as `transformer/dit_fm.py`)
and Wan (clips: a list of frames per sample) with a GM head.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)
STANDALONE_FAMILIES = ("flux", "digits", "qwen_image", "dit", "wan")
LICENCES = {
    "black-forest-labs/FLUX.1-dev": ("flux-1-dev-non-commercial-license", "FLUX.1 [dev] Non-Commercial License "
                                     "(inherited from the base model: non-commercial use only)"),
    "Qwen/Qwen-Image": ("apache-2.0", "Apache 2.0 (inherited from Qwen-Image)"),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": ("apache-2.0", "Apache 2.0 (inherited from Wan 2.1)"),
}
DIT_VAE = "stabilityai/sd-vae-ft-ema"
SOURCE = Path(__file__).resolve().parents[2] / "models" / "standalone"


def merged_transformer_state(student) -> dict[str, torch.Tensor]:
    """The trunk's tensors as a plain transformer's: W + scaling * B @ A for every LoRA layer, `base_layer`
    names restored, the kept output norm (trained copy) and the teacher's proj_out put back. Tensors that need no
    merge are the trunk's own (no copy: a 12B base is not duplicated)."""
    tr = student.transformer
    state = {}
    lora_layers = {name: m for name, m in tr.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    for key, value in tr.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach()
    for name, m in lora_layers.items():
        for adapter in m.lora_A:
            a, b = m.lora_A[adapter].weight.float(), m.lora_B[adapter].weight.float()
            w = state[f"{name}.weight"]
            state[f"{name}.weight"] = (w.float() + m.scaling[adapter] * (b @ a)).to(w.dtype)
    for name in student.family.output_modules:  # trained copies where the student keeps one, else the teacher's
        key = name.replace(".", "_")
        module = student.tail[key] if key in student.tail else student.teacher_tail[key]
        for k, v in module.state_dict().items():
            state[f"{name}.{k}"] = v.detach()
    return state


def plain_transformer(student, dtype: torch.dtype):
    """The student's trunk as a plain diffusers transformer in `dtype` (the recipe's: `weights_dtype`), built on
    the meta device and given the merged tensors themselves (`assign`), so writing a 12B bf16 base neither
    materialises a float32 model (47.6 GB, ~100 GB of RAM before) nor copies the base."""
    tr = student.transformer
    with torch.device("meta"):
        clean = type(tr).from_config(dict(tr.config))
    state = {k: v if v.dtype == dtype or not v.is_floating_point() else v.to(dtype)
             for k, v in merged_transformer_state(student).items()}
    clean.load_state_dict(state, strict=True, assign=True)
    own = dict(tr.named_buffers())
    for name, buf in list(clean.named_buffers()):  # non-persistent buffers (not in a state dict): the trunk's
        if buf.is_meta:
            parent, _, leaf = name.rpartition(".")
            clean.get_submodule(parent).register_buffer(leaf, own[name], persistent=False)
    return clean


def lora_state(student) -> dict[str, torch.Tensor]:
    """The adapters in diffusers' LoRA naming: `transformer.<module>.lora_A.weight` / `.lora_B.weight`."""
    out = {}
    for key, value in student.transformer.state_dict().items():
        if ".lora_A." in key or ".lora_B." in key:
            module, kind = key.split(".lora_")
            out[f"transformer.{module}.lora_{kind.split('.')[0]}.weight"] = value.detach().contiguous()
    return out


def _class_of(component_dir: Path, default: list[str]) -> list[str]:
    """[library, class] of a saved transformers component (tokenizers name their class in their config)."""
    cfg = component_dir / "tokenizer_config.json"
    if cfg.exists():
        cls = json.loads(cfg.read_text()).get("tokenizer_class") or "PreTrainedTokenizerFast"
        return ["transformers", cls]
    cfg = component_dir / "config.json"
    if cfg.exists():
        archs = json.loads(cfg.read_text()).get("architectures") or []
        if archs:
            return ["transformers", archs[0]]
    return default


def write_base_components(cfg, out: Path, self_contained: bool) -> tuple[dict, dict]:
    """Text encoders, tokenizers and the VAE: copied (local or tiny base, or --self-contained) or referenced."""
    from models.text_encoders import save_tiny_text_encoders

    defaults = {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
                "vae": ["diffusers", "AutoencoderKL"]}
    names = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    if cfg.model.family == "dit":  # class ids are the prompts: no text encoder
        names = []
    if cfg.model.family == "wan":
        defaults.update(text_encoder=["transformers", "UMT5EncoderModel"], tokenizer=["transformers", "T5TokenizerFast"],
                        vae=["diffusers", "AutoencoderKLWan"])
        names = ["text_encoder", "tokenizer"]
    if cfg.model.family == "qwen_image":
        defaults.update(text_encoder=["transformers", "Qwen2_5_VLForConditionalGeneration"],
                        tokenizer=["transformers", "Qwen2Tokenizer"], vae=["diffusers", "AutoencoderKLQwenImage"])
        names = ["text_encoder", "tokenizer"]
    uses_vae = cfg.model.family != "digits" and (not cfg.model.tiny or cfg.model.family == "wan")
    if uses_vae:
        names.append("vae")
    index, references = {}, {}
    if cfg.model.tiny and cfg.model.family == "wan":  # the family builds its tiny UMT5 and VAE itself
        from models.families import get_family

        encoder = get_family("wan").load_text_encoder(cfg)
        encoder.model.save_pretrained(out / "text_encoder")
        encoder.tok.save_pretrained(out / "tokenizer")
        get_family("wan").load_vae(cfg).save_pretrained(out / "vae")
    elif cfg.model.tiny and names:
        save_tiny_text_encoders(cfg.model.family, out, cfg.run.seed)
    for name in names:
        root = cfg.model.pretrained if name == "vae" else (cfg.model.text_encoder or cfg.model.pretrained)
        if not (out / name).exists() and root and Path(root, name).is_dir():
            shutil.copytree(Path(root, name), out / name)
        elif not (out / name).exists() and root and self_contained:
            import importlib

            library, cls = defaults[name]
            getattr(importlib.import_module(library), cls).from_pretrained(root, subfolder=name).save_pretrained(
                out / name)
        if (out / name).exists():
            index[name] = defaults[name] if name == "vae" else _class_of(out / name, defaults[name])
        elif name == "vae" and cfg.model.family == "dit":  # the ImageNet latents are SD-VAE ft-EMA's
            references[name] = ["diffusers", "AutoencoderKL", DIT_VAE, None]
        elif root and Path(root).is_dir():  # a local base without this part: a reference could never load
            print(f"export: {root} has no {name}/; the export lacks it (add it to the export dir before sampling)")
        elif root:
            references[name] = [*defaults[name], root, name]
        else:
            raise ValueError(f"export: no {name} for family {cfg.model.family!r} (set model.pretrained)")
    return index, references


def model_card(cfg, step: int, kind: str, standalone: bool, eval_table: Optional[str]) -> str:
    base = cfg.model.pretrained or f"tiny random {cfg.model.family} (model.tiny, seed {cfg.run.seed})"
    licence_id, licence = LICENCES.get(cfg.model.pretrained, ("other", "the base model's licence applies"))
    if cfg.model.family == "digits":
        licence_id, licence = "other", "the project's own toy teacher (trained on scikit-learn's digits)"
    d, p = cfg.distill, cfg.policy
    usage = ("```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
             "pipe = DiffusionPipeline.from_pretrained(\"PATH_OR_REPO\", trust_remote_code=True)\n"
             f"image = pipe(\"{(cfg.eval.prompts or ['a photo of a cat'])[0]}\", num_inference_steps={d.nfe}, "
             "generator=torch.Generator().manual_seed(0)).images[0]\n```\n") if standalone else \
        ("This family's export loads with the piflow project (`piflow sample DIR`); the standalone diffusers "
         "pipeline is written for the FLUX-architecture families, Qwen-Image and DiT so far.\n")
    lines = [
        "---", f"base_model: {cfg.model.pretrained or 'none'}", f"license: {licence_id}", "library_name: diffusers",
        "tags: [pi-flow, few-step, distillation]", "---", "",
        f"# pi-Flow student of {base}", "",
        f"A {d.nfe}-step pi-Flow student (policy-based imitation distillation, arXiv 2510.14974) of **{base}**, "
        f"exported by piflow at training step {step} (EMA weights, {kind} export).", "",
        f"**Licence:** {licence}.", "", "## Usage", "", usage,
        "## pi-Flow settings", "", "| setting | value |", "| --- | --- |",
        f"| policy | {p.type.upper()}, K = {p.num_components} |" if p.type == "gm" else
        f"| policy | DX, N = {p.num_grid} |",
        f"| steps (NFE) | {d.nfe}, final step scale {d.final_step_scale} |",
        f"| time shift | {d.shift} |", f"| policy substeps | {d.total_substeps} |",
        f"| teacher guidance | {cfg.teacher.guidance.mode} {cfg.teacher.guidance.scale} |",
        f"| LoRA | {'rank %d, alpha %g' % (cfg.lora.rank, cfg.lora.alpha) if cfg.lora.enabled else 'none (full)'} |",
        f"| training steps | {step} of {cfg.train.iters} (batch {cfg.train.batch_size}, lr {cfg.optim.lr}) |", "",
        "## Evaluation", "", eval_table or "No evaluation table was recorded with this run.", "",
    ]
    return "\n".join(lines)


def find_eval_table(cfg) -> Optional[str]:
    """An evaluation table the run left (`eval_table.md` in run.output, or the demo's `demo_table.md` beside it)."""
    if "://" in cfg.run.output:
        return None
    root = Path(cfg.run.output)
    for path in (root / "eval_table.md", root.parent / "demo_table.md"):
        if path.is_file():
            return path.read_text().strip()
    return None


def write_standalone(model, cfg, out_dir: str | Path, step: int, self_contained: bool = False,
                     eval_table: Optional[str] = None) -> bool:
    """Write the standalone pipeline beside `student/`. Returns False (and writes only the card) for families
    the standalone pipeline does not cover."""
    from diffusers import __version__

    out = Path(out_dir)
    student = model.student
    kind = model.config.kind
    ok = cfg.model.family in STANDALONE_FAMILIES and cfg.policy.type == "gm"
    if ok:
        import importlib.util

        spec = importlib.util.spec_from_file_location("piflow_standalone_policy_head", SOURCE / "policy_head.py")
        head_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(head_module)
        from models.families.base import weights_dtype

        tr = student.transformer
        plain_transformer(student, weights_dtype(cfg)).save_pretrained(out / "transformer")
        transformer_entry = ["diffusers", type(tr).__name__]
        if cfg.model.family == "dit" and type(tr).__name__ == "FlowDiTTransformer2DModel":  # our class: ship it
            shutil.copy(SOURCE.parent / "families" / "dit_fm.py", out / "transformer" / "dit_fm.py")
            transformer_entry = ["dit_fm", "FlowDiTTransformer2DModel"]
        h = student.head
        head = head_module.PiFlowGMHead(hidden_dim=h.proj_out_means.in_features, out_dim=h.out_dim,
                                        num_components=h.num_components, patch_pixels=h.patch_pixels,
                                        cond_dim=h.proj_out_logstds[1].in_features,
                                        logstd_inner_dim=h.proj_out_logstds[1].out_features)
        head.load_state_dict(h.state_dict(), strict=True)
        head.save_pretrained(out / "policy_head")
        shutil.copy(SOURCE / "policy_head.py", out / "policy_head" / "policy_head.py")
        shutil.copy(SOURCE / "pipeline_piflow.py", out / "pipeline_piflow.py")
        components, references = write_base_components(cfg, out, self_contained)
        vae_scale = 1
        if cfg.model.family == "dit":
            vae_scale = 8  # SD-VAE
        elif "vae" in components or "vae" in references:  # the hub's vae config: a small download
            from diffusers import AutoencoderKL

            vae_cfg = AutoencoderKL.load_config(str(out) if "vae" in components else cfg.model.pretrained,
                                                subfolder="vae")
            if "dim_mult" in vae_cfg:  # Wan: one 2x per level after the first
                vae_scale = 2 ** (len(vae_cfg["dim_mult"]) - 1)
            elif "temperal_downsample" in vae_cfg:
                vae_scale = 2 ** len(vae_cfg["temperal_downsample"])
            else:
                vae_scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        elif cfg.model.family != "digits":
            vae_scale = 8  # no VAE in the base: sizes in pixels as for the released 8x VAEs
        piflow = {"family": cfg.model.family, "latent_channels": cfg.model.latent_channels,
                  "latent_size": cfg.model.latent_size, "latent_width": cfg.model.latent_width,
                  "latent_frames": cfg.model.latent_frames, "vae_scale_factor": vae_scale,
                  "num_timesteps": cfg.model.num_timesteps, "max_sequence_length": cfg.model.max_sequence_length,
                  "guidance": cfg.teacher.guidance.scale if cfg.teacher.guidance.mode == "embedded" else None,
                  "nfe": cfg.distill.nfe, "final_step_scale": cfg.distill.final_step_scale,
                  "shift": cfg.distill.shift, "total_substeps": cfg.distill.total_substeps, "eps": cfg.policy.eps,
                  "base_model": cfg.model.pretrained, "base_components": references, "training_step": step}
        if cfg.model.family == "qwen_image":
            from models.text_encoders import QWEN_TEMPLATE, QWEN_TEMPLATE_DROP, QWEN_TOKENIZER_MAX

            piflow.update(prompt_template=QWEN_TEMPLATE, template_drop=QWEN_TEMPLATE_DROP,
                          tokenizer_max=QWEN_TOKENIZER_MAX)
        index = {"_class_name": ["pipeline_piflow", "PiFlowPipeline"], "_diffusers_version": __version__,
                 "transformer": transformer_entry, "policy_head": ["policy_head", "PiFlowGMHead"],
                 **components, "piflow": piflow}
        (out / "model_index.json").write_text(json.dumps(index, indent=1))
        if kind == "lora":
            from safetensors.torch import save_file

            (out / "lora").mkdir(exist_ok=True)
            meta = {"format": "diffusers-lora", "rank": str(cfg.lora.rank), "alpha": str(cfg.lora.alpha),
                    "target_modules": json.dumps(cfg.lora.target_modules), "base_model": cfg.model.pretrained}
            save_file(lora_state(student), str(out / "lora" / "pytorch_lora_weights.safetensors"), metadata=meta)
            save_file({k: v.detach().contiguous() for k, v in h.state_dict().items()},
                      str(out / "lora" / "policy_head.safetensors"), metadata={"format": "piflow-gm-head"})
    else:
        log.warning("export: the standalone diffusers pipeline covers %s with a GM head; %s/%s keeps the piflow "
                    "format (student/) only", ", ".join(STANDALONE_FAMILIES), cfg.model.family, cfg.policy.type)
    (out / "README.md").write_text(model_card(cfg, step, kind, ok, eval_table or find_eval_table(cfg)))
    return ok
