"""Tests of avar_net.synth: SynthAVAR / SynthXD generation, determinism, layout, degradations, write_mp4."""
import json, re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from avar_net.core import VAAR_CLASSES, ConfigError
from avar_net.synth import (XD_VIOLENT_CODES, generate_synthavar, generate_synthxd, synth_cli, synth_root, write_mp4,
                            xd_name)
from avar_net.synthclip import CLASS_SIGNATURES, SYNTH_PROFILES, Degradation, ambiguous_pairs, render_clip

# the XD-Violence name grammar, written out independently of the library
XD_RE = re.compile(r"^(?P<src>[^_].*?)__#\d\d-\d\d-\d\d_\d\d-\d\d-\d\d"
                   r"_label_(?P<lab>A|(?:B[1-6]|G)(?:-(?:B[1-6]|G|0)){2})$")


def decode(path):
    "Decoded RGB frames (N,H,W,3), mono audio (M,) or None, and stream facts, straight from PyAV."
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        facts = dict(vcodec=vs.codec_context.name, time_base=vs.time_base, rate=vs.average_rate,
                     acodec=None, sr=None, n_audio=len(c.streams.audio))
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    audio = None
    with av.open(str(path)) as c:
        if c.streams.audio:
            a = c.streams.audio[0]
            facts.update(acodec=a.codec_context.name, sr=a.rate)
            audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return frames, audio, facts


@pytest.fixture(scope="module")
def avar_root(tmp_path_factory):
    return generate_synthavar(tmp_path_factory.mktemp("synth") / "avar", "tiny", seed=0)


@pytest.fixture(scope="module")
def xd_root(tmp_path_factory):
    return generate_synthxd(tmp_path_factory.mktemp("synth") / "xd", "tiny", seed=0)


# ---------------------------------------------------------------- SynthAVAR layout and streams

def test_layout_splits_manifest(avar_root):
    man = json.loads((avar_root / "manifest.json").read_text())
    lines = (avar_root / "splits.csv").read_text().splitlines()
    assert lines[0] == "clip,label,split"
    rows = [l.split(",") for l in lines[1:]]
    n = SYNTH_PROFILES["tiny"]["clips_per_class"]
    assert len(rows) == 10 * n
    assert sorted(p.name for p in avar_root.iterdir() if p.is_dir()) == sorted(VAAR_CLASSES)
    on_disk = sorted(str(p.relative_to(avar_root)) for p in avar_root.rglob("*.mp4"))
    assert on_disk == sorted(r[0] for r in rows)
    by_clip = {c["clip"]: c for c in man["clips"]}
    for clip, label, split in rows:
        assert Path(clip).parts[0] == label and label in VAAR_CLASSES and split in ("train", "val", "test")
        assert by_clip[clip]["label"] == label and by_clip[clip]["split"] == split
        assert by_clip[clip]["label_index"] == VAAR_CLASSES.index(label)
    for c in VAAR_CLASSES:                    # stratified: same split counts in every class
        got = sorted(s for _, l, s in rows if l == c)
        assert got == sorted(["train"] * (n - 2) + ["val", "test"])
    assert man["params"]["profile"] == "tiny" and man["params"]["seed"] == 0
    assert man["params"]["version"] and man["encoder"]["video"]["codec"] == "libx264"


def test_clips_decode_with_both_streams(avar_root):
    man = json.loads((avar_root / "manifest.json").read_text())
    p = SYNTH_PROFILES["tiny"]
    for c in man["clips"][::3]:
        frames, audio, f = decode(avar_root / c["clip"])
        assert (f["vcodec"], f["acodec"], f["sr"]) == ("h264", "aac", 16000)
        assert f["time_base"] == Fraction(1, p["fps"]) and f["rate"] == p["fps"]
        assert frames.shape == (c["n_frames"], p["size"], p["size"], 3)
        assert p["duration_s"][0] - 0.1 <= c["duration_s"] <= p["duration_s"][1] + 0.1
        assert abs(c["n_frames"] / p["fps"] - c["duration_s"]) < 1e-6
        n = round(c["duration_s"] * 16000)
        assert n <= len(audio) < n + 1024          # AAC pads the last frame only
        assert np.abs(audio).max() > 0.01


