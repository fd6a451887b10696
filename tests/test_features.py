"""Feature cache (avar_net.features): end-to-end extraction on SynthAVAR tiny with random-tiny backbones, resume and
config-change semantics, checksums/NaN on load, a folder of broken files, decode time limit, sharding, the
DataLoader (GPU) path on CPU, XD mode, and the dataset/collate pair."""
import csv, json, shutil, time
from pathlib import Path

import numpy as np
import pytest
import torch

from avar_net.core import VAAR_CLASSES, ConfigError, DataError, sha256_file
import avar_net.features as F
import avar_net.extract as X
import avar_net.pipeline as P
from avar_net.fast_backbones import MOBILEVIT_INT8_SCHEME
from avar_net.features import FeatureConfig, FeatureStore, FeatureDataset, collate_features, clip_file, status_file
from avar_net.extract import build_extractors, extract_clip, extract_dataset

TINY = dict(audio_backbone="random-tiny", video_backbone="random-tiny", precision="fp32")
CLASSES = ["Explosion", "Normal", "Baby cry"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny backbones gain nothing from intra-op threads, and on a busy 2-core runner OpenMP barriers make them 10x
    slower."""
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from avar_net.synth import generate_synthavar
    return Path(generate_synthavar(tmp_path_factory.mktemp("synth") / "avar", "tiny", seed=0, classes=CLASSES))


@pytest.fixture(scope="module")
def cfg():
    return FeatureConfig(**TINY)


@pytest.fixture(scope="module")
def ex(cfg):
    return build_extractors(cfg)


@pytest.fixture(scope="module")
def reference(synth_root, cfg, ex, tmp_path_factory):
    "One uninterrupted run: (out_dir, summary)."
    out = tmp_path_factory.mktemp("ref") / "features"
    return out, extract_dataset(synth_root, out, cfg, progress=False, extractors=ex)


def _features(out) -> dict:
    st = FeatureStore(out)
    return {r["clip_id"]: st.load(r["clip_id"]) for r in st.records()}


def _assert_same_features(a_dir, b_dir, atol=0.0):
    a, b = _features(a_dir), _features(b_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        for t in ("audio", "video", "step_start_s"):
            assert a[k][t].shape == b[k][t].shape, (k, t)
            assert torch.allclose(a[k][t], b[k][t], atol=atol, rtol=0), (k, t, (a[k][t] - b[k][t]).abs().max())


def _splits(root) -> list[dict]:
    with open(Path(root) / "splits.csv") as f: return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------------------- e2e
def test_end_to_end(reference, synth_root, ex):
    out, s = reference
    rows = _splits(synth_root)
    assert s["n_clips"] == len(rows) == 12 and s["n_computed"] == 12 and s["n_failed"] == 0 and s["complete"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["config_key"] == s["config_key"] and m["counts"]["ok"] == 12 and m["failures"] == []
    assert m["backbones"]["audio"]["weights_id"] == ex.audio.weights_id
    assert m["backbones"]["video"]["dim"] == ex.video.dim and m["avar_net_version"]
    assert m["preprocessing"]["fps"] == 4.0 and m["preprocessing"]["step_s"] == 0.25
    for cid, r in m["clips"].items():                          # manifest checksums are the files' checksums
        assert r["status"] == "ok" and sha256_file(out / r["file"]) == r["sha256"]
        assert json.loads(status_file(out, cid).read_text())["sha256"] == r["sha256"]
    st = FeatureStore(out)
    by_src = {r["clip"]: r for r in rows}
    for r in st.records():
        d = st.load(r["clip_id"])
        T = int(np.ceil(d["duration_s"] / 0.25 - 1e-9))
        assert d["audio"].shape == (T, ex.audio.dim) and d["video"].shape == (T, ex.video.dim)
        assert d["audio"].dtype == torch.float32 and d["step_start_s"].dtype == torch.float64
        assert torch.allclose(d["step_start_s"], torch.arange(T, dtype=torch.float64) * 0.25)
        assert d["has_audio"] is True and d["audio"].abs().sum() > 0
        src = by_src[d["source"]]
        assert VAAR_CLASSES[d["label"]] == d["label_name"] == src["label"] and src["split"] == d["split"]
    assert not [p for p in (out / "clips").iterdir() if p.name.startswith(".")]   # no temporary files


def test_streaming_equals_whole_clip(synth_root, cfg, ex):
    "Chunked decode + per-step sums == decoding the whole clip and pooling all frames at once."
    from avar_net.data import load_clip
    p = sorted(synth_root.glob("Explosion/*.mp4"))[0]
    r = extract_clip(p, ex, FeatureConfig(**TINY, chunk_frames=3, queue_chunks=1))
    c = load_clip(p, step_s=0.25, fps=4.0, size=ex.size)
    v = ex.video.extract(c.frame_times, c.frames, c.grid)
    a = ex.audio.extract(c.audio, c.grid)
    assert r["video"].shape == v.shape and r["audio"].shape == a.shape
    np.testing.assert_allclose(r["video"], v, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(r["audio"], a, atol=1e-5, rtol=1e-5)
    assert r["timing"]["backbones_s"] > 0 and r["timing"]["total_s"] >= r["timing"]["backbones_s"]


# ------------------------------------------------------------------------------------------------ resume / config key
def test_rerun_skips_everything_then_config_change_recomputes(reference, synth_root, ex, tmp_path):
    out = tmp_path / "f"; shutil.copytree(reference[0], out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "clips").iterdir()}
    s = extract_dataset(synth_root, out, FeatureConfig(**TINY), progress=False, extractors=ex)
    assert (s["n_skipped"], s["n_computed"], s["n_failed"]) == (12, 0, 0)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "clips").iterdir()} == before   # nothing rewritten
    # a pipeline knob is not part of the key: still skipped
    s = extract_dataset(synth_root, out, FeatureConfig(**TINY, batch_size=3, queue_chunks=1), progress=False,
                        extractors=ex)
    assert s["n_skipped"] == 12 and s["config_key"] == reference[1]["config_key"]
    # a feature-changing option is: everything is recomputed and the manifest follows
    s = extract_dataset(synth_root, out, FeatureConfig(**TINY, step_s=0.5), progress=False, extractors=ex)
    assert (s["n_computed"], s["n_recomputed"], s["n_skipped"]) == (12, 12, 0)
    assert s["config_key"] != reference[1]["config_key"]
    st = FeatureStore(out)
    assert st.config.step_s == 0.5 and len(st) == 12 and st.manifest["counts"]["stale"] == 0
    d = st.load(st.records()[0]["clip_id"])
    assert torch.allclose(d["step_start_s"][:2], torch.tensor([0.0, 0.5], dtype=torch.float64))


def test_corrupt_file_detected_on_load_and_recomputed(reference, synth_root, ex, tmp_path):
    out = tmp_path / "f"; shutil.copytree(reference[0], out)
    st = FeatureStore(out)
    cid = st.records()[3]["clip_id"]
    f = clip_file(out, cid)
    b = bytearray(f.read_bytes()); b[len(b) // 2] ^= 0x01; f.write_bytes(bytes(b))
    with pytest.raises(DataError, match="checksum mismatch") as e:
        st.load(cid)
    assert str(f) in str(e.value)
    rep = st.verify()
    assert [x["clip_id"] for x in rep["bad"]] == [cid] and len(rep["ok"]) == 11
    st.load(cid, verify=False)                                 # an explicit opt-out still parses (one bit in a float)
    s = extract_dataset(synth_root, out, FeatureConfig(**TINY), progress=False, extractors=ex)
    assert s["computed"] == [cid] and s["n_skipped"] == 11     # the rerun notices and recomputes just that clip
    assert FeatureStore(out).verify()["bad"] == []


def test_nan_and_inf_detected_on_load(reference, tmp_path):
    out = tmp_path / "f"; shutil.copytree(reference[0], out)
    st = FeatureStore(out)
    cid = st.records()[0]["clip_id"]
    d = st.load(cid)
    f = clip_file(out, cid)
    from safetensors.torch import save
    video = d["video"].clone(); video[2, 0] = float("nan"); video[4, 1] = float("inf")
    data = save({"audio": d["audio"], "video": video, "step_start_s": d["step_start_s"]},
                metadata={"format": F.FEATURE_FORMAT,
                          **{k: json.dumps(v) for k, v in d["meta"].items() if k != "format"}})
    f.write_bytes(data)
    m = json.loads((out / "manifest.json").read_text())
    m["clips"][cid]["sha256"] = sha256_file(f)                  # even with a matching checksum, NaN/Inf are refused
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"video features contain 1 NaN and 1 Inf values \(first at step 2\)") as e:
        FeatureStore(out).load(cid)
    assert str(f) in str(e.value)


def test_features_with_nan_fail_the_clip_not_the_run(synth_root, ex, tmp_path, monkeypatch):
    real = ex.video.features
    def poisoned(frames):
        y = np.array(real(frames)); y[0, 0] = np.nan; return y
    class V:                                                   # a video extractor that emits NaN
        dim, input_size = ex.video.dim, ex.video.input_size
        weights_id, precision_used = ex.video.weights_id, ex.video.precision_used
        features = staticmethod(poisoned)
    bad = X.Extractors(ex.audio, V(), ex.size)
    s = extract_dataset(synth_root, tmp_path / "f", FeatureConfig(**TINY), progress=False, extractors=bad, report=False)
    assert s["n_failed"] == 12 and all("NaN" in f["reason"] for f in s["failures"])
    assert not list((tmp_path / "f" / "clips").glob("*.safetensors"))


# --------------------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def mixed_root(synth_root, tmp_path_factory):
    """The synth set plus a zero-byte file, a text file named .mp4, a truncated mp4, a truncated (decodable) mkv and a
    listed file that is not there."""
    from avar_net.synth import write_mp4
    from avar_net.synthclip import render_clip
    root = tmp_path_factory.mktemp("mixed") / "avar"
    shutil.copytree(synth_root, root)
    rows = _splits(root)
    d = root / "Explosion"
    (d / "zero_bytes.mp4").write_bytes(b"")
    (d / "not_a_video.mp4").write_text("this is not a video\n" * 50)
    good = (d / sorted(p.name for p in d.glob("*.mp4"))[0]).read_bytes()
    (d / "truncated_mp4.mp4").write_bytes(good[: len(good) // 2])
    frames, audio, fps, sr = render_clip(4, seed=7, size=64, duration_s=3.0, fps=10)
    write_mp4(d / "long.mkv", frames, fps, audio, sr)
    b = (d / "long.mkv").read_bytes()
    (d / "truncated_mkv.mkv").write_bytes(b[: int(len(b) * 0.6)]); (d / "long.mkv").unlink()
    for name in ("zero_bytes.mp4", "not_a_video.mp4", "truncated_mp4.mp4", "truncated_mkv.mkv", "deleted.mp4"):
        rows.append({"clip": f"Explosion/{name}", "label": "4", "split": "train"})
    with open(root / "splits.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["clip", "label", "split"]); w.writeheader(); w.writerows(rows)
    return root


@pytest.mark.filterwarnings("ignore::avar_net.decode.DecodeWarning")
def test_mixed_good_and_bad_files_finishes(mixed_root, reference, ex, tmp_path, capsys):
    out = tmp_path / "f"
    s = extract_dataset(mixed_root, out, FeatureConfig(**TINY), progress=False, extractors=ex)
    failed = {f["source"]: f["reason"] for f in s["failures"]}
    assert set(failed) == {"Explosion/zero_bytes.mp4", "Explosion/not_a_video.mp4", "Explosion/truncated_mp4.mp4",
                           "Explosion/deleted.mp4"}
    assert "empty file" in failed["Explosion/zero_bytes.mp4"] and "file not found" in failed["Explosion/deleted.mp4"]
    assert all(r and "\n" not in r for r in failed.values())
    assert s["n_computed"] == 13 and s["complete"]             # the 12 good clips + the decodable part of the mkv
    err = capsys.readouterr().err
    assert "4 of 17 clip(s) failed" in err and all(src in err for src in failed)
    m = json.loads((out / "manifest.json").read_text())
    assert {f["source"] for f in m["failures"]} == set(failed)
    assert m["counts"] == {"ok": 13, "failed": 4, "stale": 0, "missing": 0}
    # the truncated mkv: features for the part that decodes, and the record says what was lost
    r = json.loads(status_file(out, "Explosion__truncated_mkv").read_text())
    assert r["status"] == "ok" and r["warnings"] and r["duration_s"] < r["declared_duration_s"]
    assert r["T"] == int(np.ceil(r["duration_s"] / 0.25 - 1e-9))
    # records come in the dataset's order (splits.csv rows), not in the manifest's (sorted) key order
    order = [r["clip"] for r in _splits(mixed_root) if r["clip"] not in failed]
    assert [r["source"] for r in FeatureStore(out).records()] == order != sorted(order)
    # good clips are identical to the clean run
    ref = FeatureStore(reference[0]); st = FeatureStore(out)
    for rec in ref.records():
        assert torch.equal(ref.load(rec["clip_id"])["video"], st.load(rec["clip_id"])["video"])
    # failed clips are retried on the next run, finished ones are not
    s2 = extract_dataset(mixed_root, out, FeatureConfig(**TINY), progress=False, extractors=ex, report=False)
    assert s2["n_skipped"] == 13 and s2["n_failed"] == 4


def test_decode_time_limit(synth_root, ex, tmp_path, monkeypatch):
    "A decoder that hangs fails its clip after decode_timeout_s; the run goes on."
    real = P.iter_video_frames
    def hanging(path, *a, **k):
        if Path(path).name == "normal_0001.mp4": time.sleep(30)
        yield from real(path, *a, **k)
    monkeypatch.setattr(P, "iter_video_frames", hanging)
    t = time.perf_counter()
    s = extract_dataset(synth_root, tmp_path / "f", FeatureConfig(**TINY, decode_timeout_s=1.0), progress=False,
                        extractors=ex, report=False)
    assert time.perf_counter() - t < 25
    assert [f["source"] for f in s["failures"]] == ["Normal/normal_0001.mp4"]
    assert "time limit" in s["failures"][0]["reason"]
    assert s["n_computed"] == 11


# ----------------------------------------------------------------------------------------------------------- sharding
def test_two_shards_equal_one(reference, synth_root, ex, tmp_path):
    out = tmp_path / "f"
    s0 = extract_dataset(synth_root, out, FeatureConfig(**TINY), shard=(0, 2), progress=False, extractors=ex)
    assert not s0["complete"] and s0["n_shard"] == 6
    assert json.loads((out / "manifest.json").read_text())["counts"]["missing"] == 6
    s1 = extract_dataset(synth_root, out, FeatureConfig(**TINY), shard="1/2", progress=False, extractors=ex)
    assert s1["complete"] and not set(s0["computed"]) & set(s1["computed"])
    assert sorted(s0["computed"] + s1["computed"]) == sorted(reference[1]["computed"])
    _assert_same_features(reference[0], out)
    ids = [r["clip_id"] for r in FeatureStore(out).records()]
    assert ids == [r["clip_id"] for r in FeatureStore(reference[0]).records()]


# ------------------------------------------------------------------------------------------------ loader (GPU) path
@pytest.mark.filterwarnings("ignore::avar_net.decode.DecodeWarning")
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_pipeline_on_cpu(mixed_root, reference, ex, workers, tmp_path):
    "The DataLoader path (decoding workers, frames batched across clips) gives the thread path's features."
    cfg = FeatureConfig(**TINY, pipeline="loader", num_workers=workers, batch_size=8, chunk_frames=5)
    assert cfg.use_loader()
    out = tmp_path / "f"
    s = extract_dataset(mixed_root, out, cfg, progress=False, extractors=ex, report=False)
    assert s["n_computed"] == 13 and s["n_failed"] == 4 and s["config_key"] == reference[1]["config_key"]
    ref, st = FeatureStore(reference[0]), FeatureStore(out)
    for rec in ref.records():
        a, b = ref.load(rec["clip_id"]), st.load(rec["clip_id"])
        assert torch.allclose(a["video"], b["video"], atol=1e-5) and torch.allclose(a["audio"], b["audio"], atol=1e-5)


# -------------------------------------------------------------------------------------------------------------- XD mode
def test_xd_mode(ex, tmp_path):
    from avar_net.synth import generate_synthxd
    from avar_net.data import read_xd_list
    root = Path(generate_synthxd(tmp_path / "xd", "tiny", seed=0, train=(1, 1), test=(1, 1)))
    with pytest.raises(ConfigError, match="--xd"):
        extract_dataset(root, tmp_path / "f", FeatureConfig(**TINY), progress=False, extractors=ex)
    s = extract_dataset(root, tmp_path / "f", FeatureConfig(**TINY, xd=True), progress=False, extractors=ex)
    assert s["n_computed"] == 4 and s["layout"] == "xd"
    st = FeatureStore(tmp_path / "f")
    test_ids = [r["clip_id"] for r in st.records("test")]
    assert test_ids == [Path(p).stem for p in read_xd_list(root / "test.list")]      # official order and names
    man = json.loads((root / "manifest.json").read_text())
    n_of = {v["name"]: v["n_frames"] for v in man["videos"]}
    for cid in test_ids:
        d = st.load(cid)
        assert d["n_frames"] == n_of[cid] and d["video"].shape[0] == (n_of[cid] - 1) // 16
        assert torch.allclose(d["step_start_s"][1:2], torch.tensor([16 / 24], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------- dataset / collate
def test_dataset_and_collate(reference):
    st = FeatureStore(reference[0])
    ds = FeatureDataset(st, "train")
    assert len(ds) == len(st.records("train")) > 0
    dl = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_features)
    b = next(iter(dl))
    T = b["mask"].shape[1]
    assert b["audio"].shape == (4, T, st.audio_dim) and b["video"].shape == (4, T, st.video_dim)
    lens = [ds[i]["video"].shape[0] for i in range(4)]
    assert b["mask"].sum(1).tolist() == lens and T == max(lens)
    for i, n in enumerate(lens):
        assert b["video"][i, n:].abs().sum() == 0 and torch.equal(b["video"][i, :n], ds[i]["video"])
    assert b["label"].dtype == torch.long and b["has_audio"].all()
    with pytest.raises(DataError, match="split 'nope'"):
        FeatureDataset(st, "nope")


def test_store_without_manifest(reference, tmp_path):
    "A run killed before rebuilding the manifest leaves a readable store (rebuilt in memory from the status records)."
    out = tmp_path / "f"; shutil.copytree(reference[0], out)
    (out / "manifest.json").unlink()
    st = FeatureStore(out)
    assert st.manifest_source == "status" and len(st) == 12 and st.verify()["bad"] == []
    with pytest.raises(DataError, match="not a feature folder"):
        FeatureStore(tmp_path)


def test_readers_refuse_a_missing_listed_file_unless_asked(mixed_root):
    "Validation (the default) names the missing file; extraction keeps its record so that clip alone fails."
    from avar_net.data import read_vaar
    with pytest.raises(DataError, match="listed clip 'Explosion/deleted.mp4' not found"): read_vaar(mixed_root)
    recs = read_vaar(mixed_root, missing="keep")
    assert [r for r in recs if r.path.name == "deleted.mp4"] and len(recs) == len(_splits(mixed_root))
    with pytest.raises(ConfigError, match="missing must be"): read_vaar(mixed_root, missing="skip")


@pytest.mark.skipif(not __import__("avar_net.fast_backbones", fromlist=["x"]).int8_supported(),
                    reason="no oneDNN int8 kernels on this CPU")
def test_int8_schemes_are_part_of_the_cache_key(monkeypatch):
    import avar_net.fast_backbones as au
    monkeypatch.setattr(au, "cpu_supports_bf16", lambda: False)
    r8 = build_extractors(FeatureConfig(**{**TINY, "precision": "int8"})).resolved
    assert (r8["audio_precision"], r8["video_precision"]) == ("int8", "int8+channels_last")
    assert r8["audio_int8_scheme"] == au.INT8_SCHEME and r8["video_int8_scheme"] == MOBILEVIT_INT8_SCHEME
    r32 = build_extractors(FeatureConfig(**TINY)).resolved
    assert not any("int8" in k for k in r32)                           # fp32 keys stay as they were


def test_thread_governor_gives_a_core_to_a_working_decoder(monkeypatch):
    import avar_net.pipeline as fm
    monkeypatch.setattr(fm, "_DECODING", fm._Decoding())               # not the decoders other tests left running
    n0 = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        class Probe(torch.nn.Module):
            def forward(self, x):
                seen.append(torch.get_num_threads()); return x
        m = torch.nn.Sequential(Probe())
        with fm.ThreadGovernor([m]) as gov:
            m(torch.zeros(1))
            with fm._DECODING.working(): m(torch.zeros(1))          # a decoder works: one thread fewer
            m(torch.zeros(1))                                          # it stopped: all threads again
            with fm._DECODING.working():
                gov.pause(); m(torch.zeros(1))                         # paused: the original count
        assert seen == [2, 1, 2, 2]
        assert torch.get_num_threads() == 2 and not m._forward_pre_hooks and not m[0]._forward_pre_hooks
        torch.set_num_threads(1)
        assert fm.ThreadGovernor([m]).handles == []                    # one thread: nothing to give away
    finally:
        torch.set_num_threads(n0)
