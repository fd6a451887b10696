"""Install story: pins agree between pip and conda, the wheel installs and imports without the notebooks."""
import re, subprocess, sys, venv, configparser
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^\s*-?\s*([A-Za-z0-9_.\-]+)==([^\s#]+)")

def _pins(lines):
    return {m.group(1).lower().replace("_", "-"): m.group(2) for l in lines if (m := PIN.match(l))}

def test_environment_yml_matches_constraints():
    cons = _pins((ROOT / "constraints.txt").read_text().splitlines())
    env_lines = (ROOT / "environment.yml").read_text().splitlines()
    env = _pins(l for l in env_lines if l.strip().startswith("- ") and "==" in l)
    assert cons, "constraints.txt pins nothing"
    assert env == cons, {"only in constraints": sorted(set(cons) - set(env)),
                         "only in env": sorted(set(env) - set(cons)),
                         "different": sorted(k for k in cons.keys() & env.keys() if cons[k] != env[k])}
    assert "python=3.11" in (ROOT / "environment.yml").read_text()

def test_torch_trio_pinned():
    cons = _pins((ROOT / "constraints.txt").read_text().splitlines())
    assert (cons["torch"], cons["torchvision"], cons["torchaudio"]) == ("2.11.0", "0.26.0", "2.11.0")

def test_settings_requirements_are_lower_bounds_only():
    cfg = configparser.ConfigParser(delimiters=["="]); cfg.read(ROOT / "settings.ini")
    reqs = cfg["DEFAULT"]["requirements"].split()
    assert reqs and not [r for r in reqs if "==" in r], "settings.ini requirements must keep lower bounds only"
    cons = _pins((ROOT / "constraints.txt").read_text().splitlines())
    missing = [r for r in reqs if re.split(r"[<>=!~]", r)[0].lower().replace("_", "-") not in cons]
    assert not missing, f"requirements not pinned in constraints.txt: {missing}"

@pytest.mark.slow
def test_wheel_installs_and_imports_without_notebooks(tmp_path):
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    whl = next(dist.glob("avar_net-*.whl"))
    env = tmp_path / "venv"; venv.create(env, system_site_packages=True, with_pip=True)
    py = env / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(whl)], check=True)
    code = "import avar_net, avar_net.core as c, sys; print(avar_net.__version__, avar_net.__file__)"
    out = subprocess.run([py, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert str(env) in out, f"imported the checkout instead of the wheel: {out}"
    # the console script is installed with the wheel
    assert (env / "bin" / "avar-net").exists()
