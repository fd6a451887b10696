"""Tests for avar_net.stream (`avar-net watch`): a SynthXD video watched from a file (as fast as possible and at
real-time pace) and served live over TCP on 127.0.0.1 by a local process that is killed mid-stream and restarted."""
import json, os, signal, socket, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch

from avar_net.stream import Watcher, finetune_on_steps, read_jsonl, synthxd_segments

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")   # the fixture is in conftest.py


@pytest.fixture(scope="module")
def xd(tmp_path_factory):
    "SynthXD tiny, random-tiny features, an XD run fine-tuned on SynthXD's step labels (a model that localises)."
    torch.set_num_threads(1)
    from avar_net.synth import generate_synthxd
    from avar_net.features import FeatureConfig
    from avar_net.extract import extract_dataset
    from avar_net.train import TrainConfig, train
    from avar_net.infer import Predictor
    t = tmp_path_factory.mktemp("stream")
    root = generate_synthxd(t / "xd", "tiny", seed=0, train=(16, 16), test=(1, 1))
    cfg = FeatureConfig(audio_backbone="random-tiny", video_backbone="random-tiny", xd=True)
    assert extract_dataset(root, t / "f", cfg, progress=False)["n_failed"] == 0
    train(t / "f", t / "run", dict(num_stages=2, num_layers=5, num_f_maps=32, dropout=0.1),
          TrainConfig(epochs=2, batch_size=4, lr=1e-3), progress=False)
    finetune_on_steps(t / "run", t / "f", synthxd_segments(root), epochs=15, lr=2e-3)
    videos = [root / l for l in (root / "test.list").read_text().split()]
    return {"root": root, "run": t / "run", "violent": videos[0], "normal": videos[1], "tmp": t,
            "segments": synthxd_segments(root), "pred": Predictor(t / "run", device="cpu")}


def _overlap(a, b) -> float: return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def test_alerts_overlap_annotated_anomalies(xd, tmp_path):
    p = xd["pred"]
    w = Watcher(p, xd["violent"], out=tmp_path / "v.jsonl", min_duration=0.6, save_clips=tmp_path / "clips")
    s = w.run()
    steps, events = read_jsonl(tmp_path / "v.jsonl")
    test_T = len(p.predict(xd["violent"])["step_scores"])
    assert [x["step"] for x in steps] == list(range(len(steps))) and len(steps) >= test_T     # no line lost
    assert s["steps"] == len(steps) and events[-1]["event"] == "summary" and s["stopped_by"] == "end of file"
    alerts = [(e["start"], e["end"]) for e in events if e["event"] == "alert_end"]
    gt = [(a / 24, b / 24) for a, b in xd["segments"][xd["violent"].stem]]
    assert alerts, [x["score"] for x in steps]
    for g in gt:
        assert any(_overlap(a, g) > 0 for a in alerts), (alerts, gt)                  # every anomaly is alerted
    inside = sum(_overlap(a, g) for a in alerts for g in gt) / sum(a[1] - a[0] for a in alerts)
    assert inside >= 0.5, (alerts, gt)                                            # and alerts are mostly on it
    from avar_net.decode import probe
    clips = [e["clip"] for e in events if e["event"] == "alert_end"]
    assert all(probe(c).has_audio for c in clips) and not list((tmp_path / "clips").glob(".*"))
    # the normal test video raises no alert
    s2 = Watcher(p, xd["normal"], out=tmp_path / "n.jsonl", min_duration=0.6).run()
    assert s2["alerts"] == 0 and s2["steps"] >= 10


def test_realtime_pace(xd, tmp_path):
    from avar_net.testing import make_test_media
    clip = make_test_media(tmp_path / "rt.mp4", duration_s=2.0, fps=24, size=(64, 64), sr=16000, channels=1)
    t0 = time.monotonic()
    s = Watcher(xd["pred"], clip, out=tmp_path / "rt.jsonl", realtime=True).run()
    wall = time.monotonic() - t0
    assert s["steps"] == 3 and wall >= 1.8, (s, wall)                # 2 s of video take >= 2 s minus the last frame
    assert s["latency_s"]["max"] < 1.5, s["latency_s"]               # tiny model: scores follow the frames closely


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _serve(ts, port, duration, *extra):
    p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_stream_server.py"), str(ts), str(port), str(duration),
                          "1.0", *extra],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "listening"
    return p


def _to_mpegts(src, dst):
    import av
    with av.open(str(src)) as i, av.open(str(dst), "w", format="mpegts") as o:
        m = {s: o.add_stream_from_template(s) for s in i.streams}
        for pk in i.demux():
            if pk.dts is None: continue
            pk.stream = m[pk.stream]; o.mux(pk)
    return dst


