"End to end on a generated release in the official XD-Violence layout: import-xd -> train -> evaluate, MTCN and HL-Net."
import contextlib, io, json, shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import auc, precision_recall_curve

from avar_net.cli import main
from avar_net.features import FeatureStore
from avar_net.testing import write_xd_release
from avar_net.evaluation import load_run


pytestmark = pytest.mark.usefixtures("one_thread")   # the fixture is in conftest.py


def cli(*argv):
    "Run `avar-net argv`; returns (exit code, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    d = tmp_path_factory.mktemp("xd")
    rel = write_xd_release(d / "release", n_train=16, n_test=6, rgb_dim=16, audio_dim=8, seed=1)
    rc, out, err = cli("import-xd", rel["list_dir"], rel["feature_root"], d / "cache", "--rgb-dim", 16, "--audio-dim",
                       8)
    assert rc == 0, err
    return d, rel, json.loads(out), err


def direct_ap(run, cache, rel):
    "The official AP computed by hand: five crops' sigmoid averaged per snippet, x16, gt from the generator's truth."
    model, _ = load_run(run, device="cpu"); fs = FeatureStore(cache)
    scores, gt = [], []
    for v in sorted((v for v in rel["videos"] if v["split"] == "test"), key=lambda v: -v["label"]):
        crops = [fs.load(f"{v['name']}__{k}") for k in range(5)]
        with torch.no_grad():
            o = model(torch.stack([c["audio"] for c in crops]), torch.stack([c["video"] for c in crops]))
        logit = o["stage_logits"][-1, ..., 1] - o["stage_logits"][-1, ..., 0]
        scores.append(np.repeat(torch.sigmoid(logit).mean(0).numpy(), 16))
        y = np.zeros(16 * v["T_used"])
        if v["label"]:
            idx = np.flatnonzero(v["y"]); y[16 * idx[0]:16 * (idx[-1] + 1)] = 1
        gt.append(y)
    p, r, _ = precision_recall_curve(np.concatenate(gt), np.concatenate(scores))
    return auc(r, p), len(np.concatenate(gt))


def test_import_names_every_bad_file(imported):
    d, rel, s, err = imported
    assert s["n_clips"] == 22 * 5 and s["n_failed"] == 7 and s["complete"]
    for name in rel["damage"].values(): assert name in err           # named on stderr
    m = json.loads((d / "cache" / "manifest.json").read_text())
    assert {f["source"] for f in m["failures"]} >= {rel["damage"]["missing"], rel["damage"]["truncated"]}
    rc, out, _ = cli("import-xd", rel["list_dir"], rel["feature_root"], d / "cache", "--rgb-dim", 16, "--audio-dim", 8)
    assert rc == 0 and json.loads(out)["n_computed"] == 0 and json.loads(out)["n_skipped"] == 22 * 5 - 7


@pytest.mark.parametrize("temporal,extra", [("mtcn", ["--num-stages", 2, "--num-layers", 3, "--num-f-maps", 8]),
                                            ("hlnet", ["--dropout", 0.6])])
