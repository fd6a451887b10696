"""Tests for avar_net.infer: video -> features (same extractors as training) -> prediction + timeline, with and
without audio."""
import json, shutil

import numpy as np
import pytest
import torch

from avar_net.core import ConfigError, DecodeError, WeightsError
from avar_net.infer import Predictor, plot_timeline

SMALL = dict(num_stages=2, num_layers=3, num_f_maps=16, dropout=0.1)


pytestmark = pytest.mark.usefixtures("one_thread")   # the fixture is in conftest.py


@pytest.fixture(scope="module")
def vaar_run(tmp_path_factory):
    torch.set_num_threads(1)
    from avar_net.synth import generate_synthavar
    from avar_net.features import FeatureConfig
    from avar_net.extract import extract_dataset
    from avar_net.train import TrainConfig, train
    t = tmp_path_factory.mktemp("infer")
    root = generate_synthavar(t / "data", "tiny", seed=0, classes=["Normal", "Explosion", "Police siren"],
                              clips_per_class=4, duration_s=[1.0, 1.5])
    s = extract_dataset(root, t / "feats", FeatureConfig(audio_backbone="random-tiny", video_backbone="random-tiny"),
                        progress=False)
    assert s["n_failed"] == 0
    train(t / "feats", t / "run", SMALL, TrainConfig(epochs=4, batch_size=4, lr=1e-2), progress=False)
    return {"root": root, "feats": t / "feats", "run": t / "run", "tmp": t}


@pytest.fixture(scope="module")
def predictor(vaar_run):
    return Predictor(vaar_run["run"], device="cpu")


def test_predict_output(vaar_run, predictor):
    clip = sorted(vaar_run["root"].glob("*/*.mp4"))[0]
    r = predictor.predict(clip, top=None)
    json.dumps(r)
    assert r["task"] == "clip" and r["has_audio"] and r["audio_note"] is None
    probs = [p for _, p in r["top"]]
    assert len(r["top"]) == len(r["class_names"]) == 10 and probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1.0, abs=1e-5) and r["label"] == r["top"][0][0]
    T = len(r["step_times"])
    assert T == len(r["step_scores"]) == len(r["step_probs"]) and T == int(np.ceil(r["duration_s"] / 0.25 - 1e-9))
    assert r["step_s"] == 0.25 and np.allclose(np.diff(r["step_times"]), 0.25)
    normal = r["class_names"].index("Normal")
    assert np.allclose(r["step_scores"], 1 - np.asarray(r["step_probs"])[:, normal])
    assert r["step_score_kind"] == "1-p(Normal)"
    assert len(predictor.predict(clip, top=2)["top"]) == 2
    assert r["model"]["epoch"] == json.loads((vaar_run["run"] / "result.json").read_text())["best_epoch"]


def test_predict_matches_cached_features(vaar_run, predictor):
    "Same clip through the predictor and through the training cache: same features, same model outputs."
    from avar_net.features import FeatureStore
    store = FeatureStore(vaar_run["feats"])
    rec = store.records("test")[0]
    d = store.load(rec["clip_id"])
    r = predictor.predict(vaar_run["root"] / rec["source"], top=None)
    c = predictor.predict_features(d["audio"], d["video"])
    np.testing.assert_allclose(r["step_probs"], c["step_probs"], atol=1e-5)
    assert [n for n, _ in r["top"]][:3] == [n for n, _ in c["top"]][:3]


def test_clip_without_audio(vaar_run, predictor, tmp_path):
    from avar_net.synth import write_mp4
    from avar_net.decode import decode_video_frames, probe
    clip = sorted(vaar_run["root"].glob("*/*.mp4"))[0]
    _, frames = decode_video_frames(clip, 10, None)
    mute = tmp_path / "mute.mp4"
    write_mp4(mute, frames.permute(0, 2, 3, 1).numpy(), 10, audio=None)
    assert not probe(mute).has_audio
    r = predictor.predict(mute)
    assert r["has_audio"] is False and "no audio" in r["audio_note"]
    assert len(r["step_scores"]) > 0 and all(0 <= s <= 1 for s in r["step_scores"])
    png = plot_timeline(r, tmp_path / "mute.png")
    assert png == tmp_path / "mute.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_timeline(vaar_run, predictor, tmp_path):
    r = predictor.predict(sorted(vaar_run["root"].glob("*/*.mp4"))[-1])
    p = plot_timeline(r, tmp_path / "sub" / "t.png", n_thumbs=4)
    from PIL import Image
    im = Image.open(p); assert im.size[0] > 300 and im.size[1] > 150
    with pytest.raises(ConfigError, match="png"): plot_timeline(r, tmp_path / "t.jpg")