def test_idempotent_resume_and_safe(tmp_path):
    root = generate_synthavar(tmp_path / "a", "tiny", 0, classes=["Crash"], clips_per_class=3)
    man = root / "manifest.json"
    m0, b0 = man.stat().st_mtime_ns, (root / "Crash/crash_0001.mp4").read_bytes()
    generate_synthavar(root, "tiny", 0, classes=["Crash"], clips_per_class=3)
    assert man.stat().st_mtime_ns == m0                                   # complete: untouched
    (root / "Crash/crash_0001.mp4").unlink()                              # damaged: resumes, same bytes again
    generate_synthavar(root, "tiny", 0, classes=["Crash"], clips_per_class=3)
    assert (root / "Crash/crash_0001.mp4").read_bytes() == b0
    (root / "splits.csv").unlink()                                        # a missing splits.csv is rebuilt too
    generate_synthavar(root, "tiny", 0, classes=["Crash"], clips_per_class=3)
    assert (root / "splits.csv").read_text().count("Crash/") == 3
    with pytest.raises(ConfigError, match="other parameters"):
        generate_synthavar(root, "tiny", 1, classes=["Crash"], clips_per_class=3)
    generate_synthavar(root, "tiny", 1, classes=["Crash"], clips_per_class=3, overwrite=True)
    assert json.loads(man.read_text())["params"]["seed"] == 1
    (tmp_path / "foreign").mkdir(); (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a synthetic dataset"):
        generate_synthavar(tmp_path / "foreign", "tiny", 0, overwrite=True)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.rglob("*.tmp"))


# ---------------------------------------------------------------- determinism

def test_same_seed_identical_decoded_tensors(tmp_path):
    kw = dict(classes=["Explosion", "Baby cry", "Vandalism"], clips_per_class=3)
    a = generate_synthavar(tmp_path / "a", "tiny", 5, **kw)
    b = generate_synthavar(tmp_path / "b", "tiny", 5, workers=2, **kw)          # worker processes change nothing
    c = generate_synthavar(tmp_path / "c", "tiny", 6, **kw)
    clips = sorted(str(p.relative_to(a)) for p in a.rglob("*.mp4"))
    assert clips == sorted(str(p.relative_to(b)) for p in b.rglob("*.mp4")) and len(clips) == 9
    for clip in clips:
        fa, aa, _ = decode(a / clip); fb, ab, _ = decode(b / clip); fc, ac, _ = decode(c / clip)
        assert np.array_equal(fa, fb) and np.array_equal(aa, ab)          # same seed: identical tensors
        assert (a / clip).read_bytes() == (b / clip).read_bytes()         # ... and identical bytes
        assert not np.array_equal(fa, fc) or fa.shape != fc.shape         # another seed: different clip
        assert aa.shape != ac.shape or not np.array_equal(aa, ac)
    assert (a / "splits.csv").read_text() == (b / "splits.csv").read_text()
    assert (a / "manifest.json").read_text() == (b / "manifest.json").read_text()


def test_fusion_pairs_share_exactly_one_modality():
    pairs = ambiguous_pairs()
    assert pairs["same_picture"] == [("Abuse", "Brawling"), ("Baby cry", "Pain")]
    assert pairs["same_sound"] == [("Crash", "Explosion"), ("Intruder", "Vandalism")]
    for a, b in pairs["same_picture"]:
        fa, aa, _, _ = render_clip(a, 11); fb, ab, _, _ = render_clip(b, 11)
        assert np.array_equal(fa, fb) and not np.allclose(aa, ab)
    for a, b in pairs["same_sound"]:
        fa, aa, _, _ = render_clip(a, 11); fb, ab, _, _ = render_clip(b, 11)
        assert np.array_equal(aa, ab) and not np.array_equal(fa, fb)
    # everything else differs in both modalities
    f0, a0, _, _ = render_clip("Normal", 11); f1, a1, _, _ = render_clip("Police siren", 11)
    assert not np.array_equal(f0, f1) and not np.allclose(a0, a1)
    assert len({v for v, _ in CLASS_SIGNATURES.values()}) == 8 and len({a for _, a in CLASS_SIGNATURES.values()}) == 8


# ---------------------------------------------------------------- degradations

def _snr(clean, noisy):
    n = min(len(clean), len(noisy)); c, x = clean[:n].astype(np.float64), noisy[:n].astype(np.float64)
    g = np.dot(x, c) / np.dot(c, c)
    return 10 * np.log10(np.mean((g * c) ** 2) / np.mean((x - g * c) ** 2))


