"""Tests of avar_net.bench_report: the targets, the run's argument checks, the report, and the CLI's
`bench --quick --json` schema. Nothing here asserts a speed (machines are shared and noisy)."""
import json, math, os, shutil, subprocess, sys

import numpy as np
import pytest

from avar_net.bench_report import TARGETS, check_targets, efficiency_table, format_bench, roofline_figure, run_bench

BACKBONE_KEYS = ("baseline_s", "ours_s", "speedup", "cosine", "gflop", "baseline_gflops", "ours_gflops",
                 "roofline_fraction", "path")


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
    with pytest.raises(Exception, match="repeats"): run_bench(quick=True, repeats=0)
    with pytest.raises(Exception, match="threads"): run_bench(quick=True, threads=0)


# ---------------------------------------------------------------- report
def _fake_result():
    bb = dict(baseline_s=2.0, ours_s=0.8, speedup=2.5, cosine=0.999, cosine_min=0.99, gflop=58.0, baseline_gflops=29.0,
              ours_gflops=72.5, roofline_fraction=0.5, baseline_roofline_fraction=0.2, path="bf16+channels_last",
              params=5_600_000, call="16 frames at 256 px", throughput=20.0, baseline_throughput=8.0,
              throughput_unit="frames/s")
    res = {"quick": False, "repeats": 5, "device": "cpu", "cpu_model": "Test CPU", "torch_version": "2.x",
           "machine": {"torch_threads": 2, "cpu_count": 2}, "load_before": [1.0, 1, 1], "load_after": [1.5, 1, 1],
           "roofline": {"n": 2048}, "roofline_gflops": 150.0, "roofline_bf16_gflops": 300.0,
           "mobilevit": bb, "wav2vec2": {**bb, "path": "bf16", "call": "10 s of audio"},
           "decode": {"fps": 900.0, "clip_seconds_per_s": 36.0, "format": ["1280x720@25"], "clips": 3, "seconds": 0.8},
           "pipeline": {"clip_s_per_wall_s": 3.0, "pipeline_s": 10.0, "backbones_s": 9.0, "clips": 3,
                        "clip_seconds": 30.0},
           "pipeline_overhead": 10 / 9,
           "train": {"steps_per_s": 4.0, "step_s": 0.25, "params": 800_000, "gflop_forward": 2.0,
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
    assert row["speedup"] == 2.5 and row["latency_ms"] == pytest.approx(800.0)
    assert row["roofline_pct"] == pytest.approx(50.0)
    res = _fake_result()
    res["mobilevit"] = {**res["mobilevit"], "roofline_local": {"fp32": 120.0, "bf16": 240.0, "n": 2048}}
    fig = roofline_figure(res)
    assert type(fig).__name__ == "Figure" and len(fig.axes) == 1
    ys = {round(float(seg[0][1])) for c in fig.axes[0].collections for seg in c.get_segments()}
    assert ys == {120, 240, 150, 300}    # ceilings measured alongside MobileViT, the roofline section's for training


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
    for k in ("clip_s_per_wall_s", "backbones_s", "pipeline_s"):
        assert _is_num(res["pipeline"][k]) and res["pipeline"][k] > 0
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
