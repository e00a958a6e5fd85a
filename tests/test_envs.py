"""Static check of the software environments: every rule's conda env provides what its script imports.

For each rule of workflow/rules/*.smk, the `script:` is parsed (ast) and the slidesnake modules it
imports are followed transitively (lazy imports inside functions included: they run in the job too;
imports guarded by ``except ImportError`` are optional and skipped). Every third-party import is
mapped to its conda package name and must be listed in the rule's `conda:` env (conda or pip part).
Nothing is installed: this runs in a second and needs no conda.
"""

from __future__ import annotations

import ast
import re
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from conftest import REPO

RULES = REPO / "workflow" / "rules"
PACKAGE = REPO / "scripts" / "slidesnake"

# import name -> conda-forge package name(s) (any one of them satisfies the import)
CONDA_NAME: dict[str, tuple[str, ...]] = {
    "cv2": ("opencv", "py-opencv"),
    "PIL": ("pillow",),
    "sklearn": ("scikit-learn",),
    "torch": ("pytorch",),
    "yaml": ("pyyaml",),
    "openslide": ("openslide-python",),
    "skimage": ("scikit-image",),
    "matplotlib": ("matplotlib-base", "matplotlib"),
    "huggingface_hub": ("huggingface_hub", "huggingface-hub"),
    "safetensors": ("safetensors",),
    "jsonschema": ("jsonschema",),
    "tifffile": ("tifffile",),
    "imagecodecs": ("imagecodecs",),
    "transformers": ("transformers",),
    "open_clip": ("open-clip-torch", "open_clip_torch"),
}
# pandas reads and writes Parquet through pyarrow without importing it
IMPLICIT_BY_ATTRIBUTE = {"read_parquet": "pyarrow", "to_parquet": "pyarrow"}
# modules that are not packages of the env: the script's own package and Snakemake's preamble
NOT_PACKAGES = {"slidesnake", "snakemake", "__future__"}


def parse_rules() -> dict[str, dict[str, Path]]:
    """{rule: {"script": path, "conda": path, "smk": path}} from every .smk file (paths resolved)."""
    rules: dict[str, dict[str, Path]] = {}
    for smk in sorted(RULES.glob("*.smk")) + [REPO / "workflow" / "Snakefile"]:
        text = smk.read_text()
        blocks = re.split(r"^(?:rule|checkpoint)\s+(\w+)\s*:", text, flags=re.M)
        for name, body in zip(blocks[1::2], blocks[2::2]):
            entry = {"smk": smk}
            for key in ("script", "conda"):
                m = re.search(rf"^\s+{key}:\s*\n\s+[\"']([^\"']+)[\"']", body, flags=re.M)
                if m:
                    entry[key] = (smk.parent / m.group(1)).resolve()
            rules[name] = entry
    return rules