def test_train_evaluate(imported, temporal, extra):
    d, rel, _, _ = imported
    run = d / f"run_{temporal}"
    rc, out, err = cli("train", d / "cache", run, "--temporal", temporal, "--epochs", 3, "--batch-size", 8, "--lr",
                       1e-3, "--device", "cpu", "--no-progress", *extra)
    assert rc == 0, err
    split = json.loads((run / "split.json").read_text())
    vids = lambda ids: {c.rsplit("__", 1)[0] for c in ids}
    assert not vids(split["train"]) & vids(split["val"])                 # whole videos held out, never test
    assert not any("_label_" in c and c.rsplit("__", 1)[0] in {v["name"] for v in rel["videos"] if v["split"] == "test"}
                   for c in split["train"] + split["val"])
    rc, out, err = cli("evaluate", run, d / "cache", "--json")
    assert rc == 0, err
    ev = json.loads(out)
    ap, n = direct_ap(run, d / "cache", rel)
    assert ev["n_frames"] == n == 16 * sum(v["T_used"] for v in rel["videos"] if v["split"] == "test")
    assert ev["n_videos_scored"] == 6 and ev["n"] == 30
    assert ev["ap_official"] == pytest.approx(ap, abs=1e-6)
    assert 0 < ev["ap_stepwise"] <= 1 and ev["ap"] == ev["ap_official"]
    # a ready gt.npy: the right one gives the same AP, a wrong length fails loudly
    gt_ok = d / f"gt_{temporal}.npy"
    from avar_net.data import parse_xd_annotations, xd_frame_gt
    tests = sorted((v for v in rel["videos"] if v["split"] == "test"), key=lambda v: -v["label"])
    np.save(gt_ok, xd_frame_gt([v["name"] for v in tests], [16 * v["T_used"] + 1 for v in tests],
                               parse_xd_annotations(rel["list_dir"] / "annotations.txt")))
    rc, out, err = cli("evaluate", run, d / "cache", "--json", "--gt", gt_ok)
    assert rc == 0 and json.loads(out)["ap_official"] == pytest.approx(ev["ap_official"])
    np.save(d / "gt_short.npy", np.load(gt_ok)[:-16])
    rc, out, err = cli("evaluate", run, d / "cache", "--gt", d / "gt_short.npy")
    assert rc == 2 and "length mismatch" in err
    (d / "x.mp4").write_bytes(b"")                                      # predict from video: refused, in one line
    rc, _, err = cli("predict", d / "x.mp4", "--model", run)
    assert rc == 2 and "import-xd" in err


def test_missing_test_crop_refuses_evaluation(imported, tmp_path):
    d, rel, _, _ = imported
    cache = tmp_path / "cache"; shutil.copytree(d / "cache", cache)
    v = next(v for v in rel["videos"] if v["split"] == "test")
    feat = tmp_path / "features"; shutil.copytree(rel["feature_root"], feat)
    (feat / "RGBTest" / f"{v['name']}__4.npy").unlink()
    rc, _, err = cli("import-xd", rel["list_dir"], feat, cache, "--rgb-dim", 16, "--audio-dim", 8)
    assert rc == 0 and f"{v['name']}__4.npy: not found" in err
    run = d / "run_mtcn"
    if not (run / "result.json").exists():
        assert cli("train", d / "cache", run, "--epochs", 1, "--num-stages", 1, "--num-layers", 2, "--num-f-maps", 8,
                   "--device", "cpu", "--no-progress")[0] == 0
    rc, _, err = cli("evaluate", run, cache)
    assert rc == 2 and "test video(s) not extracted" in err
    np.save(tmp_path / "gt.npy", np.zeros(16))                          # a ready gt does not hide a missing crop
    rc, _, err = cli("evaluate", run, cache, "--gt", tmp_path / "gt.npy")
    assert rc == 2 and "test clip(s) not extracted" in err


def test_killed_import_resumes(tmp_path):
    "kill -9 in the middle of an import, then run again: finished crops are kept, the rest imported, no temp file left."
    import os, signal, subprocess, sys, time
    rel = write_xd_release(tmp_path / "release", n_train=20, n_test=6, rgb_dim=1024, audio_dim=128, T=(100, 150),
                           seed=2)
    args = ["import-xd", rel["list_dir"], rel["feature_root"], tmp_path / "cache"]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, "-m", "avar_net.cli", *map(str, args)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status = tmp_path / "cache" / "status"
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < 300 and len(list(status.glob("*.json")) if status.is_dir()
                                                              else []) < 20:
        time.sleep(0.05)
    assert p.poll() is None, "the import finished before it could be killed"
    p.send_signal(signal.SIGKILL); p.wait()
    recs = [json.loads(f.read_text()) for f in status.glob("*.json")]
    n_ok_before = sum(r["status"] == "ok" for r in recs)
    assert 20 <= len(recs) < 130 and n_ok_before >= 10
    rc, out, _ = cli(*args)
    s = json.loads(out)
    assert rc == 0 and s["complete"] and s["n_failed"] == 7
    assert s["n_skipped"] == n_ok_before and s["n_skipped"] + s["n_computed"] + s["n_failed"] == 130
    assert not list((tmp_path / "cache").rglob(".*.tmp"))
    v = FeatureStore(tmp_path / "cache").verify()
    assert v["bad"] == [] and len(v["ok"]) == 123
