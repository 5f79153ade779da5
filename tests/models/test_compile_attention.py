"""Issue 23 items 4 and 5 on CPU: `train.compile` compiles the repeated transformer blocks of the student and
the teacher (regional compilation) and changes no number; `model.attention_backend` routes attention through
the chosen diffusers dispatcher backend, and a backend that cannot run here is a one-line config error.

Tolerances. "aot_eager" captures each block as ONE graph (fullgraph: a graph break is an error) through dynamo
and AOTAutograd and runs it with eager kernels: the same float32 ops in the same order, so the results agree to
float32 rounding (1e-6 relative; the decomposed backward may reassociate a sum). "inductor" generates fused C++
kernels (reductions and fused multiply-adds in another order): float32 agreement to 1e-4 relative over a tiny
2-block FLUX, the size of a few ulps accumulated through layer norms, attention softmax and GELU."""
from __future__ import annotations

import pytest
import torch

from models.families import get_family
from tests.trainer.speed_workers import tiny_cfg
from trainer.config import ConfigError, config_from_dict


def _student_and_teacher(family: str, **sections):
    cfg = config_from_dict(tiny_cfg(family, batch=2, teacher={"placement": "separate"}, **sections))
    fam = get_family(family)
    torch.manual_seed(0)
    teacher = fam.build_teacher(cfg)
    torch.manual_seed(1)
    return fam.build_student(cfg, teacher=teacher), teacher, cfg


def _inputs(family: str):
    g = torch.Generator().manual_seed(2)
    x, sigma = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g)
    if family == "flux":
        return x, sigma, {"prompt_embeds": torch.randn(2, 8, 32, generator=g),
                          "pooled_prompt_embeds": torch.randn(2, 32, generator=g)}
    return x, sigma, {"prompt_embeds": torch.randn(2, 8, 32, generator=g),
                      "prompt_embeds_mask": torch.ones(2, 8, dtype=torch.long),
                      "negative_prompt_embeds": torch.randn(2, 8, 32, generator=g),
                      "negative_prompt_embeds_mask": torch.ones(2, 8, dtype=torch.long)}


def _step(student, teacher, family):
    """Student policy means and the gradients of a scalar of them, and the teacher's velocity."""
    x, sigma, cond = _inputs(family)
    student.zero_grad(set_to_none=True)
    policy = student.make_policy(x, sigma, cond)
    (policy.means.square().mean() + policy.logweights.exp().square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return policy.means.detach(), grads, teacher(x, sigma, cond)


def _compare(family, backend, rel):
    eager = _step(*_student_and_teacher(family)[:2], family)
    student, teacher, _ = _student_and_teacher(family, train={"compile": backend},
                                               model={"gradient_checkpointing": True})
    compiled_blocks = [m for m in student.transformer.modules() if getattr(m, "_compiled_call_impl", None)]
    assert len(compiled_blocks) == 2  # FLUX: 1 double + 1 single block; Qwen-Image: its 2 blocks
    assert any(getattr(m, "_compiled_call_impl", None) for m in teacher.network.modules())
    means, grads, u = _step(student, teacher, family)
    torch.testing.assert_close(means, eager[0], rtol=rel, atol=rel * eager[0].abs().max().item())
    torch.testing.assert_close(u, eager[2], rtol=rel, atol=rel * eager[2].abs().max().item())
    assert grads.keys() == eager[1].keys() and len(grads) > 10
    for name, g in eager[1].items():
        torch.testing.assert_close(grads[name], g, rtol=rel, atol=rel * max(g.abs().max().item(), 1e-12))


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_compiled_blocks_capture_whole_and_equal_eager(family):
    torch._dynamo.reset()
    _compare(family, "aot_eager", 1e-6)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_inductor_compiled_blocks_equal_eager_on_cpu():
    """The real code generator (C++ kernels through gcc): minutes of compilation on a loaded 2-core machine."""
    torch._dynamo.reset()
    _compare("flux", "inductor", 1e-4)


def _attention_ops(student, family) -> dict[str, int]:
    from tests.trainer.matmul_dtypes import MatmulDtypes

    with MatmulDtypes() as seen:
        student.make_policy(*_inputs(family))
    return {k.split()[0]: n for k, n in seen.summary()["counts"].items()}


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_attention_backend_setting_changes_the_kernel_not_the_numbers(family):
    ref, _, _ = _student_and_teacher(family)
    math_, _, _ = _student_and_teacher(family, model={"attention_backend": "_native_math"})
    ops_ref, ops_math = _attention_ops(ref, family), _attention_ops(math_, family)
    # native SDPA on CPU takes its fused flash kernel; the math backend spells attention out in bmm + softmax
    assert ops_ref.get("_scaled_dot_product_flash_attention_for_cpu", 0) > 0
    assert ops_math.get("_scaled_dot_product_flash_attention_for_cpu", 0) == 0
    assert ops_math.get("bmm", 0) > ops_ref.get("bmm", 0)
    x, sigma, cond = _inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(math_.make_policy(x, sigma, cond).means, ref.make_policy(x, sigma, cond).means,
                                   rtol=1e-5, atol=1e-5)


def test_attention_backend_errors_and_the_auto_default_on_cuda():
    with pytest.raises(ConfigError, match="model.attention_backend.*unknown backend 'fastest'"):
        config_from_dict(tiny_cfg("flux", model={"attention_backend": "fastest"}))
    # flash-attn is not installed here: a one-line error naming the key, at build time
    with pytest.raises(ValueError, match="model.attention_backend: 'flash' cannot run here"):
        _student_and_teacher("flux", model={"attention_backend": "flash"})
    saved = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        _student_and_teacher("flux", model={"attention_backend": "native"})
        assert torch.backends.cuda.cudnn_sdp_enabled()  # a named backend leaves SDPA's kernels alone
        _student_and_teacher("flux")  # "auto" in a process that trains: SDPA off cuDNN (its backward failed once)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(saved)
