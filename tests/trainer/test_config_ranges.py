"""Every numeric config key has a range, and values outside it (or not finite) fail before any work with a
one-line error naming the file and key (issue 12: ckpt_every=0 used to divide by zero, max_failures=-1,
nan/inf, upload_queue=0 and ckpt_keep_last=0 used to pass)."""
import math

import pytest

from trainer import config as C
from trainer.config import ConfigError, load_config


def test_every_numeric_field_has_a_range_that_holds_its_default():
    fields = C.numeric_fields()
    assert set(fields) == set(C.RANGES), (set(fields) ^ set(C.RANGES))
    defaults = C.Config()
    for key in fields:
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        for v in value if isinstance(value, tuple) else (value,):
            assert C.in_range(v, C.RANGES[key]), (key, v)


@pytest.mark.parametrize("override, key", [
    ("train.ckpt_every=0", "train.ckpt_every"), ("cluster.student.max_failures=-1", "cluster.student.max_failures"),
    ("train.upload_queue=0", "train.upload_queue"), ("train.ckpt_keep_last=0", "train.ckpt_keep_last"),
    ("teacher.batch_wait_ms=6000", "teacher.batch_wait_ms"), ("optim.lr=2", "optim.lr"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1]"), ("data.timeout_s=-1", "data.timeout_s"),
    ("teacher.guidance.interval=[0.8, 0.2]", "teacher.guidance.interval"),
    ("distill.boundary_jitter=0.5", "distill.boundary_jitter"),
])
def test_out_of_range_values_are_refused_naming_the_key(override, key, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  iters: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    message = str(err.value)
    assert message.startswith(f"{path}: key '{key}'") and "\n" not in message


@pytest.mark.parametrize("text", ["nan", ".nan", "inf", "-.inf", "'1e999'"])
def test_non_finite_floats_are_refused(text, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"optim:\n  grad_clip: {text}\n")
    with pytest.raises(ConfigError, match="key 'optim.grad_clip': expected a finite number"):
        load_config(path)


def test_ranges_are_closed_or_open_as_written():
    assert C.in_range(0.0, "[0, 1)") and not C.in_range(1.0, "[0, 1)")
    assert not C.in_range(0.0, "(0, 1]") and C.in_range(1.0, "(0, 1]")
    assert not C.in_range(math.inf, "[0, 1e9]")


def test_boundary_jitter_is_refused_for_data_based_training(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  iters: 10\n")
    with pytest.raises(ConfigError, match="distill.boundary_jitter.*data-free"):
        load_config(path, ["distill.boundary_jitter=0.2", "distill.data_free=false", "data.shards=s3://b/x"])
    assert load_config(path, ["distill.boundary_jitter=0.2"]).distill.boundary_jitter == 0.2
