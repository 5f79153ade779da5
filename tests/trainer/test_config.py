import pytest

from trainer.config import ConfigError, load_config


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, "distill:\n  nfe: 8\n  shift: 3.2\noptim:\n  betas: [0.9, 0.99]\n"))
    assert cfg.distill.nfe == 8 and cfg.distill.shift == 3.2
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.policy.type == "gm" and cfg.policy.num_components == 8  # untouched defaults


def test_overrides_apply_and_parse_types(tmp_path):
    cfg = load_config(write(tmp_path, "distill:\n  nfe: 4\n"), ["distill.nfe=2", "optim.lr=1e-3", "policy.type=dx",
                                                                  "teacher.guidance.scale=3.5"])
    assert cfg.distill.nfe == 2 and cfg.optim.lr == 1e-3 and cfg.policy.type == "dx"
    assert cfg.teacher.guidance.scale == 3.5


def test_int_is_accepted_for_float(tmp_path):
    cfg = load_config(write(tmp_path, "distill:\n  shift: 1\n"))
    assert isinstance(cfg.distill.shift, float) and cfg.distill.shift == 1.0


@pytest.mark.parametrize(
    "text, needle",
    [
        ("distill:\n  nfee: 4\n", "unknown key 'distill.nfee'"),
        ("distil:\n  nfe: 4\n", "unknown key 'distil'"),
        ("distill:\n  nfe: four\n", "key 'distill.nfe': expected an integer"),
        ("distill:\n  nfe: 4.5\n", "key 'distill.nfe': expected an integer"),
        ("policy:\n  type: gaussian\n", "key 'policy.type': expected one of 'gm', 'dx'"),
        ("policy:\n  dx_mode: spline\n", "key 'policy.dx_mode': expected one of 'grid', 'polynomial'"),
        ("run:\n  force: 'yes'\n", "key 'run.force': expected true or false"),
        ("optim:\n  betas: [0.9]\n", "key 'optim.betas': expected a list of 2 values"),
        ("distill: 4\n", "distill: expected a mapping"),
        ("distill:\n  nfe: 0\n", "key 'distill.nfe': must be >= 1"),
        ("- a\n- b\n", "top level must be a mapping"),
    ],
)
def test_bad_configs_name_file_and_key(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_bad_override_fails_with_key(tmp_path):
    path = write(tmp_path, "{}\n")
    with pytest.raises(ConfigError, match="unknown key 'train.iterz'"):
        load_config(path, ["train.iterz=3"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(path, ["train.iters"])


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))


def test_cli_reports_config_errors_before_work(tmp_path, capsys):
    from cluster.cli import main

    path = write(tmp_path, "train:\n  iters: many\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.iters" in err and str(path) in err


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
    for path in configs:
        load_config(path)


def test_hash_is_stable_and_sensitive(tmp_path):
    a = load_config(None)
    b = load_config(None)
    c = load_config(None, ["distill.nfe=2"])
    assert a.hash() == b.hash() != c.hash()


def test_model_family_is_checked_against_the_registry_and_latents_may_be_non_square_or_video():
    from models.families import FAMILIES, get_family

    with pytest.raises(ConfigError, match=r"model\.family.*'nope'.*flux"):
        load_config(None, ["model.family=nope"])
    assert set(FAMILIES) >= {"flux", "qwen_image", "dit", "toy2d", "digits"}
    cfg = load_config(None, ["model.family=flux", "model.latent_channels=4", "model.latent_size=6",
                             "model.latent_width=10", "model.latent_frames=3"])
    assert get_family("flux").latent_shape(cfg) == (4, 18, 10)  # frames folded into the height axis
    with pytest.raises(ConfigError, match="model.latent_frames"):
        load_config(None, ["model.latent_frames=0"])