def _optional_import_nodes(tree: ast.AST) -> set[int]:
    """ids of import nodes inside a ``try`` whose handlers catch ImportError."""
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            caught = set()
            for h in node.handlers:
                types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
                caught |= {t.id for t in types if isinstance(t, ast.Name)}
            if caught & {"ImportError", "ModuleNotFoundError"}:
                for stmt in node.body:
                    optional |= {id(n) for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return optional


def _module_file(module: str) -> Path | None:
    """The file of a slidesnake module (``slidesnake.x.y``), or None if it is not one."""
    parts = module.split(".")
    if parts[0] != "slidesnake":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@lru_cache(maxsize=None)
def direct_imports(path: Path) -> tuple[frozenset[str], frozenset[str]]:
    """(imported module names, implicit packages) of one file; optional imports left out."""
    tree = ast.parse(path.read_text(), filename=str(path))
    optional = _optional_import_nodes(tree)
    is_pkg = path.name == "__init__.py"
    here = _module_name(path) if PACKAGE in path.parents else ""
    mods, implicit = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in IMPLICIT_BY_ATTRIBUTE:
            implicit.add(IMPLICIT_BY_ATTRIBUTE[node.attr])
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside the package
                pkg = here.split(".") if is_pkg else here.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            else:
                base = node.module
            mods.add(base)
            # `from slidesnake import io` / `from slidesnake.models import abmil`: submodules
            mods |= {f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}")}
    # a package that imports all its submodules (a registry: pkgutil.iter_modules) pulls them all in
    if is_pkg and "iter_modules" in path.read_text():
        mods |= {_module_name(p) for p in path.parent.glob("*.py") if p.name != "__init__.py"}
    return frozenset(mods), frozenset(implicit)


def third_party_imports(script: Path) -> dict[str, str]:
    """{top-level third-party module or implicit package: the file that needs it} of a script and
    every slidesnake module it reaches."""
    needed: dict[str, str] = {}
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        mods, implicit = direct_imports(path)
        where = str(path.relative_to(REPO))
        for pkg in implicit:
            needed.setdefault(pkg, where)
        for mod in mods:
            # every parent package of a slidesnake module runs its __init__ too
            parts = mod.split(".")
            for i in range(1, len(parts) + 1):
                f = _module_file(".".join(parts[:i]))
                if f is not None:
                    todo.append(f)
            top = parts[0]
            if top in NOT_PACKAGES or top in sys.stdlib_module_names:
                continue
            needed.setdefault(top, where)
    return needed


def env_packages(env: Path) -> set[str]:
    """Package names (conda and pip) of an environment file, lower case."""
    spec = yaml.safe_load(env.read_text())

    def name(dep: str) -> str:
        dep = dep.split("::")[-1]
        return re.split(r"[\s<>=!~\[]", dep.strip(), maxsplit=1)[0].lower()

    names = set()
    for dep in spec.get("dependencies", []):
        if isinstance(dep, str):
            names.add(name(dep))
        elif isinstance(dep, dict):
            names |= {name(d) for d in dep.get("pip", [])}
    return names


RULE_TABLE = parse_rules()
SCRIPT_RULES = sorted(r for r, e in RULE_TABLE.items() if "script" in e)


def test_rules_found():
    # the parser sees the pipeline's rules (a change of layout must not make this test vacuous)
    assert {"tile", "filter_tissue", "extract_features", "make_splits", "train", "summarize", "heatmap",
            "run_summary"} <= set(SCRIPT_RULES)


@pytest.mark.parametrize("rule", SCRIPT_RULES)
def test_rule_has_an_existing_env_pinning_python(rule):
    entry = RULE_TABLE[rule]
    assert "conda" in entry, f"rule {rule} ({entry['smk'].name}) has a script but no conda: env"
    assert entry["conda"].is_file(), f"rule {rule}: {entry['conda']} does not exist"
    assert entry["script"].is_file(), f"rule {rule}: {entry['script']} does not exist"
    assert "python" in env_packages(entry["conda"]), f"{entry['conda'].name} does not pin python"


@pytest.mark.parametrize("rule", SCRIPT_RULES)
def test_env_provides_every_import(rule):
    entry = RULE_TABLE[rule]
    have = env_packages(entry["conda"])
    missing = []
    for module, where in sorted(third_party_imports(entry["script"]).items()):
        wanted = CONDA_NAME.get(module, (module.lower().replace("_", "-"), module.lower()))
        if not have & set(wanted):
            missing.append(f"{module} (conda: {wanted[0]}; imported by {where})")
    assert not missing, (f"rule {rule}: {entry['conda'].relative_to(REPO)} lacks "
                         + "; ".join(missing))


def test_import_walker_follows_the_package():
    # extract_features reaches torch through slidesnake.features -> slidesnake.backbones, zarr
    # through slidesnake.store, and pyarrow through pandas' parquet reader.
    needed = third_party_imports(RULE_TABLE["extract_features"]["script"])
    assert {"torch", "torchvision", "zarr", "openslide", "numpy", "pandas", "pyarrow"} <= set(needed)
    assert "huggingface_hub" not in needed  # optional: imported under `except ImportError`
    # the model registry imports every model module
    train = third_party_imports(RULE_TABLE["train"]["script"])
    assert "torch" in train and "sklearn" in train
