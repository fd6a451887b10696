"""avar_net.data: decoding on presentation timestamps, audio on the video timeline, the time grid, dataset layouts.

Every media file is generated here with PyAV (`make_test_media`) into a temporary folder; frame *i* of a generated
video shows *i* as grey stripes, so a decoded frame says which source frame the sampler picked."""
from __future__ import annotations
import csv, math, warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from avar_net.core import VAAR_CLASSES, ConfigError, DataError
from avar_net.data import (TimeGrid, XD_CODES, load_clip, parse_xd_annotations, parse_xd_name, pool_to_grid, read_vaar,
                           read_xd, read_xd_list, scan_vaar, split_records, write_splits, xd_frame_gt, xd_is_violent,
                           xd_stem)
from avar_net.decode import DecodeWarning, count_frames, decode_video_frames, iter_video_frames, probe, resize_crop
from avar_net.soundtrack import StreamResampler, decode_audio
from avar_net.testing import make_test_media, read_test_index


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    "Small tensor ops are much slower with 2 OpenMP threads on a busy 2-core machine; restore afterwards."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    "make(name, **kw) -> path, generated once per module."
    root = tmp_path_factory.mktemp("media")
    cache = {}
    def make(name, **kw):
        if name not in cache: cache[name] = make_test_media(root / name, **kw)
        return cache[name]
    return make


def indices(frames) -> list[int]:
    return [read_test_index(f) for f in frames]


def reference_sampling(path, times) -> list[int]:
    "Oracle: decode every frame with plain PyAV, then pick the latest frame whose timestamp is <= each target time."
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        start = float(s.start_time * s.time_base) if s.start_time is not None else 0.0
        fr = [(float(f.time) - start, read_test_index(f.to_ndarray(format="rgb24"))) for f in c.decode(s)]
    return [max((x for x in fr if x[0] <= t + 1e-9), key=lambda x: x[0], default=fr[0])[1] for t in times]


def tone_stats(x: np.ndarray, sr: int = 16000) -> tuple[float, float]:
    "(peak frequency in Hz, rms) of a waveform."
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)]), float(np.sqrt(np.mean(x ** 2)))


# ----------------------------------------------------------------------------------------------------------------
# probe

def test_probe_h264_aac(media):
    p = media("a.mp4", duration_s=2.0, fps=25, size=(64, 48))
    info = probe(p)
    assert info.path == p and info.has_video and info.has_audio
    assert info.duration_s == pytest.approx(2.0, abs=1e-3)
    assert info.fps == pytest.approx(25.0)
    assert (info.width, info.height, info.n_frames, info.rotation) == (64, 48, 50, 0)
    assert (info.audio_rate, info.audio_channels) == (48000, 2)
    assert info.video_codec == "h264" and info.audio_codec == "aac"
    assert count_frames(p) == 50


@pytest.mark.parametrize("name,kw", [
    ("mpeg4_mp3.avi", dict(vcodec="mpeg4", acodec="mp3", sr=44100)),
    ("mpeg4_mp3.mkv", dict(vcodec="mpeg4", acodec="mp3", sr=44100, channels=1)),
    ("vp8_opus.webm", dict(vcodec="libvpx", acodec="libopus", sr=48000)),
    ("h264_flac.mkv", dict(acodec="flac", sr=44100)),
    ("hevc_aac.mp4", dict(vcodec="hevc")),
    ("mpeg2_pcm.mov", dict(vcodec="mpeg2video", acodec="pcm_s16le", sr=44100)),
])
def test_codecs_and_containers(media, name, kw):
    p = media(name, duration_s=2.0, fps=25, size=(64, 48), **kw)
    info = probe(p)
    assert info.duration_s == pytest.approx(2.0, abs=0.05) and (info.width, info.height) == (64, 48)
    assert info.audio_rate == kw.get("sr", 48000)
    times, frames = decode_video_frames(p, fps=5, size=None)
    np.testing.assert_allclose(times, (np.arange(10) + 0.5) / 5)
    assert indices(frames) == reference_sampling(p, times)
    if not name.endswith(".avi"):       # the AVI muxer shifts frames after an empty chunk; the oracle above follows it
        assert indices(frames) == [int(t * 25) for t in times]
    wave, has_audio = decode_audio(p, duration_s=2.0)
    assert has_audio and wave.dtype == np.float32 and wave.shape == (32000,)
    f, rms = tone_stats(wave[4000:28000])
    assert abs(f - 440) < 3 and rms == pytest.approx(0.5 / math.sqrt(2), rel=0.12)


