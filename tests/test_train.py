"""Tests for avar_net.train, avar_net.evaluation and avar_net.runtime: determinism, learning, evaluation, resume,
refusing bad checkpoints, DDP (2 gloo processes)."""
import json, os, pickle, shutil, subprocess, sys, textwrap
from pathlib import Path

import pytest
import torch

from avar_net.core import ConfigError, DataError, WeightsError, sha256_file
from avar_net.train import TrainConfig, train, carve_val_split
from avar_net.evaluation import evaluate, load_run
from avar_net.runtime import load_checkpoint, checkpoint_problem
from avar_net.testing import write_synthetic_features

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_stages=2, num_layers=3, num_f_maps=16, dropout=0.1)


pytestmark = pytest.mark.usefixtures("one_thread")   # the fixture is in conftest.py


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    return write_synthetic_features(tmp_path_factory.mktemp("f") / "feats", n_per_class=6, seed=0)


def read_metrics(run):
    return [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def tensors(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def same_tensors(a, b):
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def rewrite_checksums(d):
    d = Path(d)
    sums = json.loads((d / "checksums.json").read_text())
    (d / "checksums.json").write_text(json.dumps({f: sha256_file(d / f) for f in sums}))


def test_deterministic_same_seed_same_numbers(feats, tmp_path):
    tc = TrainConfig(epochs=3, batch_size=8, lr=1e-2, seed=5)
    r1 = train(feats, tmp_path / "a", SMALL, tc, progress=False)
    r2 = train(feats, tmp_path / "b", SMALL, tc, progress=False)
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()
    assert same_tensors(tmp_path / "a/checkpoints/last/model.safetensors",
                        tmp_path / "b/checkpoints/last/model.safetensors")
    same = lambda r: {k: v for k, v in r.items() if k not in ("run_dir", "seconds")}
    assert same(r1) == same(r2)
    train(feats, tmp_path / "c", SMALL, TrainConfig(epochs=3, batch_size=8, lr=1e-2, seed=6), progress=False)
    assert read_metrics(tmp_path / "c") != read_metrics(tmp_path / "a")
    json.dumps(r1)


def test_learns_far_above_chance_and_evaluate(feats, tmp_path):
    res = train(feats, tmp_path / "run", SMALL, TrainConfig(epochs=10, batch_size=8, lr=1e-2, seed=0), progress=False)
    hist = read_metrics(tmp_path / "run")
    assert len(hist) == 10 and [h["epoch"] for h in hist] == list(range(1, 11))
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    ev = evaluate(tmp_path / "run", feats, "test")
    assert ev["accuracy"] >= 0.6 and ev["macro_f1"] >= 0.5, ev    # chance: 0.1
    assert ev["epoch"] == res["best_epoch"] and ev["n"] == 10 and len(ev["confusion"]) == 10
    json.dumps(ev)
    # best epoch chosen on validation (macro F1, first of ties), never on test
    best = max(hist, key=lambda h: (h["val_macro_f1"], -h["epoch"]))
    assert res["best_epoch"] == best["epoch"]
    last = evaluate(tmp_path / "run", feats, "test", checkpoint="last")
    assert last["epoch"] == 10
    layout = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert layout == ["MODEL_CARD.md", "checkpoints", "config.json", "metrics.jsonl", "result.json", "split.json"]
    assert sorted(p.name for p in (tmp_path / "run/checkpoints/last").iterdir()) == \
        ["checksums.json", "config.json", "model.safetensors", "state.pt", "trainer_state.json"]
    cfg = json.loads((tmp_path / "run/config.json").read_text())
    assert cfg["features"]["config"]["audio_backbone"] == "synthetic" and cfg["class_names"][6] == "Normal"


def test_interrupted_then_resumed_equals_uninterrupted(feats, tmp_path):
    "In-process interruption after an epoch (the SIGKILL version is in test_train_kill.py)."
    tc = TrainConfig(epochs=4, batch_size=8, lr=1e-2, seed=1, patience=10)
    train(feats, tmp_path / "full", SMALL, tc, progress=False)

    class Stop(Exception): pass
    def stop_after(n):
        seen = []
        def log(msg):
            if msg.startswith("epoch"):
                seen.append(msg)
                if len(seen) == n: raise Stop
        return log
    with pytest.raises(Stop): train(feats, tmp_path / "cut", SMALL, tc, progress=False, log=stop_after(2))
    assert len(read_metrics(tmp_path / "cut")) == 2
    with pytest.raises(ConfigError, match="resume"): train(feats, tmp_path / "cut", SMALL, tc, progress=False)
    res = train(feats, tmp_path / "cut", resume=True, progress=False)          # configs come from the run
    assert (tmp_path / "cut/metrics.jsonl").read_text() == (tmp_path / "full/metrics.jsonl").read_text()
    for which in ("best", "last"):
        assert same_tensors(tmp_path / f"cut/checkpoints/{which}/model.safetensors",
                            tmp_path / f"full/checkpoints/{which}/model.safetensors")
    assert res["epochs_run"] == 4
    # resuming a finished run trains nothing and returns the same summary
    again = train(feats, tmp_path / "cut", resume=True, progress=False)
    assert again["best"] == res["best"] and len(read_metrics(tmp_path / "cut")) == 4


def test_resume_refuses_a_different_config(feats, tmp_path):
    tc = TrainConfig(epochs=1, batch_size=8, seed=0)
    train(feats, tmp_path / "r", SMALL, tc, progress=False)
    with pytest.raises(ConfigError, match="lr"):
        train(feats, tmp_path / "r", SMALL, TrainConfig(epochs=1, batch_size=8, seed=0, lr=1e-3), resume=True,
              progress=False)
    with pytest.raises(ConfigError, match="num_f_maps"):
        train(feats, tmp_path / "r", {**SMALL, "num_f_maps": 8}, tc, resume=True, progress=False)
    # device / workers may change
    train(feats, tmp_path / "r", SMALL, TrainConfig(epochs=1, batch_size=8, seed=0, device="cpu"), resume=True,
          progress=False)


def test_early_stopping(feats, tmp_path):
    res = train(feats, tmp_path / "r", SMALL, TrainConfig(epochs=30, batch_size=8, lr=1e-2, seed=0, patience=2,
                                                          select_on="loss"), progress=False)
    hist = read_metrics(tmp_path / "r")
    assert res["stopped_early"] and len(hist) < 30 and res["epochs_run"] == res["best_epoch"] + 2
    assert not hist[-1]["improved"] and not hist[-2]["improved"]
    assert res["best_score"] == min(h["val_loss"] for h in hist)


def test_model_config_checks(feats, tmp_path):
    with pytest.raises(ConfigError, match="audio_dim"):
        train(feats, tmp_path / "r", {**SMALL, "audio_dim": 3}, TrainConfig(epochs=1), progress=False)
    with pytest.raises(ConfigError, match="optimizer"): TrainConfig(optimizer="sgd")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corrupt_and_tampered_checkpoints_refused(feats, tmp_path):
    run = tmp_path / "r"
    train(feats, run, SMALL, TrainConfig(epochs=2, batch_size=8, seed=0), progress=False)
    good = tmp_path / "good"; shutil.copytree(run, good)

    # 1. a flipped byte in the weights: checksum mismatch
    with open(run / "checkpoints/best/model.safetensors", "r+b") as f:
        f.seek(-20, 2); b = f.read(1); f.seek(-20, 2); f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(WeightsError, match="checksum"): evaluate(run, feats, "test")
    # 2. truncated file with checksums rewritten: safetensors refuses to parse
    p = run / "checkpoints/best/model.safetensors"
    p.write_bytes(p.read_bytes()[:100]); rewrite_checksums(p.parent)
    with pytest.raises(WeightsError, match="safetensors"): evaluate(run, feats, "test")

    # 3. config.json that does not match the tensors (checksums rewritten)
    shutil.rmtree(run); shutil.copytree(good, run)
    c = run / "checkpoints/best/config.json"
    cfg = json.loads(c.read_text()); cfg["num_f_maps"] = 32; c.write_text(json.dumps(cfg)); rewrite_checksums(c.parent)
    with pytest.raises(WeightsError): evaluate(run, feats, "test")

    # 4. a pickle that would run code in place of state.pt (checksums rewritten): weights_only refuses, nothing runs
    shutil.rmtree(run); shutil.copytree(good, run)
    marker = tmp_path / "pwned"
    class Evil:
        def __reduce__(self): return (os.system, (f"touch {marker}",))
    sp = run / "checkpoints/last/state.pt"
    with open(sp, "wb") as f: pickle.dump({"optimizer": Evil(), "scheduler": {}, "rng": {}}, f)
    rewrite_checksums(sp.parent)
    with pytest.raises(WeightsError, match="refused"):
        train(feats, run, resume=True, progress=False)
    assert not marker.exists()
    with pytest.raises(WeightsError, match="refused"): load_checkpoint(run / "checkpoints/last")

    # 5. no checksums at all (e.g. a half-written folder): not a checkpoint
    shutil.rmtree(run); shutil.copytree(good, run)
    (run / "checkpoints/best/checksums.json").unlink()
    assert "checksums" in checkpoint_problem(run / "checkpoints/best")
    with pytest.raises(WeightsError): load_run(run)
    # the untouched copy still evaluates
    assert "accuracy" in evaluate(good, feats, "test")


def test_evaluate_refuses_other_features(feats, tmp_path):
    train(feats, tmp_path / "r", SMALL, TrainConfig(epochs=1, batch_size=8), progress=False)
    other = write_synthetic_features(tmp_path / "other", n_per_class=3, seed=0, audio_dim=5)
    with pytest.raises(ConfigError, match="configuration"): evaluate(tmp_path / "r", other, "test")
    with pytest.raises(DataError, match="split"): evaluate(tmp_path / "r", feats, "nosuchsplit")


def test_xd_task_frame_ap(tmp_path):
    fd = write_synthetic_features(tmp_path / "xd", n_per_class=16, seed=1, xd=True, T=(8, 20))
    res = train(fd, tmp_path / "r", SMALL, TrainConfig(epochs=4, batch_size=8, lr=1e-2), progress=False)
    assert res["select_on"] == "video_ap" and res["val_source"].startswith("carved") and res["n_val"] > 0
    split = json.loads((tmp_path / "r/split.json").read_text())
    assert not set(split["train"]) & set(split["val"])
    ev = evaluate(tmp_path / "r", fd, "test")
    assert {"ap_official", "ap_stepwise", "roc_auc", "video_ap"} <= set(ev) and ev["ap"] == ev["ap_official"]
    assert ev["n_frames"] == sum(16 * r["T"] for r in json.loads((fd / "manifest.json").read_text())["clips"].values()
                                 if r["split"] == "test")
    # a misaligned cache (n_frames of a test video changed): hard error, never truncation
    m = json.loads((fd / "manifest.json").read_text())
    cid = next(c for c, r in m["clips"].items() if r["split"] == "test")
    m["clips"][cid]["n_frames"] += 16
    (fd / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="mismatch"): evaluate(tmp_path / "r", fd, "test")


def test_carved_split_is_deterministic_and_stratified():
    recs = [{"clip_id": f"v{i}", "label": int(i < 12)} for i in range(40)]
    a = carve_val_split(recs, 0.25, seed=3)
    assert a == carve_val_split(recs, 0.25, seed=3)
    assert sum(int(c[1:]) < 12 for c in a[1]) == 3 and len(a[1]) == 10


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from avar_net.train import TrainConfig, train
    feats, run = sys.argv[1], sys.argv[2]
    train(feats, run, dict(num_stages=2, num_layers=3, num_f_maps=16, dropout=0.0),
          TrainConfig(epochs=3, batch_size=3, lr=5e-3, seed=0, class_weights=True), progress=False)
""")


@pytest.mark.slow
def test_ddp_two_gloo_processes_equal_one_process(tmp_path):
    # 40 training clips, global batch 3 = 2 + 1 per rank; the last global batch has 1 clip, so rank 1 runs a weight-0
    # filler. dropout=0: dropout draws differ with the rank layout by design (documented in the notebook).
    fd = write_synthetic_features(tmp_path / "f", n_per_class=6, seed=2)
    script = tmp_path / "ddp.py"; script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(fd), str(tmp_path / "ddp")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    train(fd, tmp_path / "one", dict(num_stages=2, num_layers=3, num_f_maps=16, dropout=0.0),
          TrainConfig(epochs=3, batch_size=3, lr=5e-3, seed=0, class_weights=True), progress=False)
    h2, h1 = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    assert len(h2) == len(h1) == 3
    for a, b in zip(h2, h1):
        for k, v in b.items():
            if isinstance(v, float): assert a[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (k, a[k], v)
            else: assert a[k] == v, k
    w2 = tensors(tmp_path / "ddp/checkpoints/last/model.safetensors")
    w1 = tensors(tmp_path / "one/checkpoints/last/model.safetensors")
    for k in w1: torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    cfg = json.loads((tmp_path / "ddp/config.json").read_text())
    assert cfg["world_size"] == 2
