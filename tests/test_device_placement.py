"""One device per module (issue 13): the student on one rank, the TeacherServer's replica, validation rollouts and
the exported PiFlowPipeline run with their networks on a device other than the CPU, where inputs are made by
default (noise from CPU generators, conditioning from the encoders and the data feed). The device is a test
double (tests/device_emulation.py: tensors that say `emu:0` and raise on any op mixing them with CPU
tensors, as CUDA does), so every forgotten `.to(device)` fails here instead of on the first GPU step. Every case
also runs on the CPU and must give the same numbers (the moves change where, not what)."""
from __future__ import annotations

import math

import pytest
import torch

from tests.device_emulation import Emulated, device, emulated_device, run_isolated
from tests.recipes import FP32, IN_PROCESS, recipe_config
from tests.trainer.bf16_workers import InProcessTeacher  # the Ray hop only, as in the bf16 tests


def _cfg(family: str, lora: bool, out: str, nfe: int = 2):
    """The family's recipe (rehearsal config), one process in float32 (results are compared to the CPU's).
    Without activation checkpointing: torch.utils.checkpoint asks the device backend for its autocast support,
    which the emulated device (a test double) does not register; tests/trainer/test_gradient_checkpointing.py
    checks checkpointing."""
    o = [*IN_PROCESS, *FP32, "model.gradient_checkpointing=false", "train.iters=1", "train.batch_size=2", "eval.every=1", "eval.num_samples=2",
         "ema.start=0", "distill.teacher_ratio_decay_iters=0", "distill.num_intermediate=2",
         "distill.total_substeps=16", f"lora.enabled={str(lora).lower()}",
         f"teacher.placement={'shared' if lora else 'separate'}", "teacher.overlap=false"]
    if family != "dit":
        o += [f"distill.nfe={nfe}", f"eval.nfe={nfe}"]
    return recipe_config(family, *o, output=out)


def _one_iteration(cfg, dev):
    """build_rank + the rank program's batches + validation hook + one loop iteration on `dev`; returns
    (record, the rollout's final latents (CPU), the student's device)."""
    from cluster.student_group import cond_shapes_without_prompts
    from cluster.teacher_server import TeacherServer
    from models.families import load_text_encoder
    from trainer import rank_program
    from trainer.loop import train_loop
    from trainer.evaluation.rollouts import RolloutHook

    rank_program.device_for = lambda info: dev  # the rank's accelerator (a fresh process: no restore needed)
    teacher = None
    if cfg.teacher.placement == "separate":
        teacher = InProcessTeacher(TeacherServer(cfg.to_dict(), device=str(dev)))
        torch.set_grad_enabled(True)  # the actor turns autograd off for its process; here it shares ours
    setup = rank_program.build_rank(cfg, teacher)
    batches = rank_program.OnDevice(rank_program.synthetic_batches(cfg, setup.info, cond_shapes_without_prompts(cfg)),
                                    setup.device)
    rollouts = {}

    class Keep(RolloutHook):
        def sample(self):
            states, stats = super().sample()
            rollouts["x0"] = states[:, -1]
            return states, stats

    hook = Keep(cfg, setup.family, setup.student, encode=load_text_encoder(cfg), device=setup.device)
    records = []

    class Log:
        def log(self, step, values):
            records.append(values)

    train_loop(cfg, setup.engine, setup.student.make_policy, setup.teacher, batches, ema=setup.ema, logger=Log(),
               eval_hook=hook, generator=torch.Generator().manual_seed(3), progress=False)
    return records[0], rollouts["x0"], setup


def _iteration_case(family: str, lora: bool, out: str):
    ref, ref_x0, _ = _one_iteration(_cfg(family, lora, out + "/cpu"), torch.device("cpu"))
    with emulated_device() as mode:
        rec, x0, setup = _one_iteration(_cfg(family, lora, out + "/emu"), device())
        assert setup.device == device()
        assert all(isinstance(p, Emulated) for p in setup.student.parameters())  # the whole student moved
        assert mode.ops > 1000, mode.ops  # the forwards, backward and rollouts ran on the device
    assert x0.device.type == "cpu" and type(x0) is torch.Tensor  # results come back where the caller expects
    return ref, ref_x0, rec, x0


# LoRA where the family's transformer supports PEFT (diffusers' DiT does not: its recipe fine-tunes fully)
@pytest.mark.parametrize("family,lora", [("flux", True), ("flux", False), ("qwen_image", True),
                                         ("qwen_image", False), ("dit", False)])
def test_one_iteration_with_the_networks_on_another_device(family, lora, tmp_path):
    ref, ref_x0, rec, x0 = run_isolated(_iteration_case, family, lora, str(tmp_path))
    assert math.isfinite(rec["loss"]) and rec["loss"] > 0
    assert rec["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7)
    # the emulated device takes SDPA's math kernel where the CPU takes its flash kernel (Qwen-Image's masked
    # attention): float32 sums in another order, ~1e-4 relative on a gradient norm
    assert rec["grad_norm"] == pytest.approx(ref["grad_norm"], rel=2e-3)
    torch.testing.assert_close(x0, ref_x0, rtol=1e-4, atol=1e-5)


def _pipeline_case(family: str, out: str):
    from models.pipeline import PiFlowPipeline, PiFlowStudent

    cfg = _cfg(family, family != "dit", out)
    prompt = cfg.eval.prompts[0]
    torch.manual_seed(0)
    pipe = PiFlowPipeline.from_student(PiFlowStudent(piflow=cfg.to_dict(), kind="lora" if cfg.lora.enabled else "full"))
    ref = pipe(prompt, num_images=2, generator=torch.Generator().manual_seed(5))
    with emulated_device() as mode:
        pipe.to(device())
        out = pipe(prompt, num_images=2, generator=torch.Generator().manual_seed(5))
        assert out.device == device() and mode.ops > 100, mode.ops
        out = out.cpu()
    return ref, out


@pytest.mark.parametrize("family", ["flux", "qwen_image", "dit"])
def test_pipeline_call_with_the_student_on_another_device(family, tmp_path):
    ref, out = run_isolated(_pipeline_case, family, str(tmp_path))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
