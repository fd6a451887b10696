"""The notebooks are the source: the committed library must be what nbdev_export makes of them,
and every notebook must already be clean (what nbdev_clean would leave)."""
import shutil, subprocess, filecmp
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _copy_tree(tmp):
    for name in ("nbs", "avar_net"):
        shutil.copytree(ROOT / name, tmp / name,
                        ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints", "_*.ipynb"))
    for name in ("settings.ini", "setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp / name)

def _diff(a: Path, b: Path) -> list[str]:
    "Relative paths that differ between two folders (ignoring caches)."
    out = []
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__", ".ipynb_checkpoints"])
    def walk(c, rel):
        out.extend(f"{rel}{n} (only on one side)" for n in c.left_only + c.right_only)
        out.extend(f"{rel}{n}" for n in c.diff_files)
        for n, sub in c.subdirs.items(): walk(sub, f"{rel}{n}/")
    walk(cmp, ""); return out

def _shallow_is_not_enough(a: Path, b: Path) -> list[str]:
    return [str(p.relative_to(a)) for p in a.rglob("*.py") if "__pycache__" not in p.parts
            and (b / p.relative_to(a)).exists() and p.read_bytes() != (b / p.relative_to(a)).read_bytes()]

def test_library_matches_notebooks(tmp_path):
    _copy_tree(tmp_path)
    shutil.rmtree(tmp_path / "avar_net")
    r = subprocess.run(["nbdev_export"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    diff = sorted(set(_diff(ROOT / "avar_net", tmp_path / "avar_net"))
                  | set(_shallow_is_not_enough(ROOT / "avar_net", tmp_path / "avar_net")))
    assert not diff, f"avar_net/ differs from nbdev_export of the notebooks: {diff} — run nbdev_export and commit"

def test_notebooks_are_clean(tmp_path):
    _copy_tree(tmp_path)
    nbs = sorted((ROOT / "nbs").glob("*.ipynb"))
    assert nbs, "no notebooks"
    r = subprocess.run(["nbdev_clean"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    dirty = [p.name for p in nbs if p.read_bytes() != (tmp_path / "nbs" / p.name).read_bytes()]
    assert not dirty, f"nbdev_clean would change {dirty} — run nbdev_clean and commit"

def test_parameters_tags_survive_clean():
    "papermill needs the `parameters` tag; settings.ini must tell nbdev_clean to keep tags."
    ini = (ROOT / "settings.ini").read_text()
    assert "allowed_cell_metadata_keys = tags" in ini

def test_sync_check_detects_drift(tmp_path):
    "The sync check itself can fail: a hand edit of the library is caught."
    _copy_tree(tmp_path)
    core = tmp_path / "avar_net" / "core.py"
    core.write_text(core.read_text() + "\n# hand edit\n")
    ref = tmp_path / "ref"; ref.mkdir(); _copy_tree(ref); shutil.rmtree(ref / "avar_net")
    subprocess.run(["nbdev_export"], cwd=ref, check=True, capture_output=True)
    assert "core.py" in _shallow_is_not_enough(tmp_path / "avar_net", ref / "avar_net")


def test_top_level_layout():
    """The layout the project promises: nbs, avar_net, data, figures, tests, settings.ini, environment.yml, README.md
    — all tracked."""
    import subprocess
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    top = {p.split("/")[0] for p in tracked}
    assert {"nbs", "avar_net", "data", "figures", "tests", "settings.ini", "environment.yml", "README.md"} <= top, top
    assert "data/README.md" in tracked
