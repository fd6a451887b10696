"""Tests of avar_net.bench: helpers, the child-process memory harness, test media, the report, and the CLI's
`bench --quick --json` schema. Nothing here asserts a speed (machines are shared and noisy)."""
import json, math, os, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

from avar_net.bench import (TARGETS, _clean, bench_decode, check_targets, cosine, efficiency_table, format_bench,
                            interleave, make_bench_video, make_long_video, median, peak_rss_subprocess, ratio,
                            roofline_figure)

BACKBONE_KEYS = ("baseline_s", "ours_s", "speedup", "cosine", "gflop", "baseline_gflops", "ours_gflops",
                 "roofline_fraction", "path")


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


def test_check_targets_thresholds_and_missing_values():
    res = {"mobilevit": {"speedup": 2.5, "cosine": 0.98}, "wav2vec2": {"speedup": 1.6, "cosine": 0.999},
           "pipeline_overhead": 1.2, "long_video_peak_rss_mb": 1000.0}
    t = check_targets(res)
    assert set(t) == set(TARGETS)
    assert t["mobilevit_speedup"]["met"] and not t["mobilevit_cosine"]["met"] and t["wav2vec2_speedup"]["met"]
    assert not t["pipeline_overhead"]["met"] and t["long_video_rss_mb"]["met"]
    t2 = check_targets({"mobilevit": {"speedup": None}, "long_video_peak_rss_mb": float("nan")})
    assert not any(v["met"] for v in t2.values())        # unmeasured = not met


def test_run_bench_rejects_bad_arguments():
    from avar_net.bench import run_bench
    with pytest.raises(Exception, match="repeats"): run_bench(quick=True, repeats=0)
    with pytest.raises(Exception, match="threads"): run_bench(quick=True, threads=0)


def test_clean_makes_strict_json():
    obj = {"a": float("nan"), "b": [np.float32(1.5), np.int64(3), (1, float("inf"))], "c": Path("/x"), "d": np.bool_(True)}
    out = _clean(obj)
    assert out == {"a": None, "b": [1.5, 3, [1, None]], "c": "/x", "d": True}
    json.dumps(out, allow_nan=False)


# ---------------------------------------------------------------- memory harness
def test_peak_rss_of_child_is_the_child_s_own():
    hog = np.ones(300 * 2**20, np.uint8)                 # this process is big: a forked child would inherit its max RSS
    big = peak_rss_subprocess([sys.executable, "-c", "import numpy as np; a = np.ones(200 * 2**20, np.uint8); print(a[::4096].sum())"])
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


# ---------------------------------------------------------------- report
def _fake_result():
    bb = dict(baseline_s=2.0, ours_s=0.8, speedup=2.5, cosine=0.999, cosine_min=0.99, gflop=58.0, baseline_gflops=29.0,
              ours_gflops=72.5, roofline_fraction=0.5, baseline_roofline_fraction=0.2, path="bf16+channels_last",
              params=5_600_000, call="16 frames at 256 px", throughput=20.0, baseline_throughput=8.0, throughput_unit="frames/s")
    res = {"quick": False, "repeats": 5, "device": "cpu", "cpu_model": "Test CPU", "torch_version": "2.x",
           "machine": {"torch_threads": 2, "cpu_count": 2}, "load_before": [1.0, 1, 1], "load_after": [1.5, 1, 1],
           "roofline": {"n": 2048}, "roofline_gflops": 150.0, "roofline_bf16_gflops": 300.0,
           "mobilevit": bb, "wav2vec2": {**bb, "path": "bf16", "call": "10 s of audio"},
           "decode": {"fps": 900.0, "clip_seconds_per_s": 36.0, "format": ["1280x720@25"], "clips": 3, "seconds": 0.8},
           "pipeline": {"clip_s_per_wall_s": 3.0, "pipeline_s": 10.0, "backbones_s": 9.0, "clips": 3, "clip_seconds": 30.0},
           "pipeline_overhead": 10 / 9, "train": {"steps_per_s": 4.0, "step_s": 0.25, "params": 800_000, "gflop_forward": 2.0,
                                                  "batch": 16, "steps": 240, "model": "AVARNet"},
           "long_video": {"peak_rss_mb": 1500.0}, "long_video_peak_rss_mb": 1500.0, "errors": {}}
    res["targets"] = check_targets(res)
    return res


def test_format_bench_mentions_every_section_and_target():
    res = _fake_result()
    txt = format_bench(res)
    for s in ("MobileViT-S", "Wav2Vec2-base", "2.50x", "decode", "pipeline", "1.111x", "train", "long video", "1500 MB",
              "150.0 GFLOP/s", "mobilevit_speedup", "MET"):
        assert s in txt, s
    res["errors"] = {"wav2vec2": "WeightsError: boom"}; res["quick"] = True; res["note"] = "QUICK"
    txt = format_bench(res)
    assert "ERRORS" in txt and "boom" in txt and "QUICK RUN" in txt


