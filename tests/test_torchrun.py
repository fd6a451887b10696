"""Extraction with several processes: the shard from RANK/WORLD_SIZE, per-shard records, one manifest complete once
every rank is done, a dead rank re-run alone; and every multi-process command of README.md run exactly as written."""
import json, os, re, subprocess, sys
from pathlib import Path

import pytest

from avar_net.core import sha256_file
from avar_net.synth import generate_synthxd

ROOT = Path(__file__).resolve().parents[1]
EXTRACT_YAML = ("audio-backbone: random-tiny\nvideo-backbone: random-tiny\nprecision: fp32\ndevice: cpu\n"
                "no-progress: true\n")
TRAIN_YAML = ("epochs: 2\nbatch-size: 4\ndevice: cpu\nnum-stages: 1\nnum-layers: 2\nnum-f-maps: 8\nno-progress: true\n")


def env(**kw):
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + e.get("PYTHONPATH", ""), **kw)
    return e


def extract(data, out, cfg, *extra, **envkw):
    return subprocess.Popen([sys.executable, "-m", "avar_net.cli", "extract", str(data), str(out), "--xd", "--config",
                             str(cfg), *extra],
                            env=env(**envkw), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p):
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def xd_root(tmp_path_factory):
    return Path(generate_synthxd(tmp_path_factory.mktemp("xd") / "XD-Violence", "tiny", seed=0, train=(2, 1),
                                 test=(1, 1)))


@pytest.mark.slow
def test_ranks_from_env_dead_rank_rerun_alone(xd_root, tmp_path):
    cfg = tmp_path / "extract.yaml"; cfg.write_text(EXTRACT_YAML)
    out = tmp_path / "features"
    # ranks 0 and 2 of 3 run (plain env vars, as torchrun sets them); rank 1 "dies" before it starts
    procs = [extract(xd_root, out, cfg, RANK=str(r), WORLD_SIZE="3", LOCAL_RANK=str(r)) for r in (0, 2)]
    s0, s2 = [finish(p) for p in procs]
    assert (s0["shard"], s2["shard"]) == ("0/3", "2/3")
    m = json.loads((out / "manifest.json").read_text())
    assert not m["complete"] and m["shards"] == {"3": {"done": [0, 2], "missing": [1]}}
    assert m["counts"]["missing"] > 0
    before = {p.name: sha256_file(p) for p in (out / "status").glob("*.json")}
    # the dead rank alone, by --shard (no torchrun): only its clips are computed, nothing else is touched
    s1 = finish(extract(xd_root, out, cfg, "--shard", "1/3"))
    assert s1["n_computed"] == s1["n_shard"] > 0 and s1["n_skipped"] == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["shards"] == {"3": {"done": [0, 1, 2], "missing": []}} and m["counts"]["missing"] == 0
    assert all(sha256_file(out / "status" / n) == h for n, h in before.items())
    # (a --shard that contradicts torchrun's rank is refused: nbs/05a_extract.ipynb, launch_shard)


def readme_multiprocess_commands() -> list[str]:
    "Every command line of README.md that starts more than one process (torchrun)."
    text = (ROOT / "README.md").read_text()
    return [l.strip() for l in text.splitlines() if re.match(r"\s*torchrun\b", l)]


@pytest.mark.slow
def test_readme_multiprocess_commands_run_as_written(xd_root, tmp_path):
    cmds = readme_multiprocess_commands()
    assert cmds, "README shows no torchrun command"
    (tmp_path / "data").mkdir(); os.symlink(xd_root, tmp_path / "data" / "XD-Violence")
    (tmp_path / "extract.yaml").write_text(EXTRACT_YAML); (tmp_path / "train.yaml").write_text(TRAIN_YAML)
    for c in cmds:
        r = subprocess.run(["bash", "-c", c], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{c}\n{r.stderr[-3000:]}"
    m = json.loads((tmp_path / "features" / "xd" / "manifest.json").read_text())
    assert m["complete"] and m["shards"] == {"2": {"done": [0, 1], "missing": []}}
    res = json.loads((tmp_path / "runs" / "xd" / "result.json").read_text())
    assert res["world_size"] == 2 and res["epochs_run"] == 2
