"""Reliability of avar_net.data (issue 7): the bad-input battery at the decoder level, hypothesis properties of the
time grid and of the XD-Violence ground truth, the decode time limit, and a bounded fuzz run over mutated bytes.

Contract under test: every input is either decoded correctly (losses reported as a `DecodeWarning` and in
`Clip.warnings`) or refused with one `DecodeError` whose one-line message names the file and the reason."""
from __future__ import annotations
import math, time, warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from avar_net.core import AvarError, DecodeError
from avar_net.data import TimeGrid, load_clip, pool_to_grid, xd_frame_gt
from avar_net.decode import DecodeReport, DecodeWarning, decode_video_frames, iter_video_frames, probe
from avar_net.soundtrack import decode_audio
from avar_net.testing import make_test_media, read_test_index


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    cache = {}
    def make(name, **kw):
        if name not in cache: cache[name] = make_test_media(root / name, **kw)
        return cache[name]
    make.root = root
    return make


def check_clip(clip, path):
    "Invariants of every clip that decodes: frames, audio and grid agree with each other."
    assert clip.frames.dtype == torch.uint8 and clip.frames.ndim == 4 and clip.frames.shape[0] >= 1
    assert len(clip.frame_times) == clip.frames.shape[0] and np.all(np.diff(clip.frame_times) > 0)
    assert clip.audio.dtype == np.float32 and len(clip.audio) == round(clip.duration_s * clip.sr)
    assert np.isfinite(clip.audio).all()
    assert clip.grid.T == max(1, math.ceil(clip.duration_s / clip.grid.step_s - 1e-9))
    assert (clip.grid.index_of(clip.frame_times) >= 0).all()
    assert all(str(path) in w for w in clip.warnings)


def check_error(e: DecodeError, path):
    msg = str(e)
    assert isinstance(e, AvarError) and "\n" not in msg and str(path) in msg and e.reason and len(msg) < 400


def _strip_box(data: bytes, box: bytes) -> bytes:
    "Remove a top-level MP4 box (e.g. the moov index)."
    out, i = b"", 0
    while i + 8 <= len(data):
        size = int.from_bytes(data[i:i + 4], "big")
        if size < 8: break
        if data[i + 4:i + 8] != box: out += data[i:i + size]
        i += size
    return out


# ----------------------------------------------------------------------------------------------------------------
# files that must be refused with one DecodeError