def test_efficiency_table_and_roofline_figure():
    import matplotlib; matplotlib.use("Agg")
    df = efficiency_table(_fake_result())
    assert list(df["module"])[:2] == ["MobileViT-S (video)"] * 2 and len(df) == 7
    row = df[df["path"].str.contains("avar_net")].iloc[0]
    assert row["speedup"] == 2.5 and row["latency_ms"] == pytest.approx(800.0) and row["roofline_pct"] == pytest.approx(50.0)
    res = _fake_result()
    res["mobilevit"] = {**res["mobilevit"], "roofline_local": {"fp32": 120.0, "bf16": 240.0, "n": 2048}}
    fig = roofline_figure(res)
    assert type(fig).__name__ == "Figure" and len(fig.axes) == 1
    ys = {round(float(seg[0][1])) for c in fig.axes[0].collections for seg in c.get_segments()}
    assert ys == {120, 240, 150, 300}         # ceilings measured alongside MobileViT, and the roofline section's for training


# ---------------------------------------------------------------- the CLI, end to end (quick)
@pytest.fixture(scope="module")
def quick_cli(tmp_path_factory):
    env = dict(os.environ, HF_HUB_OFFLINE="1", AVAR_DATA_DIR=str(tmp_path_factory.mktemp("data")))
    exe = shutil.which("avar-net")                         # the console script, as a user runs it
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from avar_net.cli import main; sys.exit(main())"]
    p = subprocess.run(cmd + ["bench", "--quick", "--json", "--repeats", "2"],
                       capture_output=True, text=True, env=env, timeout=900)
    return p


def _is_num(v): return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.mark.slow
def test_cli_quick_json_is_one_object_with_every_key(quick_cli):
    p = quick_cli
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    assert len(lines) == 1                                # exactly one JSON object on stdout
    res = json.loads(lines[0])
    assert res["quick"] is True and res["errors"] == {}, res.get("errors")
    assert res["repeats"] == 2 and res["device"] == "cpu" and res["cpu_model"] and res["torch_version"]
    for k in ("roofline_gflops", "roofline_bf16_gflops", "pipeline_overhead", "long_video_peak_rss_mb"):
        assert _is_num(res[k]) and res[k] > 0, k
    for m in ("mobilevit", "wav2vec2"):
        for k in BACKBONE_KEYS[:-1]: assert _is_num(res[m][k]), (m, k)
        assert isinstance(res[m]["path"], str) and res[m]["path"]
        assert -1 <= res[m]["cosine"] <= 1 + 1e-6 and 0 < res[m]["roofline_fraction"]
        assert res[m]["speedup"] == pytest.approx(res[m]["baseline_s"] / res[m]["ours_s"])
        assert res[m]["baseline_s"] == pytest.approx(float(np.median(res[m]["baseline_runs"])))   # medians of the runs
        assert len(res[m]["baseline_runs"]) == len(res[m]["ours_runs"]) == 2
        assert _is_num(res[m]["speedup_paired"]) and _is_num(res[m]["speedup_min"])
        assert res[m]["ours_gflops"] == pytest.approx(res[m]["gflop"] / res[m]["ours_s"])
    assert res["mobilevit"]["cosine"] > 0.9 and res["wav2vec2"]["cosine"] > 0.9    # same weights on both sides
    for k in ("fps", "clip_seconds_per_s"): assert _is_num(res["decode"][k]) and res["decode"][k] > 0
    for k in ("clip_s_per_wall_s", "backbones_s", "pipeline_s"): assert _is_num(res["pipeline"][k]) and res["pipeline"][k] > 0
    assert res["pipeline_overhead"] == pytest.approx(res["pipeline"]["pipeline_s"] / res["pipeline"]["backbones_s"])
    assert _is_num(res["train"]["steps_per_s"]) and res["train"]["steps_per_s"] > 0
    assert _is_num(res["watch"]["real_time_factor"]) and res["watch"]["real_time_factor"] > 0     # avar-net watch
    assert _is_num(res["watch"]["latency_s"]["p50"]) and res["watch"]["latency_s"]["p50"] >= 0
    assert "quick" in res["long_video"]["note"] and res["long_video"]["seconds"] == 20.0
    assert set(res["targets"]) == set(TARGETS)
    for v in res["targets"].values(): assert set(v) == {"value", "op", "target", "met"} and isinstance(v["met"], bool)


@pytest.mark.slow
def test_cli_quick_text_report_from_json(quick_cli):
    res = json.loads(quick_cli.stdout)
    txt = format_bench(res)
    assert "QUICK RUN" in txt and "roofline" in txt and "MobileViT-S" in txt
