"""`piflow import`: synthetic state dicts in the released layouts (pi-FLUX.1 / pi-Qwen-Image adapters, ImageNet
GM-DiT with its patch-first proj_out_2) land in this project's student so that its GM outputs equal the reference
head's computation written here from the reference semantics; export back to the layout and import again are
exact; the import is an export dir `piflow sample` runs."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cluster.cli import main
from models.converters.released import to_gm_dit, to_pi_adapter
from models.families import get_family
from models.pipeline import PiFlowPipeline
from tests.recipes import FP32, IN_PROCESS, recipe_config, recipe_yaml
from trainer.config import load_config

C, S = 4, 8  # the ImageNet recipe's latent channels; its rehearsal latent size
C16 = 16  # FLUX / Qwen-Image latent channels
RECIPES = {"pi-flux": "flux", "pi-qwen": "qwen_image"}


def released_adapter(family: str, targets: list[str], K=6, rank=3, inner=24, seed=0) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped as a released pi-Flow adapter for the recipe's tiny base of `family`."""
    g = torch.Generator().manual_seed(seed)
    cfg = recipe_config(RECIPES[family])
    net = get_family(cfg.model.family).load_network(cfg)
    D = net.norm_out.linear.in_features
    sd = {}
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Linear) and "." in name and any(name.endswith("." + t) for t in targets):
            if cfg.model.family == "qwen_image" and name.startswith("transformer_blocks.1.txt_mlp"):
                continue  # the reference adapts nothing whose output is unused either
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.1
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.1
    F = 4 * C16
    sd.update({"transformer.proj_out_means.weight": torch.randn(K * F, D, generator=g) * 0.1,
               "transformer.proj_out_means.bias": torch.randn(K * F, generator=g) * 0.1,
               "transformer.proj_out_logweights.weight": torch.randn(K * 4, D, generator=g) * 0.1,
               "transformer.proj_out_logweights.bias": torch.randn(K * 4, generator=g),
               "transformer.proj_out_logstds.1.weight": torch.randn(inner, D, generator=g) * 0.1,
               "transformer.proj_out_logstds.1.bias": torch.randn(inner, generator=g) * 0.1,
               "transformer.proj_out_logstds.3.weight": torch.randn(1, inner, generator=g) * 0.1,
               "transformer.proj_out_logstds.3.bias": torch.full((1,), -2.0),
               "transformer.norm_out.linear.weight": torch.randn(2 * D, D, generator=g) * 0.1,
               "transformer.norm_out.linear.bias": torch.randn(2 * D, generator=g) * 0.1})
    return sd


def make_cond(family, B=2):
    g = torch.Generator().manual_seed(9)
    if family == "pi-flux":
        return {"prompt_embeds": torch.randn(B, 5, 32, generator=g), "pooled_prompt_embeds": torch.randn(B, 32, generator=g)}
    return {"prompt_embeds": torch.randn(B, 6, 32, generator=g), "prompt_embeds_mask": torch.ones(B, 6, dtype=torch.long)}


