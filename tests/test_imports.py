"""Data flows one way: configlib -> data, modules -> models -> eval (the evaluation loop and its
metrics) -> train (step, checkpoints, writers, the trainer) -> the trained-run reader on top.
Read from the source (every import statement, also those inside functions, and dotted
`fixed_slots.*` strings handed to importlib), not by importing."""
import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fixed_slots"
_DOTTED = re.compile(r"fixed_slots(\.\w+)+")

# importer (a module or a package prefix) -> (forbidden prefixes, allowed exceptions).
RULES = {
    # The reusable layer: JAX only, nothing else of ours.
    "fixed_slots.fixed_point": (("fixed_slots.",), ("fixed_slots.fixed_point",)),
    # Config mechanics: below everything that owns a config section (each owner checks its own).
    "fixed_slots.configlib": (("fixed_slots.",), ("fixed_slots.configlib", "fixed_slots.errors")),
    "fixed_slots.data": (("fixed_slots.modules", "fixed_slots.models", "fixed_slots.train",
                          "fixed_slots.eval", "fixed_slots.visualize", "fixed_slots.trained",
                          "fixed_slots.experiments"), ()),
    "fixed_slots.modules": (("fixed_slots.models", "fixed_slots.train", "fixed_slots.eval",
                             "fixed_slots.data", "fixed_slots.visualize", "fixed_slots.trained",
                             "fixed_slots.experiments"), ()),
    "fixed_slots.models": (("fixed_slots.train", "fixed_slots.eval", "fixed_slots.visualize",
                            "fixed_slots.trained", "fixed_slots.experiments"), ()),
    # The picture grids serve the trainer and evaluation alike.
    "fixed_slots.visualize": (("fixed_slots.train", "fixed_slots.eval", "fixed_slots.trained",
                               "fixed_slots.experiments"), ()),
    "fixed_slots.train": (("fixed_slots.trained", "fixed_slots.experiments"), ()),
    # The mesh and multi-process helpers serve the trainer and evaluation alike.
    "fixed_slots.sharding": (("fixed_slots.modules", "fixed_slots.models", "fixed_slots.train",
                              "fixed_slots.eval", "fixed_slots.visualize", "fixed_slots.trained",
                              "fixed_slots.experiments"), ()),
    # Dataset builders: our sources' schema and errors, nothing of the models or training.
    "fixed_slots.data_prep": (("fixed_slots.modules", "fixed_slots.models", "fixed_slots.train",
                               "fixed_slots.eval", "fixed_slots.visualize", "fixed_slots.trained",
                               "fixed_slots.experiments", "fixed_slots.sharding"), ()),
    # The evaluation loop runs a model on data; the trainer and the trained-run reader use it.
    "fixed_slots.eval": (("fixed_slots.train", "fixed_slots.trained", "fixed_slots.experiments"),
                         ()),
    "fixed_slots.trained": (("fixed_slots.experiments",), ()),
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_names(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every fixed_slots module `source` imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            for alias in node.names:
                # `from pkg import submodule` imports the submodule; `from mod import name`, mod.
                dotted = f"{base}.{alias.name}"
                found.add(dotted if alias.name != "*" and _is_module(dotted) else base)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and _DOTTED.fullmatch(node.value)):
            found.add(node.value)
    return {name for name in found if name.startswith("fixed_slots")}


def _matches(name: str, prefix: str) -> bool:
    return name == prefix.rstrip(".") or name.startswith(prefix.rstrip(".") + ".")


def violations(module: str, names: set[str]) -> list[str]:
    out = []
    for scope, (forbidden, allowed) in RULES.items():
        if not _matches(module, scope):
            continue
        for name in sorted(names):
            if _matches(name, scope) and scope != "fixed_slots.fixed_point":
                continue  # within its own layer
            if any(_matches(name, a) for a in allowed):
                continue
            if any(_matches(name, f) or (f.endswith(".") and name.startswith(f))
                   for f in forbidden):
                out.append(f"{module} imports {name} (rule for {scope})")
    return out


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield module_name(path), path


def test_the_scanner_sees_every_kind_of_import():
    source = """
import fixed_slots.eval.metrics
from fixed_slots import visualize, configlib
from .. import train
REGISTRY = {"x": ("fixed_slots.experiments.sweep", "Sweep")}

def later():
    from fixed_slots.eval.evaluator import Evaluator
    import numpy
"""
    names = imported_names(source, "fixed_slots.models.slate")
    assert names == {"fixed_slots.eval.metrics", "fixed_slots.visualize", "fixed_slots.configlib",
                     "fixed_slots.train", "fixed_slots.experiments.sweep",
                     "fixed_slots.eval.evaluator"}
    found = violations("fixed_slots.models.slate", names)
    assert len(found) == 5, found  # all but configlib
    # A layer's own modules pass; the fixed-point layer and configlib allow only themselves.
    assert violations("fixed_slots.eval.evaluator", {"fixed_slots.models.slate",
                                                     "fixed_slots.eval.metrics"}) == []
    assert imported_names("from fixed_slots.train import checkpoint\n"
                          "from fixed_slots.train.checkpoint import Checkpointer\n",
                          "fixed_slots.trained") == {"fixed_slots.train.checkpoint"}
    assert violations("fixed_slots.eval.evaluator", {"fixed_slots.train.checkpoint"})
    assert violations("fixed_slots.configlib", {"fixed_slots.models"})
    assert violations("fixed_slots.configlib", {"fixed_slots.errors"}) == []
    assert violations("fixed_slots.fixed_point.layer", {"fixed_slots.errors"})
    assert violations("fixed_slots.fixed_point.layer", {"fixed_slots.fixed_point._loop"}) == []


def test_the_package_has_the_layers_the_rules_name():
    names = {name for name, _ in _modules()}
    for scope in RULES:
        assert any(_matches(name, scope) for name in names), scope


@pytest.mark.parametrize("module,path", list(_modules()), ids=lambda x: str(x))
def test_data_flows_one_way(module, path):
    names = imported_names(path.read_text(), module, path.name == "__init__.py")
    assert violations(module, names) == []


def test_the_wheel_installs_only_fixed_slots(tmp_path):
    """`pip install .` must not add a generic top-level package (data_prep was one): the built
    wheel's top-level names are fixed_slots and its metadata, nothing else."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "setup.py", src)
    for folder in ("fixed_slots", "data_prep"):  # data_prep/: the checkout's shortcut, not shipped
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "No module named" in out.stderr and "wheel" in out.stderr:
        pytest.skip(f"cannot build a wheel offline here: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert tops == {"fixed_slots"}, tops
    assert "fixed_slots/data_prep/cli.py" in names  # the builders ship under the project's name
    assert "fixed_slots/data_prep/builders/clevr_mirror.py" in names


def test_models_without_the_training_stack_name_the_extra():
    """As the light install (.ci/run) sees it: `import fixed_slots.models` says which extra."""
    code = textwrap.dedent("""
        import sys
        for name in ("flax", "optax", "orbax", "ml_collections", "absl", "clu", "grain",
                     "tensorflow_datasets", "tensorboardX", "PIL", "matplotlib", "scipy"):
            sys.modules[name] = None  # import fails, find_spec returns None: "not installed"
        try:
            import fixed_slots.models
        except ImportError as e:
            assert type(e) is ImportError, type(e)  # not a bare ModuleNotFoundError
            assert '".[train]"' in str(e) and "missing: flax, optax, ml_collections" in str(e), e
        else:
            raise AssertionError("fixed_slots.models imported without the training stack")
        sys.modules["ml_collections"] = None
        del sys.modules["flax"], sys.modules["optax"], sys.modules["absl"], sys.modules["scipy"]
        try:
            import fixed_slots.models
        except ImportError as e:
            assert "(missing: ml_collections)" in str(e), e
        else:
            raise AssertionError("fixed_slots.models imported without ml_collections")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_python_m_data_prep_still_works_from_a_checkout(monkeypatch, capsys):
    """The root data_prep/ shortcut runs fixed_slots.data_prep's CLI (README's old commands)."""
    out = subprocess.run([sys.executable, "-m", "data_prep", "list"], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and "clevr_mirror: CLEVR-Mirror layout" in out.stdout, (
        out.stderr[-2000:])
    import runpy  # pylint: disable=import-outside-toplevel

    monkeypatch.setattr(sys, "argv", ["fixed_slots.data_prep", "list"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("fixed_slots.data_prep", run_name="__main__")
    assert exit_.value.code == 0 and capsys.readouterr().out == out.stdout


def test_a_training_start_imports_no_scipy():
    """The trainer's import chain leaves scipy to the two functions that use it (the FID's
    matrix square root, the Hungarian matching): ~0.3 s and ~37 MiB of every start otherwise
    (BENCHMARKS.md). Fails naming the module that brought it in."""
    code = textwrap.dedent("""
        import sys
        from fixed_slots.cli import import_flax_without_ipython
        import_flax_without_ipython()
        loaded = set(sys.modules)
        for name in ("fixed_slots.configlib", "fixed_slots.models", "fixed_slots.data.pipeline",
                     "fixed_slots.train.optim", "fixed_slots.train.trainer"):
            __import__(name)
            new = sorted(m for m in set(sys.modules) - loaded
                         if m in ("scipy.linalg", "scipy.optimize"))
            assert not new, f"importing {name} imported {new}"
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
