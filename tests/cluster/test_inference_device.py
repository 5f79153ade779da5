"""Issue 23 item 7: inference runs where the GPUs are. `piflow sample --device` and the evaluation actors pick
their device (auto = the first GPU, else the CPU; a GPU that is not there is a one-line error before any work),
and the student, its teacher, the text encoders and the VAE all run on it. No GPU here: the device is the
emulated accelerator of tests/device_emulation.py (a test double: CPU values, any CPU/device mix raises), and
the results must equal the CPU's."""
from __future__ import annotations

import pytest
import torch

from models.pipeline import inference_device
from tests.device_emulation import Emulated, device, emulated_device, run_isolated
from tests.trainer.speed_workers import tiny_cfg


@pytest.mark.parametrize("spec,count,expected", [("auto", 0, "cpu"), ("auto", 2, "cuda:0"), ("cpu", 2, "cpu"),
                                                 ("cuda", 1, "cuda:0"), ("cuda:1", 2, "cuda:1"), ("CUDA:0", 1, "cuda:0")])
def test_device_choice(spec, count, expected):
    assert str(inference_device(spec, cuda_count=count)) == expected


@pytest.mark.parametrize("spec,count,message", [("cuda", 0, "has 0 visible CUDA GPU"), ("cuda:2", 2, "has 2 visible"),
                                                ("cuda:x", 1, "cuda:N"), ("tpu", 1, "expected auto, cpu")])
def test_device_errors_name_the_option(spec, count, message):
    with pytest.raises(ValueError, match=f"--device {spec.lower()}: .*{message}"):
        inference_device(spec, cuda_count=count)


def test_sample_on_a_missing_gpu_fails_before_any_work(tmp_path, capsys):
    from cluster.cli import main

    with pytest.raises(SystemExit, match="piflow sample: --device cuda: this machine has 0 visible CUDA GPU"):
        main(["sample", str(tmp_path / "no-such-export"), "--device", "cuda", "--out", str(tmp_path / "x.png")])


def _export(root: str) -> str:
    from models.pipeline import PiFlowPipeline, PiFlowStudent
    from trainer.config import config_from_dict

    cfg = config_from_dict(tiny_cfg("flux", run={"output": f"{root}/run"}))
    torch.manual_seed(0)
    PiFlowPipeline.from_student(PiFlowStudent(piflow=cfg.to_dict(), kind="lora")).save_pretrained(f"{root}/export")
    return f"{root}/export"


def _generate(export: str, dev) -> tuple:
    from trainer.evaluation.generate import Generator

    gen = Generator(export, device=dev)
    prompts, seeds = ["a red cat", "a small blue dog"], [0, 1]
    student = gen.student(prompts, seeds, nfe=2)
    teacher, made = gen.teacher(prompts, seeds, steps=3)
    placed = {"student": {type(p) for p in gen.pipe.student.parameters()},
              "teacher": {type(p) for p in gen._teacher.parameters()},
              "encoders": {type(p) for p in gen.pipe._encoder.t5.parameters()} | {type(p) for p in gen.pipe._encoder.clip.parameters()}}
    return student, teacher, made, placed


def _generator_case(root: str):
    export = _export(root)
    ref = _generate(export, torch.device("cpu"))
    with emulated_device() as mode:
        got = _generate(export, device())
        assert mode.ops > 1000  # the networks ran on the device
    return ref, got


def test_evaluation_generator_runs_student_teacher_and_encoders_on_the_device(tmp_path):
    (s_ref, t_ref, made_ref, placed_ref), (s, t, made, placed) = run_isolated(_generator_case, str(tmp_path))
    assert placed_ref == {"student": {torch.nn.Parameter}, "teacher": {torch.nn.Parameter},
                          "encoders": {torch.nn.Parameter}}
    assert all(kinds == {Emulated} for kinds in placed.values()), placed
    assert type(s) is torch.Tensor and s.device.type == "cpu" and made == made_ref == 2  # results come back
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t, t_ref, rtol=1e-4, atol=1e-5)
    assert float(s.std()) > 0.1


def test_piflow_sample_on_the_cpu_says_where(tmp_path, capsys):
    from cluster.cli import main

    export = _export(str(tmp_path))
    assert main(["sample", export, "--prompt", "a red cat", "--device", "cpu", "--nfe", "2",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert "on cpu" in capsys.readouterr().out and (tmp_path / "s.png").exists()