def _refused(media):
    root = media.root
    good = media("good.mp4", duration_s=2.0, fps=25, size=(32, 32))
    data = good.read_bytes()
    fast = media("fast.mp4", duration_s=2.0, fps=25, size=(32, 32), faststart=True).read_bytes()
    cases = {
        "zero_byte.mp4": (b"", "empty file"),
        "text.mp4": (b"this is not a video, just text that somebody renamed\n" * 30, "not a media file"),
        "trunc10_moov_at_end.mp4": (data[: len(data) // 10], "not a media file"),
        "trunc50_moov_at_end.mp4": (data[: len(data) // 2], "not a media file"),
        "trunc90_moov_at_end.mp4": (data[: len(data) * 9 // 10], "not a media file"),
        "moovless.mp4": (_strip_box(fast, b"moov"), "not a media file"),
        "random.mp4": (np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes(), "not a media file"),
        "header_only.mp4": (fast[:200], None),
    }
    for name, (b, _) in cases.items(): (root / name).write_bytes(b)
    make_test_media(root / "audio_only.m4a", video=False, format="mp4")
    make_test_media(root / "audio_only.mp3", video=False, acodec="mp3", sr=44100)
    make_test_media(root / "audio_only.wav", video=False, acodec="pcm_s16le")
    cases.update({"audio_only.m4a": (None, "no video stream"), "audio_only.mp3": (None, "no video stream"),
                  "audio_only.wav": (None, "no video stream"), "missing.mp4": (None, "file not found"),
                  "a_folder.mp4": (None, "directory")})
    (root / "a_folder.mp4").mkdir(exist_ok=True)
    import av                                                   # a stream without a single frame: zero duration
    c = av.open(str(root / "no_frames.avi"), "w"); s = c.add_stream("mpeg4", rate=25)
    s.width = s.height = 32; s.pix_fmt = "yuv420p"; c.start_encoding(); c.close()
    cases["no_frames.avi"] = (None, "zero duration")
    make_test_media(root / "two_frames_83_min_apart.mkv", frame_times=[0.0, 5000.0], fps=25, size=(16, 16), acodec=None)
    cases["two_frames_83_min_apart.mkv"] = (None, "implausible duration")
    return {root / k: v[1] for k, v in cases.items()}


def test_battery_refused_inputs(media):
    for path, reason in _refused(media).items():
        for call in (lambda: probe(path), lambda: load_clip(path, size=16), lambda: decode_video_frames(path, 4, 16)):
            with pytest.raises(DecodeError) as ei:
                call()
            check_error(ei.value, path)
            if reason: assert reason in ei.value.reason, (path.name, ei.value.reason)


def test_decode_audio_of_audio_only_and_broken_files(media):
    root = media.root
    m4a = make_test_media(root / "ao.m4a", video=False, format="mp4", duration_s=1.0)
    wave, has = decode_audio(m4a)                        # audio-only files still give their audio (own timeline)
    assert has and len(wave) == 16000 and np.abs(wave[4000:12000]).max() > 0.4
    for p in [root / "nothere.mp4"]:
        with pytest.raises(DecodeError, match="file not found"): decode_audio(p)


# ----------------------------------------------------------------------------------------------------------------
# files that decode, possibly with a reported loss

@pytest.mark.parametrize("frac", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("src", ["t_fast.mp4", "t_mk.mkv", "t_wb.webm"])
def test_truncated_files_decode_what_is_there(media, src, frac):
    kw = {"t_fast.mp4": dict(faststart=True), "t_mk.mkv": {}, "t_wb.webm": dict(vcodec="libvpx", acodec="libopus")}[src]
    full = media(src, duration_s=4.0, fps=25, size=(32, 32), **kw)
    p = full.with_name(f"trunc{int(frac * 100)}_{src}")
    data = full.read_bytes(); p.write_bytes(data[: int(len(data) * frac)])
    with pytest.warns(DecodeWarning, match="lost"):
        clip = load_clip(p, size=16)
    check_clip(clip, p)
    assert clip.warnings and "lost" in clip.warnings[0]
    assert clip.duration_s < 4.0 - 0.2                    # the clip ends where the decodable video ends
    rep = DecodeReport(str(p), "video")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DecodeWarning)
        t, f = decode_video_frames(p, 4, None, report=rep)
    assert rep.lost_s > 0.2 and rep.usable_until_s is not None and rep.usable_until_s == pytest.approx(clip.duration_s)
    # every frame that comes back is the right source frame
    assert [read_test_index(x) for x in f] == [int(x * 25) for x in t]


@pytest.mark.parametrize("src", ["t_fast.mp4", "g_moov_at_end.mp4", "t_mk.mkv", "t_wb.webm"])
def test_garbage_in_the_middle(media, src):
    kw = {"t_fast.mp4": dict(faststart=True), "g_moov_at_end.mp4": {}, "t_mk.mkv": {},
          "t_wb.webm": dict(vcodec="libvpx", acodec="libopus")}[src]
    full = media(src, duration_s=4.0, fps=25, size=(32, 32), **kw)
    data = bytearray(full.read_bytes())
    a, n = len(data) // 3, len(data) // 5
    data[a:a + n] = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8).tobytes()
    p = full.with_name("garbage_" + src); p.write_bytes(bytes(data))
    with pytest.warns(DecodeWarning, match=r"\d+\.\d\d s of \d+\.\d\d s lost"):
        clip = load_clip(p, size=None)
    check_clip(clip, p)
    assert any("video" in w for w in clip.warnings)
    # frames outside the damaged region are the right ones; inside it the last good frame is held (never a later one)
    got = [read_test_index(x) for x in clip.frames]
    exact = [int(t * 25) for t in clip.frame_times]
    assert all(g <= e for g, e in zip(got, exact))
    assert got[0] == exact[0] and sum(g == e for g, e in zip(got, exact)) >= len(got) // 3


def test_good_files_raise_no_warning(media):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DecodeWarning)
        for name, kw in [("g1.mp4", {}), ("g2.mkv", dict(vcodec="mpeg4", acodec="mp3", sr=44100)),
                         ("g3.webm", dict(vcodec="libvpx", acodec="libopus")),
                         ("g4.mkv", dict(frame_times=[0, .1, .15, .5, .55, 1.3, 1.31, 2.0], fps=30)),
                         ("g5.mp4", dict(audio_duration_s=0.8)), ("g6.mkv", dict(audio_start_s=0.6, acodec="flac"))]:
            p = media(name, **{"duration_s": 2.0, "fps": 25, "size": (32, 32), **kw})
            clip = load_clip(p, size=16)
            check_clip(clip, p)
            assert clip.warnings == []


@pytest.mark.parametrize("name,kw,shape", [
    ("video_only.mp4", dict(acodec=None), (3, 24, 32)),
    ("single_frame.mp4", dict(duration_s=0.04), (3, 24, 32)),
    ("shorter_than_step.mkv", dict(duration_s=0.12, fps=25), (3, 24, 32)),
    ("odd_w.mkv", dict(size=(31, 24), vcodec="mpeg4"), (3, 24, 31)),
    ("one_by_one.avi", dict(size=(1, 1), vcodec="mpeg4", acodec=None), (3, 1, 1)),
    ("uhd.mp4", dict(size=(3840, 2160), duration_s=0.08, acodec=None), (3, 2160, 3840)),
    ("rot90.mp4", dict(rotation=90), (3, 32, 24)),
    ("u8_8k.mkv", dict(acodec="pcm_u8", sr=8000, channels=1), (3, 24, 32)),
    ("s24.mov", dict(acodec="pcm_s24le", sr=96000), (3, 24, 32)),
    ("flt.mkv", dict(acodec="pcm_f32le", sr=44100), (3, 24, 32)),
    ("six.mkv", dict(acodec="aac", channels=6), (3, 24, 32)),
    ("vfr.mp4", dict(frame_times=[0, 0.3, 0.31, 0.9, 1.7], fps=30), (3, 24, 32)),
])
def test_battery_handled_inputs(media, name, kw, shape):
    p = media(name, **{"duration_s": 1.0, "fps": 25, "size": (32, 24), **kw})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DecodeWarning)
        clip = load_clip(p, size=None)
    check_clip(clip, p)
    assert clip.frames.shape[1:] == shape
    if kw.get("acodec", "aac") is not None:
        assert clip.has_audio and np.abs(clip.audio).max() > 0.3
    else:
        assert not clip.has_audio and not clip.audio.any()


def test_load_clip_refuses_clips_too_big_for_memory(media, monkeypatch):
    import avar_net.data as D
    p = media("g1.mp4", duration_s=2.0, fps=25, size=(32, 32))
    monkeypatch.setattr(D, "MAX_CLIP_BYTES", 200_000)
    with pytest.raises(DecodeError, match="iter_video_frames") as ei:
        load_clip(p, size=64)
    check_error(ei.value, p)
    assert load_clip(p, size=16).frames.shape == (8, 3, 16, 16)       # 8 * 768 B + 128 kB of audio fit


# ----------------------------------------------------------------------------------------------------------------
# the time limit

def test_decode_time_limit(media):
    p = media("long.mp4", duration_s=20.0, fps=25, size=(64, 48), gop=25)
    with pytest.raises(DecodeError, match="time limit of 0.01 s") as ei:
        decode_video_frames(p, 25, 32, timeout_s=0.01)
    check_error(ei.value, p)
    with pytest.raises(DecodeError, match="time limit"):
        load_clip(p, fps=25, size=32, timeout_s=0.01)
    with pytest.raises(DecodeError, match="time limit"):
        decode_audio(p, timeout_s=1e-4)
    # time spent by the consumer between chunks does not count against the decoder
    t0, n = time.monotonic(), 0
    p = media("g1.mp4", duration_s=2.0, fps=25, size=(32, 32))
    for _, x in iter_video_frames(p, 4, 16, chunk=2, timeout_s=1.0):
        time.sleep(0.3); n += len(x)
    assert n == 8 and time.monotonic() - t0 > 1.0


# ----------------------------------------------------------------------------------------------------------------
# hypothesis: the time grid

durations = st.floats(min_value=0.0, max_value=600.0, allow_nan=False)
steps = st.sampled_from([0.04, 0.1, 0.25, 0.5, 1.0, 16 / 24, 1 / 3, 2.0])


@settings(max_examples=200, deadline=None)
@given(durations, steps)
def test_grid_covers_the_clip(duration, step):
    g = TimeGrid.for_duration(duration, step)
    assert g.T == max(1, math.ceil(duration / step - 1e-9))
    assert g.edges[0] == 0 and np.all(np.diff(g.edges) > 0)
    assert g.edges[-1] >= duration - 1e-9 * max(1, duration) and (g.T == 1 or g.starts[-1] < duration)
    np.testing.assert_array_equal(g.index_of(g.starts), np.arange(g.T))
    np.testing.assert_array_equal(g.ends[:-1], g.starts[1:])


@settings(max_examples=200, deadline=None)
@given(durations, steps, st.lists(st.floats(min_value=-5, max_value=700, allow_nan=False), max_size=50))
def test_index_of_is_half_open(duration, step, times):
    g = TimeGrid.for_duration(duration, step)
    idx = g.index_of(times)
    for t, k in zip(times, idx):
        if k >= 0: assert g.edges[k] <= t < g.edges[k + 1]
        else: assert t < g.edges[0] or t >= g.edges[-1]


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=0.05, max_value=8), steps, st.integers(1, 6), st.integers(1, 80), st.integers(0, 2**32 - 1))
def test_pool_to_grid_is_the_per_step_mean(duration, step, dim, n, seed):
    g = TimeGrid.for_duration(duration, step)
    rng = np.random.default_rng(seed)
    times = rng.uniform(-1, duration + 1, n)
    if rng.random() < 0.3: times = np.round(times / step) * step          # exactly on step boundaries
    if not (g.index_of(times) >= 0).any(): times[0] = duration / 2
    feats = rng.uniform(-3, 3, (n, dim))
    out = pool_to_grid(times, feats, g)
    assert out.shape == (g.T, dim) and out.dtype == np.float32
    idx = g.index_of(times)
    full = sorted(set(idx[idx >= 0].tolist()))
    means = {k: feats[idx == k].mean(0) for k in full}
    ref = np.stack([means[min(full, key=lambda j: (abs(j - k), j))] for k in range(g.T)])  # nearest, earlier on a tie
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5000), st.sampled_from([24.0, 25.0, 30000 / 1001]))
def test_xd_grid_matches_the_snippets(n_frames, fps):
    g = TimeGrid.for_xd(n_frames, fps=fps)
    assert g.T == (n_frames - 1) // 16
    frames = np.arange(16 * g.T)
    np.testing.assert_array_equal(g.index_of(frames / fps), frames // 16)


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=0.01, max_value=30), st.sampled_from([0.25, 0.5, 1.0]), st.sampled_from([1, 2, 4]))
def test_sample_targets_land_in_their_steps(duration, step, per_step):
    "With fps = m/step, the targets t_k = (k+0.5)/fps put exactly m frames in every full step, none outside the grid."
    fps = per_step / step
    g = TimeGrid.for_duration(duration, step)
    n = math.ceil(duration * fps - 0.5 - 1e-9)
    t = (np.arange(max(n, 0)) + 0.5) / fps
    idx = g.index_of(t)
    assert (idx >= 0).all() and np.all(np.diff(idx) >= 0)
    counts = np.bincount(idx, minlength=g.T)
    full = g.ends <= duration + 1e-9
    assert (counts[full] == per_step).all() and (counts <= per_step).all()


