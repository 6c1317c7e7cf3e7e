"""One name, one meaning. The scripts keep their building blocks inline (each can be copied alone with utils.py),
so pgd_attack, nmse_loss, interpolate_ and the rest exist in several files: every copy must be the same code. More
generally, a top-level name defined in two of the project's files must mean the same thing in both; only each
script's entry points (main, parse_args, train, SCRIPT, ...) differ by design."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p for p in [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")])
# every script has its own: what it is, its flags, its loop, its columns
ENTRY_POINTS = {"main", "parse_args", "train", "SCRIPT", "METRIC_FIELDS", "LOSSES", "ROOT"}
# the building blocks the scripts write inline, each with the files that must hold an identical copy
BUILDING_BLOCKS = {
    "pgd_attack": ["train_piat.py", "train_vit.py", "train_rdat.py", "evaluate.py", "sanity.py", "report.py"],
    "cw_margin": ["train_piat.py", "train_vit.py", "train_rdat.py", "evaluate.py", "sanity.py", "report.py"],
    "ExpectedLogits": ["evaluate.py", "sanity.py"],
    "Bf16Autocast": ["evaluate.py", "sanity.py"],
    "attack_flags": ["train_piat.py", "train_vit.py", "train_rdat.py", "evaluate.py"],
    "nmse_loss": ["train_piat.py", "train_vit.py", "toy_example.py"],
    "trades_kl": ["train_piat.py", "train_vit.py", "train_rdat.py"],
    "piat_alpha": ["train_piat.py", "train_vit.py", "train_rdat.py", "toy_example.py"],
    "interpolate_": ["train_piat.py", "train_vit.py", "train_rdat.py", "toy_example.py"],
    "clone_state": ["train_piat.py", "train_vit.py", "train_rdat.py", "toy_example.py"],
    "piat_step_": ["train_piat.py", "train_vit.py", "train_rdat.py"],
    "evaluate_epoch": ["train_piat.py", "train_vit.py", "train_rdat.py"],
}


def top_level_definitions(path):
    """{name: source} of the functions, classes and assignments at the top of a file."""
    text = path.read_text()
    tree = ast.parse(text)
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = ast.get_source_segment(text, node)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        found[name.id] = ast.get_source_segment(text, node.value)
    return found


DEFINITIONS = {path.relative_to(ROOT).as_posix(): top_level_definitions(path) for path in FILES}


@pytest.mark.parametrize("name", list(BUILDING_BLOCKS))
def test_every_copy_of_a_building_block_is_the_same_code(name):
    copies = {}
    for file in BUILDING_BLOCKS[name]:
        assert name in DEFINITIONS[file], f"{file} has no {name}"
        copies[file] = DEFINITIONS[file][name]
    first = next(iter(copies.values()))
    assert all(code == first for code in copies.values()), {f: c.splitlines()[0] for f, c in copies.items()}


def test_a_name_defined_in_two_files_means_the_same_in_both():
    seen, clashes = {}, []
    for file, definitions in DEFINITIONS.items():
        for name, code in definitions.items():
            if name in ENTRY_POINTS or name.startswith("_"):
                continue
            if name in seen and seen[name][1] != code:
                clashes.append(f"{name}: {seen[name][0]} and {file}")
            seen.setdefault(name, (file, code))
    assert not clashes, clashes


def test_the_scripts_import_no_other_script():
    """Each script runs copied alone with utils.py: none imports another (sweep.py and the benchmark, which drive
    the others, excepted; evaluate.py loads its two modules, sanity.py and report.py, for the options that need them,
    and those import utils.py only)."""
    scripts = {p.stem for p in FILES if p.parent == ROOT and p.stem != "utils"}
    for path in FILES:
        if path.stem in ("sweep", "bench_train"):
            continue
        imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
        allowed = {"sanity", "report"} if path.stem == "evaluate" else set()  # evaluate.py's own modules
        assert not imported & (scripts - {path.stem} - allowed), (path.name, imported & scripts)


def test_no_import_circle():
    """sanity.py and report.py load no evaluate.py: evaluate.py uses them, never the other way round."""
    import subprocess
    import sys

    code = "import sys, sanity, report; assert 'evaluate' not in sys.modules, sorted(sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