def test_bad_inputs(predictor, tmp_path):
    with pytest.raises(DecodeError, match="not found"): predictor.predict(tmp_path / "missing.mp4")
    bad = tmp_path / "text.mp4"; bad.write_text("this is not a video\n" * 10)
    with pytest.raises(DecodeError): predictor.predict(bad)
    empty = tmp_path / "empty.mp4"; empty.write_bytes(b"")
    with pytest.raises(DecodeError): predictor.predict(empty)


def test_refuses_other_extractors_and_missing_runs(vaar_run, tmp_path):
    run = tmp_path / "run"; shutil.copytree(vaar_run["run"], run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["features"]["resolved"]["video_weights"] = "mobilevit_s@sha256:0000"
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="video_weights"): Predictor(run, device="cpu")
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(WeightsError, match="checkpoint"): Predictor(run, device="cpu")
    with pytest.raises(ConfigError, match="not a training run"): Predictor(tmp_path / "nothing", device="cpu")


@pytest.mark.slow
def test_xd_predictor(tmp_path):
    "XD grid (16 frames at 24 fps): the timeline is the model's per-step score, one per snippet."
    from avar_net.synth import generate_synthxd
    from avar_net.features import FeatureConfig
    from avar_net.extract import extract_dataset
    from avar_net.train import TrainConfig, train
    root = generate_synthxd(tmp_path / "xd", "tiny", seed=0, train=[3, 3], test=[1, 1], n_frames=[100, 160])
    s = extract_dataset(root, tmp_path / "f",
                        FeatureConfig(audio_backbone="random-tiny", video_backbone="random-tiny", xd=True),
                        progress=False)
    assert s["n_failed"] == 0
    train(tmp_path / "f", tmp_path / "r", SMALL, TrainConfig(epochs=2, batch_size=4, lr=1e-2), progress=False)
    p = Predictor(tmp_path / "r", device="cpu")
    vid = sorted((root / "videos").glob("*.mp4"))[0]
    r = p.predict(vid)
    assert r["task"] == "weak" and {n for n, _ in r["top"]} == {"Violent", "Normal"}
    assert sum(x for _, x in r["top"]) == pytest.approx(1.0)
    assert r["step_s"] == pytest.approx(16 / 24) and len(r["step_scores"]) == (r["n_frames"] - 1) // 16
    assert np.allclose(r["step_scores"], np.asarray(r["step_probs"])[:, 1])
    plot_timeline(r, tmp_path / "xd.png")


def test_int8_trained_run_loads_where_int8_cannot_run(vaar_run, tmp_path, monkeypatch):
    import avar_net.fast_backbones as au
    run = tmp_path / "run"; shutil.copytree(vaar_run["run"], run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["features"]["config"]["precision"] = "int8"
    (run / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(au, "int8_supported", lambda: False)          # e.g. an ARM laptop or a CUDA box
    p = Predictor(run, device="cpu")
    assert p.feature_cfg.precision == "auto" and p.extractors.audio.precision_used != "int8"


def test_a_changed_int8_scheme_gets_a_note(vaar_run, tmp_path):
    run = tmp_path / "run"; shutil.copytree(vaar_run["run"], run)
    p0 = Predictor(run, device="cpu")
    assert p0.precision_note is None                                   # same extractors as in training
    cfg = json.loads((run / "config.json").read_text())
    cfg["features"]["resolved"]["video_int8_scheme"] = "an older scheme"   # trained on features of another int8 scheme
    (run / "config.json").write_text(json.dumps(cfg))
    p = Predictor(run, device="cpu")
    assert p.precision_note and "int8 scheme" in p.precision_note
