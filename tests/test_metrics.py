"Tests for avar_net.metrics: classification report, XD-Violence frame AP against brute force, efficiency."
import numpy as np
import pytest
import torch

from avar_net.core import DataError
from avar_net.metrics import (classification_metrics, xd_frame_ap, xd_snippet_to_frames, count_flops,
                              count_parameters, measure_latency, efficiency)


def brute_force_ap(scores: np.ndarray, gt: np.ndarray):
    "Precision/recall at every distinct threshold by hand; trapezoid (official) and step-wise AP."
    P = int(gt.sum())
    pts = [(0.0, 1.0)]  # the end point precision_recall_curve appends
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        tp = int(np.sum(pred & (gt == 1))); fp = int(np.sum(pred & (gt == 0)))
        pts.append((tp / P, tp / (tp + fp)))
    trap = sum((r1 - r0) * (p0 + p1) / 2 for (r0, p0), (r1, p1) in zip(pts, pts[1:]))
    step = sum((r1 - r0) * p1 for (r0, _), (r1, p1) in zip(pts, pts[1:]))
    return trap, step


def brute_force_auc(scores, gt):
    pos, neg = scores[gt == 1], scores[gt == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(25))
def test_xd_ap_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_vid = int(rng.integers(1, 6))
    lens = rng.integers(1, 10, size=n_vid)
    ties = seed % 3 == 0                       # quantised scores -> many ties
    vids = [np.round(rng.random(n), 1) if ties else rng.random(n) for n in lens]
    gt = (rng.random(int(lens.sum()) * 16) < rng.uniform(0.1, 0.6)).astype(np.int64)
    gt[0], gt[-1] = 1, 0                       # both classes present
    r = xd_frame_ap(vids, gt)
    frames = np.repeat(np.concatenate(vids), 16)
    trap, step = brute_force_ap(frames, gt)
    assert r["ap_official"] == pytest.approx(trap, abs=1e-12)
    assert r["ap_stepwise"] == pytest.approx(step, abs=1e-12)
    assert r["roc_auc"] == pytest.approx(brute_force_auc(frames, gt), abs=1e-12)
    assert r["n_frames"] == len(gt) and r["n_videos"] == n_vid


def test_xd_ap_official_and_sklearn_differ_and_named():
    rng = np.random.default_rng(1)
    vids = [rng.random(20) for _ in range(4)]
    gt = (rng.random(80 * 16) < 0.3).astype(int)
    r = xd_frame_ap(vids, gt)
    assert set(r) >= {"ap_official", "ap_stepwise", "roc_auc"}
    assert r["ap_official"] != r["ap_stepwise"]


def test_xd_five_crop_average_of_sigmoid():
    rng = np.random.default_rng(2)
    logits = [rng.normal(size=(5, n)) for n in (3, 4, 6)]
    probs = [1 / (1 + np.exp(-l)) for l in logits]
    gt = (rng.random(13 * 16) < 0.4).astype(int)
    a = xd_frame_ap(logits, gt, logits=True)
    b = xd_frame_ap([p.mean(0) for p in probs], gt)
    c = xd_frame_ap(probs, gt)
    assert a == pytest.approx(b) and b == pytest.approx(c)
    # averaging logits instead of sigmoid scores is a different (wrong) thing: the frames differ
    f1 = xd_snippet_to_frames(logits, logits=True)
    f2 = np.repeat(np.concatenate([1 / (1 + np.exp(-l.mean(0))) for l in logits]), 16)
    assert not np.allclose(f1, f2)


def test_xd_torch_scores_accepted():
    gt = np.r_[np.zeros(16), np.ones(16)]
    assert xd_frame_ap([torch.tensor([0.1, 0.9])], gt)["ap_official"] == pytest.approx(1.0)


@pytest.mark.parametrize("delta", [-16, -1, 1, 16])
def test_xd_length_mismatch_is_hard_error(delta):
    vids = [np.random.default_rng(0).random(5)]
    gt = np.r_[np.zeros(40), np.ones(40 + delta)]
    with pytest.raises(DataError, match="mismatch"):
        xd_frame_ap(vids, gt)


def test_xd_bad_inputs():
    with pytest.raises(DataError, match="NaN"):
        xd_frame_ap([np.array([0.5, np.inf])], np.r_[np.zeros(16), np.ones(16)])
    with pytest.raises(DataError, match="only"):
        xd_frame_ap([np.array([0.5, 0.2])], np.zeros(32))
    with pytest.raises(DataError, match="0 and 1"):
        xd_frame_ap([np.array([0.5, 0.2])], np.r_[np.zeros(16), 2 * np.ones(16)])
    with pytest.raises(DataError, match="shape"):
        xd_frame_ap([np.zeros((2, 2, 2))], np.zeros(32))


def test_classification_metrics_against_sklearn_and_by_hand():
    from sklearn.metrics import f1_score, precision_score
    rng = np.random.default_rng(3)
    y = rng.integers(0, 10, 200); p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 10, 200))
    m = classification_metrics(y, p, num_classes=10)
    assert m["accuracy"] == pytest.approx(np.mean(y == p))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert m["weighted_precision"] == pytest.approx(precision_score(y, p, average="weighted"))
    conf = np.zeros((10, 10), int)
    for a, b in zip(y, p): conf[a, b] += 1
    assert m["confusion"] == conf.tolist()
    # per-class recall by hand from the confusion matrix
    for i in range(10):
        assert m["per_class"][str(i)]["recall"] == pytest.approx(conf[i, i] / conf[i].sum())
        assert m["per_class"][str(i)]["support"] == conf[i].sum()
    import json; json.dumps(m)   # JSON-serialisable


def test_classification_metrics_errors():
    with pytest.raises(DataError): classification_metrics([], [])
    with pytest.raises(DataError): classification_metrics([0, 1], [0, 1, 1])
    with pytest.raises(DataError): classification_metrics([0, -1], [0, 1], num_classes=2)


def test_efficiency_linear_and_conv():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    assert count_parameters(lin) == 16 * 8 + 8
    assert count_flops(lin, x) == 2 * 4 * 16 * 8
    conv = torch.nn.Conv1d(4, 6, kernel_size=3, padding=1)
    assert count_flops(conv, torch.randn(2, 4, 10)) == 2 * 2 * 6 * 10 * 4 * 3
    lat = measure_latency(lin, (x,), repeats=7, warmup=2)
    assert lat["repeats"] == 7 and lat["latency_ms"] > 0
    e = efficiency(lin, {"input": x}, repeats=3, warmup=1)
    assert e["params"] == 136 and e["flops"] == 1024 and e["device"] == "cpu"
    assert lin.training  # mode restored
