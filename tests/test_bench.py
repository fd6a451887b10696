"""Tests of avar_net.bench: helpers, the child-process memory harness and test media. Nothing here asserts a speed
(machines are shared and noisy)."""
import json, math, sys
from pathlib import Path

import numpy as np
import pytest

from avar_net.bench import (bench_decode, cosine, interleave, make_bench_video, make_long_video, median,
                            peak_rss_subprocess, ratio)
from avar_net.core import json_safe


# ---------------------------------------------------------------- helpers
def test_median_and_ratio():
    assert median([5, 1, 3]) == 3.0 and median([1, 2, 3, 10]) == 2.5 and median((2.0,)) == 2.0
    with pytest.raises(Exception, match="empty"): median([])
    assert ratio(3, 2) == 1.5
    assert math.isnan(ratio(1, 0)) and math.isnan(ratio(1, float("nan")))


def test_interleave_order_warmup_and_counts():
    calls = []
    t = interleave({"A": lambda: calls.append("A"), "B": lambda: calls.append("B")}, repeats=5, warmup=2)
    assert calls == ["A", "B"] * 7                       # 2 warm-up rounds, then A B A B … 5 times
    assert [len(t["A"]), len(t["B"])] == [5, 5] and min(t["A"] + t["B"]) >= 0
    with pytest.raises(Exception, match="repeats"): interleave({"A": lambda: 0}, repeats=0)


def test_cosine_rowwise_mean_and_min():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 10))
    b = a.copy(); b[2] = -b[2]                          # one row flipped
    c = cosine(a, b)
    assert c["min"] == pytest.approx(-1.0) and c["mean"] == pytest.approx((5 - 1) / 6)
    assert cosine(a, 2.5 * a)["min"] == pytest.approx(1.0)
    with pytest.raises(Exception, match="shapes"): cosine(a, a[:, :5])


def test_json_safe_makes_strict_json():
    obj = {"a": float("nan"), "b": [np.float32(1.5), np.int64(3), (1, float("inf"))], "c": Path("/x"),
           "d": np.bool_(True)}
    out = json_safe(obj)
    assert out == {"a": None, "b": [1.5, 3, [1, None]], "c": "/x", "d": True}
    json.dumps(out, allow_nan=False)


# ---------------------------------------------------------------- memory harness
def test_peak_rss_of_child_is_the_child_s_own():
    hog = np.ones(300 * 2**20, np.uint8)                 # this process is big: a forked child would inherit its max RSS
    child = "import numpy as np; a = np.ones(200 * 2**20, np.uint8); print(a[::4096].sum())"
    big = peak_rss_subprocess([sys.executable, "-c", child])
    small = peak_rss_subprocess([sys.executable, "-c", "print('hi')"])
    assert big["returncode"] == 0 and big["stdout"].strip() == str(200 * 2**20 // 4096)
    assert 200 < big["peak_rss_mb"] < 300 + 200, big["peak_rss_mb"]
    assert small["peak_rss_mb"] < 100, small["peak_rss_mb"]
    assert small["stdout"].strip() == "hi"
    del hog


def test_peak_rss_reports_failures_and_timeouts():
    r = peak_rss_subprocess([sys.executable, "-c", "import sys; print('x', file=sys.stderr); sys.exit(4)"])
    assert r["returncode"] == 4 and "x" in r["stderr"] and not r["timed_out"]
    r = peak_rss_subprocess([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=1)
    assert r["timed_out"] and r["wall_s"] < 30


# ---------------------------------------------------------------- media
def test_bench_video_and_long_video_remux(tmp_path):
    import av
    p = make_bench_video(tmp_path / "c.mp4", seconds=1.0, width=192, height=108, fps=12)
    with av.open(str(p)) as c:
        v = c.streams.video[0]
        assert (v.width, v.height, v.codec_context.name) == (192, 108, "h264")
        assert sum(1 for _ in c.decode(video=0)) == 12 and c.streams.audio[0].rate == 48000
    lv = make_long_video(seconds=4.0, width=128, height=72, fps=6, segment_s=1.0, cache_dir=tmp_path)
    with av.open(str(lv)) as c:
        ts = [float(f.pts * f.time_base) for f in c.decode(video=0)]
    assert len(ts) == 24 and ts == sorted(ts) and ts[-1] == pytest.approx(23 / 6, abs=1e-3)
    mtime = lv.stat().st_mtime_ns
    assert make_long_video(seconds=4.0, width=128, height=72, fps=6, segment_s=1.0, cache_dir=tmp_path) == lv
    assert lv.stat().st_mtime_ns == mtime                # reused from the cache, not rebuilt
    d = bench_decode([p], repeats=1, warmup=0)
    assert d["frames"] == 12 and d["clip_seconds"] == pytest.approx(1.0, abs=0.05) and d["fps"] > 0