# ----------------------------------------------------------------------------------------------------------------
# video sampling

@pytest.mark.parametrize("fps", [1, 4, 10, 25, 60])
def test_sampling_is_latest_frame_at_or_before_target(media, fps):
    p = media("a.mp4", duration_s=2.0, fps=25, size=(64, 48))
    times, frames = decode_video_frames(p, fps=fps, size=None)
    expect_t = (np.arange(math.ceil(2.0 * fps - 0.5)) + 0.5) / fps
    np.testing.assert_allclose(times, expect_t)
    assert frames.dtype == torch.uint8 and frames.shape == (len(expect_t), 3, 48, 64)
    assert indices(frames) == [int(np.floor(t * 25 + 1e-9)) for t in times]


def test_2997_fps_is_exact_over_twelve_seconds(media):
    p = media("ntsc.mp4", duration_s=12.0, fps=Fraction(30000, 1001), size=(32, 24), acodec=None)
    info = probe(p)
    assert info.fps == pytest.approx(29.97, abs=1e-3) and info.n_frames == 360
    times, frames = decode_video_frames(p, fps=7, size=None)
    got = indices(frames)
    exact = [int(np.floor(t * 30000 / 1001)) for t in times]
    assert got == exact
    assert any(int(np.floor(t * 30)) != e for t, e in zip(times, exact))   # the test can tell 29.97 from 30


@pytest.mark.parametrize("ext", ["mkv", "mp4"])
def test_variable_frame_rate(media, ext):
    ft = [0.0, 0.1, 0.15, 0.5, 0.55, 1.3, 1.31, 2.0]
    p = media(f"vfr.{ext}", frame_times=ft, fps=30, size=(32, 32), duration_s=2.0)
    times, frames = decode_video_frames(p, fps=10, size=None)
    assert times[-1] < probe(p).duration_s
    expect = [max(i for i, s in enumerate(ft) if s <= t + 1e-9) for t in times]
    assert indices(frames) == expect


def test_upsampling_repeats_frames(media):
    p = media("slow.mkv", duration_s=2.0, fps=5, size=(32, 32), acodec=None)
    times, frames = decode_video_frames(p, fps=20, size=None)
    assert len(times) == 40 and indices(frames) == [int(t * 5) for t in times]


def test_chunks_and_windows_agree_with_full_decode(media):
    p = media("gop.mp4", duration_s=4.0, fps=25, size=(48, 32), gop=10)
    t_all, f_all = decode_video_frames(p, fps=8, size=24)
    chunks = list(iter_video_frames(p, fps=8, size=24, chunk=5))
    assert [len(t) for t, _ in chunks] == [5] * 6 + [2]
    assert all(x.shape[1:] == (3, 24, 24) for _, x in chunks)
    np.testing.assert_array_equal(np.concatenate([t for t, _ in chunks]), t_all)
    assert torch.equal(torch.cat([x for _, x in chunks]), f_all)
    for a, b in [(0.0, 1.3), (1.3, 2.9), (2.9, None), (2.5, 2.6)]:            # seeks to keyframes inside the file
        t, f = decode_video_frames(p, fps=8, size=24, start_s=a, end_s=b)
        sel = (t_all >= a) & (t_all < (b if b is not None else 99))
        np.testing.assert_array_equal(t, t_all[sel])
        assert torch.equal(f, f_all[torch.from_numpy(sel)])
    t, f = decode_video_frames(p, fps=8, size=24, start_s=3.5, end_s=3.5)
    assert t.shape == (0,) and f.shape == (0, 3, 24, 24)