def test_degradations_on_files(tmp_path):
    kw = dict(classes=["Police siren"], clips_per_class=3)
    clean = generate_synthavar(tmp_path / "clean", "tiny", 2, **kw)
    dark = generate_synthavar(tmp_path / "dark", "tiny", 2, degrade=Degradation(low_light=0.6), **kw)
    noisy = generate_synthavar(tmp_path / "snr", "tiny", 2, degrade={"audio_snr_db": 5.0}, **kw)
    mute = generate_synthavar(tmp_path / "mute", "tiny", 2, degrade=Degradation(drop_audio=True), **kw)
    man = json.loads((mute / "manifest.json").read_text())
    assert man["params"]["degrade"]["drop_audio"] is True and not any(c["has_audio"] for c in man["clips"])
    for clip in sorted(str(p.relative_to(clean)) for p in clean.rglob("*.mp4")):
        fc, ac, _ = decode(clean / clip)
        fd, _, _ = decode(dark / clip)
        assert fd.mean() < 0.7 * fc.mean()                                   # low light lowers brightness
        fn, an, _ = decode(noisy / clip)
        assert np.array_equal(fn, fc)                                        # audio noise leaves the picture alone
        assert abs(_snr(ac, an) - 5.0) < 1.5                                 # SNR roughly as asked (AAC adds a little)
        fm, am, facts = decode(mute / clip)
        assert am is None and facts["n_audio"] == 0 and np.array_equal(fm, fc)   # no audio stream, same picture


def test_degradations_on_arrays():
    fr, au, _, _ = render_clip("Intruder", 4, size=64, duration_s=2.0, fps=10)
    fo, ao, _, _ = render_clip("Intruder", 4, size=64, duration_s=2.0, fps=10, degrade=Degradation(occlusion=0.25))
    changed = (np.abs(fo.astype(int) - fr.astype(int)).max(-1) > 0).mean()
    assert 0.18 < changed < 0.32 and np.array_equal(ao, au)
    fv, _, _, _ = render_clip("Intruder", 4, size=64, duration_s=2.0, fps=10, degrade=Degradation(visual_noise=0.1))
    assert 0.07 < (fv.astype(float) - fr).std() / 255 < 0.11
    for snr in (0.0, 10.0, 20.0):
        _, an, _, _ = render_clip("Intruder", 4, size=64, duration_s=2.0, fps=10, degrade=Degradation(audio_snr_db=snr))
        assert abs(_snr(au, an) - snr) < 0.2
    with pytest.raises(ConfigError): Degradation(low_light=2)


# ---------------------------------------------------------------- SynthXD

def test_synthxd_lists_names_annotations(xd_root):
    man = json.loads((xd_root / "manifest.json").read_text())
    vids = {v["name"]: v for v in man["videos"]}
    train = (xd_root / "train.list").read_text().splitlines()
    test = (xd_root / "test.list").read_text().splitlines()
    p = SYNTH_PROFILES["tiny"]["xd"]
    assert len(train) == sum(p["train"]) and len(test) == sum(p["test"])
    assert sorted(train + test) == sorted(v["path"] for v in vids.values())          # each video listed once
    assert all((xd_root / x).is_file() and x.startswith("videos/") and x.endswith(".mp4") for x in train + test)
    labels = {}
    for x in train + test:
        m = XD_RE.match(Path(x).stem)
        assert m, x
        codes = [c for c in m.group("lab").split("-") if c not in ("A", "0")]
        assert all(c in XD_VIOLENT_CODES for c in codes)
        v = vids[Path(x).stem]
        assert v["violent"] == bool(codes) and sorted(codes) == sorted({s[2] for s in v["segments"]})
        labels[x] = bool(codes)
    flags = [labels[x] for x in test]
    assert flags == sorted(flags, reverse=True) and any(flags) and not all(flags)    # violent first, then normal
    assert any(labels[x] for x in train) and not all(labels[x] for x in train)
    ann = [l.split() for l in (xd_root / "annotations.txt").read_text().splitlines()]
    assert [a[0] for a in ann] == [Path(x).stem for x in test if labels[x]]           # violent test videos, in order
    for a in ann:
        v = vids[a[0]]
        iv = list(map(int, a[1:]))
        assert len(iv) >= 2 and len(iv) % 2 == 0 and not a[0].endswith(".mp4")
        pairs = list(zip(iv[::2], iv[1::2]))
        assert pairs == [(s, e) for s, e, _ in v["segments"]]
        assert all(0 <= s < e <= v["n_frames"] for s, e in pairs)
        assert all(e1 <= s2 for (_, e1), (s2, _) in zip(pairs, pairs[1:]))          # sorted, disjoint