def unpack_2x2(t, H, W):  # the FLUX/Qwen token layout: feature c*4 + i*2 + j, tokens row-major
    B, T, F = t.shape
    return t.reshape(B, H // 2, W // 2, F // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, F // 4, H, W)


@pytest.mark.parametrize("kind", ["pi-flux", "pi-qwen"])
def test_pi_adapter_import_matches_the_reference_head_and_round_trips(kind, tmp_path):
    recipe = recipe_yaml(RECIPES[kind], tmp_path / "recipe.yaml")
    targets = load_config(recipe).lora.target_modules
    sd = released_adapter(kind, targets)
    src = tmp_path / "gm_adapter"
    src.mkdir()
    save_file(sd, str(src / "diffusion_pytorch_model.safetensors"))
    (src / "config.json").write_text(json.dumps({"_class_name": "GMFluxTransformer2DModel", "num_gaussians": 6}))
    out = tmp_path / "export"
    assert main(["import", kind, str(src), "--config", str(recipe), "--out", str(out)]) == 0

    pipe = PiFlowPipeline.from_pretrained(str(out))
    student = pipe.student.student.eval()
    assert student.head.num_components == 6 and pipe.student.cfg.lora.rank == 3
    # the reference head on the features it reads: means (B, T, K, 64) k-major, logweights (B, T, K, 4)
    captured = {}
    student.head.register_forward_hook(lambda m, a, o: captured.update(hidden=a[0], temb=a[1]))
    x, s, c = torch.randn(2, C16, S, S), torch.tensor([0.9, 0.4]), make_cond(kind)
    with torch.no_grad():
        means, logweights, logstd = student(x, s, c)
    h = captured["hidden"]
    B, T, _ = h.shape
    ref_means = (h @ sd["transformer.proj_out_means.weight"].T + sd["transformer.proj_out_means.bias"]).view(B, T, 6, 4 * C16)
    ref_logw = (h @ sd["transformer.proj_out_logweights.weight"].T + sd["transformer.proj_out_logweights.bias"]
                ).view(B, T, 6, 4).log_softmax(dim=2)
    for k in range(6):
        assert torch.allclose(means[:, k], unpack_2x2(ref_means[:, :, k], S, S), atol=1e-5)
        assert torch.allclose(logweights[:, k], unpack_2x2(ref_logw[:, :, k], S, S), atol=1e-5)
    t = torch.nn.functional.silu(captured["temb"])
    t = torch.nn.functional.silu(t @ sd["transformer.proj_out_logstds.1.weight"].T + sd["transformer.proj_out_logstds.1.bias"])
    assert torch.allclose(logstd, (t @ sd["transformer.proj_out_logstds.3.weight"].T).view(-1) - 2.0, atol=1e-5)

    back = to_pi_adapter(student)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)  # export in the layout: exact
    save_file(back, str(tmp_path / "again.safetensors"))
    assert main(["import", kind, str(tmp_path / "again.safetensors"), "--config", str(recipe),
                 "--out", str(tmp_path / "export2")]) == 0
    again = PiFlowPipeline.from_pretrained(str(tmp_path / "export2")).student.trained_state_dict()
    first = pipe.student.trained_state_dict()
    assert set(again) == set(first) and all(torch.equal(again[k], first[k]) for k in first)


def released_gm_dit(K=3, inner=20, seed=0) -> dict[str, torch.Tensor]:
    from models.families.dit_fm import FlowDiTTransformer2DModel

    torch.manual_seed(seed)
    trunk = FlowDiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=C,
                                      num_layers=2, sample_size=S, patch_size=2)
    sd = {k: v.clone() for k, v in trunk.state_dict().items() if not k.startswith("proj_out_2.")}
    for k, v in sd.items():
        sd[k] = v + 0.05 * torch.randn_like(v)  # not the seeded init: the import must carry the trunk
    g = torch.Generator().manual_seed(seed + 1)
    G, D = K * (C + 1), 16
    sd.update({"proj_out_2.weight": torch.randn(4 * G, D, generator=g) * 0.2,
               "proj_out_2.bias": torch.randn(4 * G, generator=g) * 0.2,
               "gm_out.logstd_layers.1.weight": torch.randn(inner, D, generator=g) * 0.1,
               "gm_out.logstd_layers.1.bias": torch.randn(inner, generator=g) * 0.1,
               "gm_out.logstd_layers.3.weight": torch.randn(1, inner, generator=g) * 0.1,
               "gm_out.logstd_layers.3.bias": torch.full((1,), -1.5)})
    return sd


