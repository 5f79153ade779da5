"""The one-way dependency rules, checked on the source text (AST, imports inside functions included) of every module:

- DESIGN.md §2: cluster/ -> trainer/ -> models/, data_pipeline/; each runtime has one owner.
- trainer/: its root is the per-rank program; the subpackages (checkpoint/, evaluation/, export/, planner/,
  teachers/, rehearsal/) may import the root, but the root imports a subpackage only through the few entries
  listed in ROOT_ENTRIES (the rank program's resume, rollout and released-student hooks, ...).
- models/: the families (models/families/*) build their models, so they import models.student, models.teacher
  and models.text_encoders; those three import the neutral models.types and never a family. models/ as a whole
  has no import cycle.
"""
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


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_targets(path: Path) -> set[str]:
    """Every module `path` imports, as an absolute dotted name: relative imports resolved, and
    `from pkg import mod` named `pkg.mod` where that is a module of this repository."""
    me = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            names.add(base)
            for alias in node.names:
                sub = ROOT.joinpath(*f"{base}.{alias.name}".split("."))
                if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file():
                    names.add(f"{base}.{alias.name}")
    return names


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


# --------------------------------------------------------------------------------------------- trainer/ layout
TRAINER_SUBPACKAGES = ("checkpoint", "evaluation", "export", "planner", "teachers", "rehearsal")
# The only places where the per-rank program at trainer/'s root reaches into a subpackage (root file -> module).
ROOT_ENTRIES = {
    "trainer/rank_program.py": {"trainer.checkpoint.resume", "trainer.evaluation.rollouts",
                                "trainer.export.import_released"},
    "trainer/local_run.py": {"trainer.checkpoint.resume", "trainer.evaluation.rollouts", "trainer.teachers.build"},
    "trainer/layout.py": {"trainer.planner.memory"},  # rank 0 plans the placement (`auto`) before the engine
}


def trainer_root_files():
    return sorted(p for p in (ROOT / "trainer").glob("*.py"))


def subpackage_imports(path: Path) -> set[str]:
    """The trainer subpackage modules (or packages) `path` imports."""
    return {n for n in imported_targets(path)
            if any(matches(n, f"trainer.{sub}") for sub in TRAINER_SUBPACKAGES)}


def test_trainer_subpackages_are_what_the_layout_says():
    for sub in TRAINER_SUBPACKAGES:
        init = ROOT / "trainer" / sub / "__init__.py"
        assert init.is_file(), f"trainer/{sub}/ is not a package"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "\n" not in doc.strip(), f"trainer/{sub}/__init__.py must open with a one-line docstring"
    packages = {p.parent.name for p in (ROOT / "trainer").glob("*/__init__.py")}
    assert packages == set(TRAINER_SUBPACKAGES), f"trainer/ subpackages {sorted(packages)}: update this test"


@pytest.mark.parametrize("path", trainer_root_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_trainer_root_reaches_subpackages_only_through_listed_entries(path):
    rel = path.relative_to(ROOT).as_posix()
    allowed = ROOT_ENTRIES.get(rel, set())
    bad = sorted(n for n in subpackage_imports(path)
                 if n not in allowed and not any(n != a and a.startswith(n + ".") for a in allowed))
    assert not bad, (f"{rel} imports {bad}: the per-rank program at trainer/'s root may import a subpackage only "
                     f"through ROOT_ENTRIES ({sorted(allowed) or 'none for this file'})")


def test_root_entries_are_still_used():
    """An entry nobody uses any more goes from ROOT_ENTRIES (the list stays the true one)."""
    for rel, allowed in ROOT_ENTRIES.items():
        unused = allowed - subpackage_imports(ROOT / rel)
        assert not unused, f"ROOT_ENTRIES[{rel!r}] lists {sorted(unused)}, which it no longer imports"


# --------------------------------------------------------------------------------------------- models/ one-way
MODEL_BUILDERS = ("models.student", "models.teacher", "models.text_encoders", "models.types")


def models_import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in sorted((ROOT / "models").rglob("*.py"))}
    return {m: {n for n in imported_targets(p) if n in files and n != m} for m, p in files.items()}


@pytest.mark.parametrize("module", MODEL_BUILDERS)
def test_student_teacher_and_encoders_never_import_a_family(module):
    graph = models_import_graph()
    bad = sorted(n for n in graph[module] if matches(n, "models.families"))
    assert not bad, f"{module} imports {bad}: the families import {module}, never the other way (models/types.py)"


def test_models_has_no_import_cycle():
    graph = models_import_graph()
    state: dict[str, int] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle in models/: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