def test_synthxd_videos_are_24fps_and_events_are_inside_segments(xd_root):
    man = json.loads((xd_root / "manifest.json").read_text())
    p = SYNTH_PROFILES["tiny"]["xd"]
    louder = []
    for v in man["videos"]:
        if v["split"] != "test": continue
        frames, audio, f = decode(xd_root / v["path"])
        assert f["time_base"] == Fraction(1, 24) and f["rate"] == 24 and (f["vcodec"], f["acodec"]) == ("h264", "aac")
        assert len(frames) == v["n_frames"] and p["n_frames"][0] <= v["n_frames"] <= p["n_frames"][1]
        assert round(v["n_frames"] / 24 * 16000) <= len(audio) < round(v["n_frames"] / 24 * 16000) + 1024
        if v["segments"]:
            inside = np.zeros(len(audio), bool)
            for s, e, _ in v["segments"]: inside[round(s / 24 * 16000):round(e / 24 * 16000)] = True
            louder.append(np.sqrt(np.mean(audio[inside] ** 2)) > np.sqrt(np.mean(audio[~inside] ** 2)))
    assert np.mean(louder) >= 0.75


def test_synthxd_against_data_module(xd_root):
    data = pytest.importorskip("avar_net.data")
    needed = ("parse_xd_annotations", "xd_frame_gt", "read_xd", "parse_xd_name")
    if not all(hasattr(data, n) for n in needed): pytest.skip("avar_net.data has not got the XD readers yet")
    man = json.loads((xd_root / "manifest.json").read_text())
    vids = {v["name"]: v for v in man["videos"]}
    ann = data.parse_xd_annotations(xd_root / "annotations.txt")
    assert ann == {n: [(s, e) for s, e, _ in v["segments"]] for n, v in vids.items()
                   if v["split"] == "test" and v["violent"]}
    names = [Path(x).stem for x in (xd_root / "test.list").read_text().splitlines()]
    gt = data.xd_frame_gt(names, [vids[n]["n_frames"] for n in names], ann)
    assert len(gt) == sum(16 * ((vids[n]["n_frames"] - 1) // 16) for n in names) and 0 < gt.mean() < 1
    recs = data.read_xd(xd_root)
    assert len(recs) == len(vids) and sum(r.label for r in recs) == sum(v["violent"] for v in vids.values())


def test_xd_name_grammar():
    assert xd_name("synth_0003", 480, ["B2", "G"]) == "synth_0003__#00-00-00_00-00-20_label_B2-G-0"
    assert xd_name("synth_0004", 24 * 3725, []) == "synth_0004__#00-00-00_01-02-05_label_A"
    assert XD_RE.match(xd_name("s", 100, ["B1", "B5", "B6"]))
    with pytest.raises(ConfigError): xd_name("s", 100, ["Z9"])


# ---------------------------------------------------------------- write_mp4, CLI, errors

def test_write_mp4_other_containers(tmp_path):
    fr = np.random.default_rng(0).integers(0, 255, (12, 32, 48, 3), dtype=np.uint8)
    st = (np.random.default_rng(1).standard_normal((2, 48000)) * 0.1).astype(np.float32)
    p = write_mp4(tmp_path / "x.mkv", fr, Fraction(30000, 1001), st, 48000, acodec="libopus")
    with av.open(str(p)) as c:
        assert c.streams.video[0].average_rate == Fraction(30000, 1001)
        assert c.streams.audio[0].codec_context.name == "opus" and c.streams.audio[0].channels == 2
    with pytest.raises(ConfigError, match="even"): write_mp4(tmp_path / "odd.mp4", fr[:, :31], 10)
    with pytest.raises(ConfigError, match="container"): write_mp4(tmp_path / "x.xyz", fr, 10)
    with pytest.raises(Exception): write_mp4(tmp_path / "bad.mp4", fr, 10, vcodec="no_such_codec")
    assert not (tmp_path / "bad.mp4").exists() and not list(tmp_path.glob(".*.tmp"))


def test_synth_cli(avar_root, xd_root, capsys):
    assert synth_cli(avar_root, "tiny", 0) == avar_root
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "40 clips" in out[0] and "already complete" in out[0]
    assert synth_cli(xd_root, "tiny", 0, kind="xd") == xd_root
    assert "19 videos" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="kind"): synth_cli(avar_root, "tiny", 0, kind="vaar")


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="profile"): generate_synthavar(tmp_path / "a", "huge")
    with pytest.raises(ConfigError, match="override"): generate_synthavar(tmp_path / "a", "tiny", fps_typo=3)
    with pytest.raises(ConfigError, match="seed"): generate_synthavar(tmp_path / "a", "tiny", seed=-1)
    with pytest.raises(ConfigError, match="class"): render_clip("Robbery", 0)
    with pytest.raises(ConfigError, match="even"): render_clip(0, 0, size=63)
    with pytest.raises(ConfigError, match=">= 3"): generate_synthavar(tmp_path / "b", "tiny", clips_per_class=2)
    with pytest.raises(ConfigError, match="24 fps"): generate_synthxd(tmp_path / "c", "tiny", fps=25)
    assert synth_root("avar", "small", 0).name == "synthavar_small_s0"