# ----------------------------------------------------------------------------------------------------------------
# hypothesis: the XD-Violence ground truth

videos = st.lists(st.tuples(st.integers(1, 300), st.booleans(),
                            st.lists(st.tuples(st.integers(0, 320), st.integers(0, 80)), max_size=4)),
                  min_size=1, max_size=8)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(videos)
def test_xd_gt_properties(vids):
    names, n_frames, ann = [], [], {}
    for i, (n, violent, ivs) in enumerate(vids):
        name = f"v{i}__#1_label_{'B1-0-0' if violent else 'A'}"
        names.append(name + ".mp4"); n_frames.append(n)
        if violent: ann[name] = [(s, s + d) for s, d in ivs] or [(0, 1)]
    gt = xd_frame_gt(names, n_frames, ann)
    assert len(gt) == sum(16 * ((n - 1) // 16) for n in n_frames)
    assert set(np.unique(gt)) <= {0.0, 1.0}
    off = 0
    for name, n in zip(names, n_frames):
        keep = 16 * ((n - 1) // 16)
        ref = np.zeros(n)
        for s, e in ann.get(name[:-4], []): ref[s:e] = 1
        np.testing.assert_array_equal(gt[off: off + keep], ref[:keep])
        assert keep == 16 * TimeGrid.for_xd(n).T
        off += keep


# ----------------------------------------------------------------------------------------------------------------
# hypothesis on real files: variable frame rate sampling

@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.integers(1, 400), min_size=1, max_size=12), st.sampled_from([3.0, 4.0, 10.0]))
def test_vfr_sampling_property(tmp_path_factory, gaps_ms, fps):
    times = np.cumsum([0] + gaps_ms) / 1000.0
    p = make_test_media(tmp_path_factory.mktemp("vfr") / "v.mkv", frame_times=times.tolist(), fps=30, size=(32, 32),
                        acodec=None, duration_s=float(times[-1]) + 0.05)
    t, f = decode_video_frames(p, fps, None)
    got = [read_test_index(x) for x in f]
    assert got == [int(np.searchsorted(times, x + 1e-9, side="right") - 1) for x in t]


# ----------------------------------------------------------------------------------------------------------------
# bounded fuzz run of the decoder entry point

def _mutate(data: bytes, rng: np.random.Generator, i: int) -> bytes:
    b = bytearray(data)
    kind = i % 5
    if kind == 0:                                            # flip a few bytes anywhere
        for j in rng.integers(0, len(b), 1 + i % 16): b[j] = int(rng.integers(0, 256))
    elif kind == 1:                                          # overwrite a block
        a = int(rng.integers(0, len(b))); n = int(rng.integers(1, 512))
        b[a:a + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()[: len(b) - a]
    elif kind == 2:                                          # truncate
        b = b[: int(rng.integers(0, len(b)))]
    elif kind == 3:                                          # delete or duplicate a chunk
        a = int(rng.integers(0, len(b))); n = int(rng.integers(1, 1024))
        b = b[:a] + b[a + n:] if rng.random() < 0.5 else b[:a] + b[a:a + n] + b[a:]
    else:                                                    # flip bytes in the first 1 KiB (headers)
        for j in rng.integers(0, min(1024, len(b)), 1 + i % 8): b[j] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)


@pytest.mark.timeout(600)
def test_fuzz_decoder(tmp_path):
    "200 mutated variants of small real clips (MP4 with index first, Matroska): DecodeError or a consistent clip."
    srcs = [make_test_media(tmp_path / "src.mp4", duration_s=1.0, fps=25, size=(32, 24), faststart=True),
            make_test_media(tmp_path / "src.mkv", duration_s=1.0, fps=25, size=(32, 24), vcodec="mpeg4", acodec="mp3",
                            sr=44100)]
    rng = np.random.default_rng(20240607)
    outcome = {"ok": 0, "warned": 0, "refused": 0}
    slowest = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DecodeWarning)
        for i in range(200):
            src = srcs[i % 2]
            p = tmp_path / f"fuzz_{i:03d}{src.suffix}"
            p.write_bytes(_mutate(src.read_bytes(), rng, i // 2))
            t0 = time.monotonic()
            try:
                clip = load_clip(p, step_s=0.25, fps=4, size=16, timeout_s=20)
            except DecodeError as e:
                check_error(e, p); outcome["refused"] += 1
            else:
                check_clip(clip, p); outcome["warned" if clip.warnings else "ok"] += 1
            slowest = max(slowest, time.monotonic() - t0)
            p.unlink()
    assert sum(outcome.values()) == 200
    assert outcome["ok"] + outcome["warned"] > 50 and outcome["refused"] > 5, outcome
    assert slowest < 20, slowest