@pytest.mark.parametrize("hw", [(100, 150), (150, 100), (20, 30), (37, 61), (256, 256), (8, 500)])
def test_resize_crop_matches_torchvision(hw):
    from torchvision.transforms.v2 import functional as TF
    x = torch.randint(0, 256, (3, *hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = TF.center_crop(TF.resize(x, [64], antialias=True), [64, 64])
    assert torch.equal(resize_crop(x, 64), ref)


def _red_corner(img: torch.Tensor) -> str:
    x = img.float()
    red = x[0] - (x[1] + x[2]) / 2
    h, w = red.shape
    corners = {"tl": red[: h // 4, : w // 4], "tr": red[: h // 4, -(w // 4):], "bl": red[-(h // 4):, : w // 4],
               "br": red[-(h // 4):, -(w // 4):]}
    return max(corners, key=lambda k: corners[k].mean())


@pytest.mark.parametrize("name,kw,rot,corner", [
    ("rot0.mp4", dict(), 0, "tl"),
    ("rot90.mp4", dict(rotation=90), 90, "bl"),        # counter-clockwise 90: top-left goes bottom-left
    ("rot180.mp4", dict(rotation=180), 180, "br"),
    ("rot270.mp4", dict(rotation=-90), 270, "tr"),     # a phone held upright: clockwise 90 for display
    ("rottag.mkv", dict(rotate_tag=90), 270, "tr"),    # legacy tag counts clockwise
])
def test_rotation_metadata_is_applied(media, name, kw, rot, corner):
    p = media(name, duration_s=0.5, fps=10, size=(64, 32), **kw)
    info = probe(p)
    assert info.rotation == rot
    assert (info.width, info.height) == ((64, 32) if rot in (0, 180) else (32, 64))
    _, frames = decode_video_frames(p, fps=4, size=None)
    assert frames.shape[2:] == (info.height, info.width)
    assert _red_corner(frames[0]) == corner
    _, small = decode_video_frames(p, fps=4, size=16)
    assert small.shape[1:] == (3, 16, 16)


def test_odd_and_tiny_frame_sizes(media):
    p = media("odd.mkv", vcodec="mpeg4", size=(33, 17), duration_s=0.5, fps=10)
    assert (probe(p).width, probe(p).height) == (33, 17)
    assert decode_video_frames(p, 4, None)[1].shape[1:] == (3, 17, 33)
    assert decode_video_frames(p, 4, 16)[1].shape[1:] == (3, 16, 16)
    one = media("one.avi", vcodec="mpeg4", size=(1, 1), duration_s=0.5, fps=10, acodec=None)
    info = probe(one)
    assert (info.width, info.height, info.has_audio) == (1, 1, False)
    _, f = decode_video_frames(one, 4, 8)
    assert f.shape == (2, 3, 8, 8) and f.float().std(dim=(2, 3)).max() < 1e-6   # a constant colour, upsampled
    with pytest.raises(Exception):                   # H.264 4:2:0 cannot encode 1x1: the writer refuses, not us
        make_test_media(one.with_name("one_h264.mp4"), size=(1, 1), duration_s=0.2, acodec=None)
    one444 = media("one444.mp4", size=(1, 1), pix_fmt="yuv444p", duration_s=0.2, acodec=None)
    assert decode_video_frames(one444, 4, None)[1].shape == (1, 3, 1, 1)


def test_resolution_change_mid_stream(media, tmp_path):
    "MPEG-TS segments concatenate byte-wise: 32x24 for 1 s, then 48x32; size=None keeps the first frame's size."
    a = make_test_media(tmp_path / "a.ts", size=(32, 24), acodec=None, fps=25, frame_times=[i / 25 for i in range(25)])
    b = make_test_media(tmp_path / "b.ts", size=(48, 32), acodec=None, fps=25,
                        frame_times=[1 + i / 25 for i in range(25)])
    p = tmp_path / "res.ts"; p.write_bytes(a.read_bytes() + b.read_bytes())
    t, f = decode_video_frames(p, 4, None)
    assert f.shape == (8, 3, 24, 32) and indices(f) == [int(x * 25) % 25 for x in t]
    assert decode_video_frames(p, 4, 16)[1].shape == (8, 3, 16, 16)


def test_4k_frame_short_clip(media):
    p = media("uhd.mp4", size=(3840, 2160), duration_s=0.12, fps=25, acodec=None)
    info = probe(p)
    assert (info.width, info.height) == (3840, 2160)
    t, f = decode_video_frames(p, fps=25, size=64)
    assert f.shape == (3, 3, 64, 64) and indices(f) == [0, 1, 2]


def test_bad_arguments_raise_config_error(media):
    p = media("a.mp4", duration_s=2.0, fps=25, size=(64, 48))
    for kw in [dict(fps=0, size=8), dict(fps=-1, size=8), dict(fps=4, size=0), dict(fps=4, size=8.5),
               dict(fps=float("nan"), size=8), dict(fps=4, size=8, chunk=0), dict(fps=4, size=8, timeout_s=0)]:
        with pytest.raises(ConfigError):
            decode_video_frames(p, **kw)
    with pytest.raises(ConfigError): decode_audio(p, sr=0)


# ----------------------------------------------------------------------------------------------------------------
# audio

@pytest.mark.parametrize("name,kw,amp", [
    ("u8.mkv", dict(acodec="pcm_u8", sr=8000, channels=1), 0.5),                       # 8-bit, 8 kHz, packed
    ("s16.mkv", dict(acodec="pcm_s16le", sr=44100, channels=2), 0.5),                   # 16-bit packed
    ("s24_96k.mov", dict(acodec="pcm_s24le", sr=96000), 0.5),                            # 24-bit, 96 kHz
    ("f32.mkv", dict(acodec="pcm_f32le", sr=44100), 0.5),                                # float packed
    ("fltp_aac48.mp4", dict(acodec="aac", sr=48000, channels=1), 0.5),                    # float planar, mono
    ("s16p_mp3.mkv", dict(acodec="mp3", sr=44100, sample_fmt="s16p"), 0.5),              # 16-bit planar
    ("opus.webm", dict(vcodec="libvpx", acodec="libopus", sr=48000, sample_fmt="flt"), 0.5),
    ("six_aac.mkv", dict(acodec="aac", channels=6, channel_gains=[1, .5, 0, 0, 0, .5]), 0.5 * 2 / 6),
    ("six_pcm.mkv", dict(acodec="pcm_s16le", channels=6), 0.5),
    ("stereo_lr.mkv", dict(acodec="pcm_s16le", channels=2, channel_gains=[1, 0]), 0.25),   # mono = channel mean
    ("twelve.mov", dict(acodec="pcm_s24le", channels=12, channel_gains=[1] + [0] * 11), 0.5 / 12),  # > 8 channels
    ("sixteen.mkv", dict(acodec="pcm_s16le", channels=16, channel_gains=[0] * 15 + [1]), 0.5 / 16),
])
def test_audio_formats_rates_channels(media, name, kw, amp):
    p = media(name, duration_s=2.0, fps=25, size=(32, 32), **{"vcodec": "h264", **kw})
    info = probe(p)
    assert info.audio_rate == kw["sr"] if "sr" in kw else True
    assert info.audio_channels == kw.get("channels", 2)
    wave, has_audio = decode_audio(p)
    assert has_audio and wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) == round(info.duration_s * 16000)
    f, rms = tone_stats(wave[4000:28000])
    assert abs(f - 440) < 3
    assert rms == pytest.approx(amp / math.sqrt(2), rel=0.1)


@pytest.mark.parametrize("name,kw,tol_ms", [("late.mkv", dict(acodec="flac"), 0.1),
                                            ("late.mp4", dict(acodec="aac"), 1.5),
                                            ("late.webm", dict(vcodec="libvpx", acodec="libopus"), 1.5),
                                            ("late_mp3.mkv", dict(acodec="mp3", sr=44100), 1.5)])
def test_late_audio_is_padded_never_shifted(media, name, kw, tol_ms):
    "An audio track starting at 0.7 s with a 1 ms click at clip time 1.0 s: silence before 0.7 s, click at 1.0 s."
    sr = kw.get("sr", 48000)
    w = np.zeros(int(1.3 * sr)); i = int(0.3 * sr); w[i:i + sr // 1000] = 0.8
    p = media(name, duration_s=2.0, fps=25, size=(32, 32), audio_start_s=0.7, waveform=w, channels=1, **kw)
    wave, has_audio = decode_audio(p)
    assert has_audio and len(wave) == 32000
    assert np.abs(wave[: int(0.69 * 16000)]).max() < 1e-3           # padded with silence before the track starts
    env = np.convolve(np.abs(wave), np.ones(16) / 16, "same")
    click_ms = (np.argmax(env) / 16000 - 1.0) * 1000 - 0.5           # centre of the 1 ms click
    assert abs(click_ms) <= tol_ms, click_ms                          # lossy codecs: container/priming rounding


def test_audio_shorter_than_video_is_zero_padded(media):
    p = media("shortaudio.mp4", duration_s=2.0, fps=25, size=(32, 32), audio_duration_s=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DecodeWarning)     # a short track is not a loss
        wave, has_audio = decode_audio(p)
    assert has_audio and len(wave) == 32000
    assert np.abs(wave[17000:]).max() < 1e-3 and np.abs(wave[2000:15000]).max() > 0.4


def test_no_audio_stream_gives_silence(media):
    p = media("silent.mp4", duration_s=1.6, acodec=None)
    wave, has_audio = decode_audio(p)
    assert not has_audio and wave.dtype == np.float32 and wave.shape == (25600,) and not wave.any()
    clip = load_clip(p, size=32)
    assert not clip.has_audio and clip.audio.shape == (25600,) and clip.grid.T == 7


def test_decode_audio_duration_argument(media):
    p = media("a.mp4", duration_s=2.0, fps=25, size=(64, 48))
    long, _ = decode_audio(p, duration_s=3.0)
    short, _ = decode_audio(p, duration_s=1.0)
    full, _ = decode_audio(p)
    assert len(long) == 48000 and not long[33000:].any()
    assert len(short) == 16000
    np.testing.assert_allclose(short[:15000], full[:15000], atol=1e-5)
    assert decode_audio(p, sr=8000)[0].shape == (16000,)


@pytest.mark.parametrize("orig", [48000, 44100, 8000, 96000, 22050, 16000])
def test_stream_resampler_equals_whole_signal(orig):
    import torchaudio.functional as AF
    rng = np.random.default_rng(orig)
    x = rng.standard_normal(int(orig * 1.7) + 13).astype(np.float32)
    r = StreamResampler(orig, 16000, block_s=0.25)
    i = 0
    while i < len(x):
        n = int(rng.integers(1, orig // 3)); r.push(x[i:i + n]); i += n
    y = r.finish()
    ref = AF.resample(torch.from_numpy(x), orig, 16000).numpy()
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, atol=2e-5)


@pytest.mark.parametrize("orig", [48001, 22254])
def test_exotic_rates_use_ffmpeg_resampler_without_delay(media, orig):
    t = np.arange(orig * 2) / orig
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    r = StreamResampler(orig, 16000)
    assert r.swr is not None                              # torchaudio's kernel would need hundreds of MB
    for i in range(0, len(x), 4999): r.push(x[i:i + 4999])
    y = r.finish()
    assert len(y) == 32000
    ref = 0.5 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)
    assert np.abs(y[500:31000] - ref[500:31000]).max() < 1e-3   # same phase: no delay
    p = media(f"rate{orig}.mkv", duration_s=1.0, acodec="pcm_s16le", sr=orig, channels=1)
    wave, has = decode_audio(p)
    assert has and len(wave) == 16000 and tone_stats(wave[2000:14000])[0] == pytest.approx(440, abs=3)


# ----------------------------------------------------------------------------------------------------------------
# grid and pooling

def test_time_grid_for_duration():
    g = TimeGrid.for_duration(1.1, 0.25)
    assert g.T == 5 and g.step_s == 0.25
    np.testing.assert_allclose(g.starts, [0, .25, .5, .75, 1.0]); np.testing.assert_allclose(g.ends, g.starts + .25)
    np.testing.assert_allclose(g.edges, np.arange(6) * .25)
    assert TimeGrid.for_duration(1.0, 0.25).T == 4          # exact multiples do not get an empty extra step
    assert TimeGrid.for_duration(0.75000000001, 0.25).T == 3
    assert TimeGrid.for_duration(0.0, 0.25).T == 1
    assert g.index_of([0.0, 0.25 - 1e-12, 0.25, 1.2499, 1.25, -1e-9, np.nan]).tolist() == [0, 0, 1, 4, -1, -1, -1]
    with pytest.raises(ConfigError): TimeGrid.for_duration(1.0, 0.0)
    with pytest.raises(ConfigError): TimeGrid.for_duration(-1.0, 0.25)


def test_time_grid_for_xd():
    g = TimeGrid.for_xd(1000)
    assert g.T == 62 and g.step_s == pytest.approx(16 / 24)
    assert g.index_of(np.arange(g.T * 16) / 24).tolist() == np.repeat(np.arange(62), 16).tolist()
    assert g.index_of([g.T * 16 / 24]).tolist() == [-1]
    assert [TimeGrid.for_xd(n).T for n in (1, 16, 17, 32, 33)] == [0, 0, 1, 1, 2]
    with pytest.raises(DataError): TimeGrid.for_xd(0)


def test_pool_to_grid():
    g = TimeGrid.for_duration(1.0, 0.25)
    t = np.array([0.1, 0.2, 0.3, 0.9, 5.0])
    f = np.array([[1, 10], [3, 30], [5, 50], [7, 70], [99, 99]], np.float64)
    out = pool_to_grid(t, f, g)
    assert out.dtype == np.float32 and out.shape == (4, 2)
    np.testing.assert_allclose(out, [[2, 20], [5, 50], [5, 50], [7, 70]])   # step 2 empty: tie -> earlier step
    np.testing.assert_allclose(pool_to_grid(t, torch.tensor(f), g), out)
    with pytest.raises(DataError): pool_to_grid([9.0], [[1.0]], g)
    with pytest.raises(DataError): pool_to_grid([0.1, 0.2], [[1.0]], g)
    assert pool_to_grid([0.1], [[1.0]], TimeGrid.for_xd(10)).shape == (0, 1)


# ----------------------------------------------------------------------------------------------------------------
# load_clip

def test_load_clip(media):
    p = media("a.mp4", duration_s=2.0, fps=25, size=(64, 48))
    clip = load_clip(p, step_s=0.25, fps=4, size=32)
    assert clip.grid.T == 8 and clip.frames.shape == (8, 3, 32, 32) and clip.audio.shape == (32000,)
    assert clip.grid.index_of(clip.frame_times).tolist() == list(range(8))
    assert clip.has_audio and clip.sr == 16000 and clip.duration_s == pytest.approx(2.0, abs=1e-3)
    assert clip.warnings == [] and clip.info.width == 64
    clip2 = load_clip(p, step_s=0.5, fps=8, size=None)
    assert clip2.grid.T == 4 and clip2.frames.shape == (16, 3, 48, 64)
    assert np.bincount(clip2.grid.index_of(clip2.frame_times)).tolist() == [4, 4, 4, 4]


@pytest.mark.parametrize("dur", [0.04, 0.1, 0.2])
def test_clip_shorter_than_one_step(media, dur):
    p = media(f"short_{dur}.mp4", duration_s=dur, fps=25, size=(32, 32))
    clip = load_clip(p, step_s=0.25, fps=4, size=16)
    assert clip.grid.T == 1 and clip.frames.shape[0] == 1
    assert clip.grid.index_of(clip.frame_times).tolist() == [0]
    assert len(clip.audio) == round(clip.duration_s * 16000)


# ----------------------------------------------------------------------------------------------------------------
# VAAR layout

def _vaar(root: Path, media, per_class=2, classes=("Abuse", "Baby cry", "Police siren")):
    src = media("tiny.mp4", duration_s=0.3, fps=10, size=(16, 16))
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class): (root / c / f"clip{i}.mp4").write_bytes(src.read_bytes())
    return root


def test_vaar_round_trip(tmp_path, media):
    root = _vaar(tmp_path / "vaar", media, per_class=4)
    recs = split_records(scan_vaar(root), (0.5, 0.25, 0.25), seed=1)
    assert split_records(scan_vaar(root), (0.5, 0.25, 0.25), seed=1) == recs          # seeded
    for lab in {r.label for r in recs}:
        assert sorted(r.split for r in recs if r.label == lab) == ["test", "train", "train", "val"]
    write_splits(root, recs)
    rows = list(csv.DictReader(open(root / "splits.csv")))
    assert list(rows[0]) == ["clip", "label", "split"] and rows[0]["clip"] == "Abuse/clip0.mp4"
    back = read_vaar(root)
    assert [(r.clip_id, r.path, r.label, r.label_name, r.split) for r in back] == \
           [(r.clip_id, r.path, r.label, r.label_name, r.split) for r in recs]
    assert {r.label_name for r in back} == {"Abuse", "Baby cry", "Police siren"}
    assert {r.label for r in back} == {VAAR_CLASSES.index(c) for c in ("Abuse", "Baby cry", "Police siren")}
    assert back[4].clip_id == "Baby_cry__clip0"


def test_vaar_labels_by_name_and_validation(tmp_path, media):
    root = _vaar(tmp_path / "v", media)
    def write(text): (root / "splits.csv").write_text(text)
    write("clip,label,split\nAbuse/clip0.mp4,abuse,train\n\"Baby cry/clip1.mp4\",Baby cry,val\n"
          "Police siren/clip0.mp4,8,test\n")
    recs = read_vaar(root)
    assert [(r.label, r.label_name, r.split) for r in recs] == [(0, "Abuse", "train"), (1, "Baby cry", "val"),
                                                                (8, "Police siren", "test")]
    cases = [("clip,label,split\nAbuse/clip0.mp4,Robbery,train\n", "unknown class 'Robbery'"),
             ("clip,label,split\nAbuse/clip0.mp4,12,train\n", "label 12"),
             ("clip,label,split\nAbuse/clip7.mp4,Abuse,train\n", "Abuse/clip7.mp4"),
             ("clip,label,split\nAbuse/clip0.mp4,Crash,train\n", "folder 'Abuse'"),
             ("clip,label,split\nAbuse/clip0.mp4,0,training\n", "unknown split"),
             ("clip,label,split\nAbuse/clip0.mp4,0,train\nAbuse/clip0.mp4,0,test\n", "duplicate"),
             ("clip,split\nAbuse/clip0.mp4,train\n", "missing column"),
             ("clip,label,split\n", "lists no clips")]
    for text, msg in cases:
        write(text)
        with pytest.raises(DataError, match=msg): read_vaar(root)
    (root / "splits.csv").unlink()
    with pytest.raises(DataError, match="splits.csv"): read_vaar(root)
    (root / "Robbery").mkdir()
    with pytest.raises(DataError, match="Robbery"): scan_vaar(root)


# ----------------------------------------------------------------------------------------------------------------
# XD-Violence

def test_xd_names():
    assert parse_xd_name("v=8ZSFhbY7fF8__#1_label_B2-0-0.mp4") == ["B2"]
    assert parse_xd_name("Black.Hawk.Down.2001__#01-40-52_01-42-05_label_B2-G-0") == ["B2", "G"]
    assert parse_xd_name("dir/sub/Bad.Boys.1995__#01-11-55_01-12-40_label_A.mp4") == ["A"]
    assert parse_xd_name("Bad.Boys.1995__#01-11-55_01-12-40_label_B1-B4-B6__3.npy") == ["B1", "B4", "B6"]
    assert xd_stem("list/x__#1_label_A__0.npy") == "x__#1_label_A" and xd_stem("a.mp4.mp4") == "a"
    assert xd_is_violent("x_label_B5-0-0") and not xd_is_violent("x_label_A")
    for bad in ["no_label_here.mp4", "x_label_B3-0-0", "x_label_0-0-0", "x_label_A-B1-0"]:
        with pytest.raises(DataError): parse_xd_name(bad)
    assert set(XD_CODES) == {"A", "B1", "B2", "B4", "B5", "B6", "G"}


ANNOTATIONS = """\
v1__#1_label_B1-0-0.mp4 3 7 20 22
v2__#00-01_00-02_label_B2-G-0 0 5

v3__#1_label_B6-0-0.mp4 10 20 30 40 50 60 70 400
v1__#1_label_B1-0-0 33 35
"""


def official_gt(names, n_frames, ann_lines):
    "The make_gt.py recipe restated independently: text lines in, one concatenated array out."
    table = {}
    for line in ann_lines:
        parts = line.split()
        if not parts: continue
        key = parts[0].replace(".mp4", "")
        table.setdefault(key, []).extend(int(v) for v in parts[1:])
    out = []
    for name, n in zip(names, n_frames):
        gt = np.zeros(n)
        key = Path(name).name.replace(".mp4", "")
        vals = table.get(key, [])
        for j in range(len(vals) // 2):
            gt[vals[2 * j]: vals[2 * j + 1]] = 1
        gt = gt[:-1]
        if (n - 1) % 16 != 0:
            gt = gt[: -((n - 1) % 16)]
        out.append(gt)
    return np.concatenate(out)


def test_xd_annotations_and_gt(tmp_path):
    f = tmp_path / "annotations.txt"; f.write_text(ANNOTATIONS)
    ann = parse_xd_annotations(f)
    assert ann == {"v1__#1_label_B1-0-0": [(3, 7), (20, 22), (33, 35)],
                   "v2__#00-01_00-02_label_B2-G-0": [(0, 5)],
                   "v3__#1_label_B6-0-0": [(10, 20), (30, 40), (50, 60), (70, 400)]}
    names = ["v1__#1_label_B1-0-0.mp4", "n1__#1_label_A.mp4", "v3__#1_label_B6-0-0.mp4",
             "v2__#00-01_00-02_label_B2-G-0.mp4", "n2__#1_label_A.mp4"]
    n_frames = [50, 17, 333, 16, 1]
    gt = xd_frame_gt(names, n_frames, ann)
    ref = official_gt(names, n_frames, ANNOTATIONS.splitlines())
    np.testing.assert_array_equal(gt, ref)
    assert len(gt) == sum(16 * ((n - 1) // 16) for n in n_frames) == 48 + 16 + 320 + 0 + 0
    assert gt[:48].nonzero()[0].tolist() == [3, 4, 5, 6, 20, 21, 33, 34]
    assert gt[64:384].sum() == 10 + 10 + 10 + (320 - 70)          # the last interval runs past the kept frames
    np.testing.assert_array_equal(xd_frame_gt(names, dict(zip(names, n_frames)), ann), gt)
    np.testing.assert_array_equal(xd_frame_gt(names, {xd_stem(n): k for n, k in zip(names, n_frames)}, ann), gt)
    assert sum(TimeGrid.for_xd(n).T for n in n_frames) * 16 == len(gt)
    with pytest.raises(DataError, match="no line"): xd_frame_gt(["v9__#1_label_B1-0-0.mp4"], [40], ann)
    with pytest.raises(DataError, match="frame counts"): xd_frame_gt(names, n_frames[:-1], ann)
    with pytest.raises(DataError, match="no frame count"): xd_frame_gt(names, {"x": 3}, ann)


@pytest.mark.parametrize("text,msg", [("v__#1_label_B1-0-0 3 7 9\n", "line 1"),
                                      ("\n\nv__#1_label_B1-0-0 3 x\n", "line 3"),
                                      ("v__#1_label_B1-0-0\n", "line 1"),
                                      ("a_label_B1-0-0 1 2\nv__#1_label_B1-0-0 -3 7\n", "line 2")])
def test_xd_annotation_errors_name_the_line(tmp_path, text, msg):
    f = tmp_path / "annotations.txt"; f.write_text(text)
    with pytest.raises(DataError, match=msg): parse_xd_annotations(f)


def test_read_xd(tmp_path, media):
    src = media("tiny.mp4", duration_s=0.3, fps=10, size=(16, 16))
    root = tmp_path / "xd"; (root / "videos").mkdir(parents=True)
    names = ["a__#1_label_B1-0-0.mp4", "b__#1_label_A.mp4", "c__#1_label_G-B2-0.mp4", "d__#1_label_A.mp4"]
    for n in names: (root / "videos" / n).write_bytes(src.read_bytes())
    (root / "train.list").write_text("videos/a__#1_label_B1-0-0.mp4\nvideos/b__#1_label_A.mp4\n\n")
    (root / "test.list").write_text("videos/c__#1_label_G-B2-0.mp4\nvideos/d__#1_label_A.mp4\n")
    recs = read_xd(root)
    assert [(r.clip_id, r.label, r.label_name, r.split) for r in recs] == [
        ("a__#1_label_B1-0-0", 1, "Violent", "train"), ("b__#1_label_A", 0, "Normal", "train"),
        ("c__#1_label_G-B2-0", 1, "Violent", "test"), ("d__#1_label_A", 0, "Normal", "test")]
    assert read_xd_list(root / "train.list") == ["videos/a__#1_label_B1-0-0.mp4", "videos/b__#1_label_A.mp4"]
    (root / "test.list").write_text("videos/zz__#1_label_A.mp4\n")
    with pytest.raises(DataError, match="zz__#1_label_A.mp4"): read_xd(root)
    (root / "test.list").unlink()
    with pytest.raises(DataError, match="test.list"): read_xd(root)