@pytest.mark.slow
def test_gm_dit_import_permutes_patch_first_rows_to_component_first(tmp_path):
    sd = released_gm_dit()
    torch.save({"state_dict": {"diffusion_ema.denoising." + k: v for k, v in sd.items()}}, tmp_path / "gmdit.pth")
    recipe = recipe_yaml("dit", tmp_path / "recipe.yaml", *FP32)  # float32: the two samplers agree to 1e-4
    out = tmp_path / "export"
    assert main(["import", "gm-dit", str(tmp_path / "gmdit.pth"), "--config", str(recipe), "--out", str(out)]) == 0
    pipe = PiFlowPipeline.from_pretrained(str(out))
    student = pipe.student.student.eval()
    captured = {}
    student.head.register_forward_hook(lambda m, a, o: captured.update(hidden=a[0], temb=a[1]))
    x, s, y = torch.randn(2, C, S, S), torch.tensor([0.8, 0.3]), {"class_labels": torch.tensor([5, 1000])}
    with torch.no_grad():
        means, logweights, logstd = student(x, s, y)
    # the reference GMOutput2D: proj_out_2 -> (B, h, w, p, p, G) -> (B, G, H, W); split K*C means | K logits
    h = captured["hidden"]
    B, K, G = 2, 3, 3 * (C + 1)
    ref = (h @ sd["proj_out_2.weight"].T + sd["proj_out_2.bias"]).reshape(B, S // 2, S // 2, 2, 2, G)
    ref = ref.permute(0, 5, 1, 3, 2, 4).reshape(B, G, S, S)
    ref_means = ref[:, : K * C].reshape(B, K, C, S, S)
    ref_logw = ref[:, K * C:].reshape(B, K, 1, S, S).log_softmax(dim=1)
    assert torch.allclose(means, ref_means, atol=1e-5) and torch.allclose(logweights, ref_logw, atol=1e-5)
    t = torch.nn.functional.silu(captured["temb"])
    t = torch.nn.functional.silu(t @ sd["gm_out.logstd_layers.1.weight"].T + sd["gm_out.logstd_layers.1.bias"])
    assert torch.allclose(logstd, (t @ sd["gm_out.logstd_layers.3.weight"].T).view(-1) - 1.5, atol=1e-5)
    # the trunk is the checkpoint's, and back in the layout it is exact
    back = to_gm_dit(student, C, 2)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # sampleable: piflow sample on the import
    assert main(["sample", str(out), "--prompt", "207", "--nfe", "1", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.pt").exists() and torch.isfinite(torch.load(tmp_path / "s.pt", weights_only=True)).all()
    # and with diffusers alone (the FM-DiT class ships inside the export)
    from tests.trainer.export.test_export_standalone import run_diffusers_only

    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["dit_fm", "FlowDiTTransformer2DModel"]
    gens = [torch.Generator().manual_seed(100 + i) for i in range(4)]
    expected = pipe(prompt=["207", "3"], num_images=2, num_inference_steps=4, generator=gens, output_type="latent")
    info = run_diffusers_only(out, tmp_path, ["207", "3"], "latent-only")
    assert info["project_imported"] == [] and info["modules"] == ["policy_head", "transformer", "vae"]
    got = torch.load(tmp_path / "standalone.pt", weights_only=True)
    assert got.shape == expected.shape and (got - expected).abs().max() < 1e-4, (got - expected).abs().max()


def test_layout_mismatches_are_refused_with_one_line(tmp_path, capsys):
    recipe = recipe_yaml("flux", tmp_path / "recipe.yaml")
    sd = released_adapter("pi-flux", load_config(recipe).lora.target_modules)
    sd["transformer.proj_out_means.weight"] = sd["transformer.proj_out_means.weight"][:-3]
    save_file(sd, str(tmp_path / "bad.safetensors"))
    assert main(["import", "pi-flux", str(tmp_path / "bad.safetensors"), "--config", str(recipe),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "proj_out_means" in err and "bad.safetensors" in err
    assert main(["import", "gm-dit", str(tmp_path / "bad.safetensors"), "--config", str(recipe),
                 "--out", str(tmp_path / "o2")]) == 2  # a flux config for a GM-DiT


def test_an_imported_student_starts_a_continued_distillation(tmp_path, capsys):
    """model.init_student: the rank program's student starts from the import's tensors (and trains on)."""
    from trainer.rank_program import build_rank

    recipe = recipe_yaml("flux", tmp_path / "recipe.yaml", *IN_PROCESS)
    cfg0 = load_config(recipe)
    p = cfg0.policy  # the recipe's K, LoRA rank (alpha = rank: scale 1, as the released adapters) and head width
    sd = released_adapter("pi-flux", cfg0.lora.target_modules, K=p.num_components, rank=cfg0.lora.rank,
                          inner=p.logstd_inner_dim)
    save_file(sd, str(tmp_path / "a.safetensors"))
    assert main(["import", "pi-flux", str(tmp_path / "a.safetensors"), "--config", str(recipe),
                 "--out", str(tmp_path / "imp")]) == 0
    cfg = load_config(recipe, [f"model.init_student={tmp_path / 'imp'}", f"run.output={tmp_path / 'run'}"])
    setup = build_rank(cfg)
    trained = {n: p for n, p in setup.student.named_parameters() if p.requires_grad}
    imported = PiFlowPipeline.from_pretrained(str(tmp_path / "imp")).student.trained_state_dict()
    assert set(trained) == set(imported) and all(torch.equal(trained[n].detach(), imported[n]) for n in trained)
    bad = load_config(recipe, [f"model.init_student={tmp_path / 'imp'}", "policy.num_components=4"])
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="policy.num_components=8"):
        build_rank(bad)


@pytest.mark.slow
def test_imported_pi_qwen_samples_with_diffusers_alone(tmp_path):
    """A released pi-Qwen-Image adapter, imported, loads with diffusers alone and samples the latents this
    project's pipeline samples for the same generators."""
    from tests.trainer.export.test_export_standalone import run_diffusers_only

    recipe = recipe_yaml("qwen_image", tmp_path / "recipe.yaml", *FP32)  # float32: the two samplers agree to 1e-4
    save_file(released_adapter("pi-qwen", load_config(recipe).lora.target_modules), str(tmp_path / "q.safetensors"))
    out = tmp_path / "export"
    assert main(["import", "pi-qwen", str(tmp_path / "q.safetensors"), "--config", str(recipe), "--out", str(out)]) == 0
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == ["pipeline_piflow", "PiFlowPipeline"]
    prompts = ["a red cat", "a small blue dog"]
    pipe = PiFlowPipeline.from_pretrained(str(out))
    gens = [torch.Generator().manual_seed(100 + i) for i in range(4)]
    expected = pipe(prompt=prompts, num_images=2, num_inference_steps=4, generator=gens, output_type="latent")
    info = run_diffusers_only(out, tmp_path, prompts, "latent-only")
    assert info["project_imported"] == [] and info["modules"] == ["policy_head", "text_encoder", "transformer",
                                                                  "vae"]  # the base model's VAE travels along
    got = torch.load(tmp_path / "standalone.pt", weights_only=True)
    assert got.shape == expected.shape and (got - expected).abs().max() < 1e-4, (got - expected).abs().max()


def test_adapter_key_spellings_normalise_to_module_names():
    from models.converters.released import lora_targets, strip_prefix

    t = torch.zeros(1)
    sd = strip_prefix({"base_model.model.transformer_blocks.0.ff.net.2.lora_A.default.weight": t,
                       "transformer.single_transformer_blocks.3.proj_mlp.lora_B.weight": t,
                       "transformer.proj_out_means.weight": t})
    assert set(sd) == {"transformer_blocks.0.ff.net.2.lora_A.weight",
                       "single_transformer_blocks.3.proj_mlp.lora_B.weight", "proj_out_means.weight"}
    assert lora_targets({**sd, "single_transformer_blocks.3.proj_mlp.lora_A.weight": t}) == ["ff.net.2", "proj_mlp"]