def _wait_for(path, cond, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        lines = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
        if cond(lines): return lines
        time.sleep(0.2)
    raise AssertionError(f"timed out; last lines: {lines[-3:] if lines else None}")


def test_live_tcp_reconnect_gap_and_sigterm(xd, tmp_path):
    """Kill the server mid-stream and restart it: watch reconnects, records the gap, loses no line, exits cleanly on
    SIGTERM."""
    from avar_net.decode import probe
    ts = _to_mpegts(xd["violent"], tmp_path / "live.ts")
    dur, port = probe(ts).duration_s, _free_port()
    out = tmp_path / "live.jsonl"
    server = _serve(ts, port, dur)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    watch = subprocess.Popen([sys.executable, "-m", "avar_net.cli", "watch", f"tcp://127.0.0.1:{port}", "--model",
                              str(xd["run"]),
                              "--out", str(out), "--stall-timeout", "3", "--max-outage", "30"], env=env,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out, lambda ls: sum("step" in l for l in ls) >= 3, 90)
        server.kill(); server.wait()                                          # the stream drops mid-way
        time.sleep(1.0)
        server = _serve(ts, port, dur)                                        # and comes back
        def _gap_end(ls): return next(l for l in ls if l.get("event") == "gap")["end"]
        _wait_for(out, lambda ls: any(l.get("event") == "gap" for l in ls)
                  and "step" in ls[-1] and ls[-1]["step"] >= _gap_end(ls) / (2 / 3) + 1, 60)
        watch.send_signal(signal.SIGTERM)
        _, err = watch.communicate(timeout=30)
    finally:
        server.kill(); watch.kill()
    assert watch.returncode == 0, err
    assert "stopped by SIGTERM" in err and len(err.strip().splitlines()) == 1, err
    lines = [json.loads(l) for l in out.read_text().splitlines()]           # every line is whole JSON
    assert lines[-1]["event"] == "summary" and lines[-1]["stopped_by"] == "SIGTERM" and lines[-1]["gaps"] >= 1
    steps = [l for l in lines if "step" in l]
    ks = [l["step"] for l in steps]
    assert ks == sorted(set(ks)) and ks[0] == 0
    gaps = [l for l in lines if l.get("event") == "gap"]
    step_s = lines[-1]["step_s"]
    holes = [(a, b) for a, b in zip(ks, ks[1:]) if b != a + 1]             # missing steps are exactly the recorded gaps
    assert len(holes) == len(gaps)
    for (a, b), g in zip(holes, gaps):
        assert g["start"] == pytest.approx((a + 1) * step_s, abs=1e-5)
        assert g["end"] == pytest.approx(b * step_s, abs=1e-5)
        assert g["steps_without_score"] == b - a - 1 and g["duration_s"] > 0.9 and g["reconnect_attempts"] >= 1
    assert sum(l.get("event") == "connected" for l in lines) == lines[-1]["connections"] >= 2
    assert lines[-1]["steps"] == len(steps)


def test_a_stalled_stream_is_dropped_retried_and_given_up(xd, tmp_path):
    "The server goes silent with the connection open: after the stall timeout watch reconnects, then gives up."
    from avar_net.decode import probe
    ts = _to_mpegts(xd["violent"], tmp_path / "stall.ts")
    port = _free_port()
    server = _serve(ts, port, probe(ts).duration_s, "0.6")
    try:
        w = Watcher(xd["pred"], f"tcp://127.0.0.1:{port}", out=tmp_path / "s.jsonl", stall_timeout_s=1.0,
                    max_outage_s=2.0)
        s = w.run()
    finally: server.kill()
    steps, events = read_jsonl(tmp_path / "s.jsonl")
    assert s["stopped_by"] == "gave up reconnecting" and w.exit_code == 1 and s["gaps"] == 1 and len(steps) >= 3
    drop = next(e for e in events if e["event"] == "disconnected")
    assert "stalled" in drop["reason"] and drop["t"] == pytest.approx(len(steps) * s["step_s"], abs=1e-5)
    assert events[-2]["event"] in ("gap", "alert_end") and any(e["event"] == "gap" and e["end"] is None for e in events)


def test_corrupt_packets_cost_only_themselves(xd, tmp_path):
    ts = _to_mpegts(xd["violent"], tmp_path / "c.ts")
    data = bytearray(ts.read_bytes())
    rng = np.random.default_rng(0)
    for off in (len(data) // 3, len(data) // 2):
        data[off:off + 3000] = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.ts"; bad.write_bytes(bytes(data))
    s = Watcher(xd["pred"], bad, out=tmp_path / "c.jsonl").run()
    steps, _ = read_jsonl(tmp_path / "c.jsonl")
    assert s["stopped_by"] == "end of file" and s["steps"] >= 8
    assert [x["step"] for x in steps] == list(range(len(steps)))


def test_bad_arguments_and_unreachable_sources(xd, capsys):
    from avar_net.cli import main
    port = _free_port()                                                        # nothing listens there
    assert main(["watch", f"tcp://127.0.0.1:{port}", "--model", str(xd["run"]), "--stall-timeout", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot open" in err and len(err.splitlines()) == 1, err
    assert main(["watch", str(xd["violent"]), "--model", str(xd["tmp"] / "nope")]) == 2
    assert main(["watch", str(xd["violent"]), "--model", str(xd["run"]), "--window", "0.1"]) == 2
    assert main(["watch", str(xd["tmp"] / "missing.mp4"), "--model", str(xd["run"])]) == 2
    assert main(["watch", "rtsp://127.0.0.1:1/x", "--model", str(xd["run"]), "--realtime"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(l.startswith("avar-net") for l in err), err
