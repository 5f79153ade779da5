"""The one-way dependency rule of DESIGN.md §2, checked on the source text of every module."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "models": {"ray", "deepspeed", "wandb", "s3fs", "cluster", "trainer", "data_pipeline", "torch.distributed"},
    "data_pipeline": {"ray", "deepspeed", "wandb", "cluster", "trainer"},
    "trainer": {"ray", "cluster", "s3fs"},
}
# Each runtime has one owner.
OWNERS = {"deepspeed": {"trainer/engine.py"}, "wandb": {"trainer/metrics.py"}, "s3fs": {"data_pipeline/storage.py"},
          "huggingface_hub": {"trainer/weights.py"}}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def package_files():
    for pkg in ("models", "data_pipeline", "trainer", "cluster"):
        yield from sorted((ROOT / pkg).rglob("*.py"))


def matches(name: str, banned: str) -> bool:
    return name == banned or name.startswith(banned + ".")


@pytest.mark.parametrize("path", list(package_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_one_way_rule(path):
    rel = path.relative_to(ROOT).as_posix()
    pkg = rel.split("/")[0]
    names = imported_modules(path)
    for banned in FORBIDDEN.get(pkg, ()):
        bad = [n for n in names if matches(n, banned)]
        assert not bad, f"{rel} imports {bad}: {pkg}/ may not import {banned}"
    for runtime, owners in OWNERS.items():
        if any(matches(n, runtime) for n in names):
            assert rel in owners, f"{rel} imports {runtime}; only {sorted(owners)} may"
    if pkg != "cluster":
        assert not any(matches(n, "ray") for n in names), f"{rel} imports ray; only cluster/ may"


def test_importing_packages_has_no_side_effects():
    import subprocess
    import sys

    code = ("import sys, logging; import models, trainer, data_pipeline, cluster; "
            "import trainer.config, cluster.cli; "
            "assert not logging.getLogger().handlers; "
            "assert 'ray' not in sys.modules and 'deepspeed' not in sys.modules and 'wandb' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
