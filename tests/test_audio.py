"Tests of avar_net.audio: weights, timing, chunking, normalisation, precision paths."
import socket
import numpy as np
import pytest
import torch

import avar_net.audio as au
from avar_net.audio import (AudioExtractor, Float32Island, WeightSpec, chunk_bounds, conv_out_len, load_wav2vec2,
                            parse_weight_spec, random_init, resolve_precision, stitch_keep, tiny_wav2vec2_config)
from avar_net.core import ConfigError, DataError, WeightsError, sha256_file
from avar_net.data import TimeGrid

SR = 16000


def noise(seconds, seed=0, scale=0.1):
    return (scale * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def save_w2v(folder, cfg=None, seed=0, do_normalize=True, safe=True):
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model
    cfg = cfg or tiny_wav2vec2_config()
    model = random_init(lambda: Wav2Vec2Model(cfg), seed)
    model.save_pretrained(folder)
    if not safe:  # the legacy pickle format, as older hub repos ship it
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    Wav2Vec2FeatureExtractor(do_normalize=do_normalize).save_pretrained(folder)
    return folder


@pytest.fixture
def local_model_dir(tmp_path):
    "A Wav2Vec2 whose layer-0 vectors depend only on nearby samples: layer-norm conv stack, no input normalisation."
    return save_w2v(tmp_path / "w2v_local", tiny_wav2vec2_config(feat_extract_norm="layer", do_stable_layer_norm=True),
                    do_normalize=False)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k): raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------- specs and weights

def test_parse_weight_spec(tmp_path):
    assert parse_weight_spec("random") == WeightSpec("random", "random", 0)
    assert parse_weight_spec("random:12").seed == 12
    assert parse_weight_spec("random-tiny").kind == "random-tiny"
    assert parse_weight_spec("facebook/wav2vec2-base-960h").kind == "hub"
    assert parse_weight_spec(str(tmp_path)).path == tmp_path.resolve()
    assert parse_weight_spec(tmp_path).kind == "local"
    with pytest.raises(ConfigError): parse_weight_spec("random:abc")
    with pytest.raises(ConfigError): parse_weight_spec("")
    with pytest.raises(WeightsError, match="no such weights"): parse_weight_spec(str(tmp_path / "nope"))


def test_random_weights_reproducible_and_rng_untouched():
    torch.manual_seed(123); expect = torch.rand(3)
    torch.manual_seed(123)
    a = AudioExtractor("random-tiny:3", precision="fp32")
    assert torch.equal(torch.rand(3), expect)  # building the model did not consume the caller's RNG
    b = AudioExtractor("random-tiny:3", precision="fp32")
    c = AudioExtractor("random-tiny:4", precision="fp32")
    w = noise(1.0)
    fa, fb, fc = a.features(w)[1], b.features(w)[1], c.features(w)[1]
    np.testing.assert_array_equal(fa, fb)
    assert np.abs(fa - fc).max() > 1e-3
    assert (a.weights_id, c.weights_id) == ("random-tiny:3", "random-tiny:4")
    assert AudioExtractor("random-tiny").weights_id == "random-tiny:0"


@pytest.mark.parametrize("safe", [True, False])
def test_local_folder_round_trip(tmp_path, safe, no_network):
    d = save_w2v(tmp_path / "w2v", seed=0, safe=safe)
    wfile = d / ("model.safetensors" if safe else "pytorch_model.bin")
    assert wfile.exists()
    loc = AudioExtractor(str(d), precision="fp32")
    assert loc.weights_id == f"{d.resolve()}@sha256:{sha256_file(wfile)}"
    assert loc.weights_sha256 == sha256_file(wfile)
    ref = AudioExtractor("random-tiny:0", precision="fp32")  # the same architecture and seed
    w = noise(1.5)
    np.testing.assert_allclose(loc.features(w)[1], ref.features(w)[1], atol=1e-5)
    # a path to the weight file inside the folder works too
    assert AudioExtractor(str(wfile), precision="fp32").weights_id.endswith(sha256_file(wfile))


def test_ctc_checkpoint_loads_into_bare_model(tmp_path):
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC
    cfg = tiny_wav2vec2_config(vocab_size=12)
    ctc = random_init(lambda: Wav2Vec2ForCTC(cfg), 0)
    ctc.save_pretrained(tmp_path); Wav2Vec2FeatureExtractor().save_pretrained(tmp_path)
    model, fe, wid, sha = load_wav2vec2(str(tmp_path))
    assert torch.equal(model.feature_extractor.conv_layers[0].conv.weight,
                       ctc.wav2vec2.feature_extractor.conv_layers[0].conv.weight)
    assert fe["do_normalize"] is True and sha in wid


def test_local_folder_missing_files(tmp_path):
    from transformers import Wav2Vec2Model
    random_init(lambda: Wav2Vec2Model(tiny_wav2vec2_config()), 0).save_pretrained(tmp_path)  # no preprocessor_config.json
    with pytest.raises(WeightsError, match="missing preprocessor_config.json") as e:
        AudioExtractor(str(tmp_path))
    assert "huggingface-cli download facebook/wav2vec2-base-960h" in str(e.value) and str(tmp_path) in str(e.value)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="model.safetensors or pytorch_model.bin"):
        AudioExtractor(str(tmp_path))


def test_mismatched_weights(tmp_path):
    save_w2v(tmp_path, tiny_wav2vec2_config())
    cfg = tiny_wav2vec2_config(hidden_size=48, intermediate_size=96)  # config says 48-d, weights are 32-d
    cfg.save_pretrained(tmp_path)
    with pytest.raises(WeightsError):
        AudioExtractor(str(tmp_path))


def test_hub_id_without_cache_offline(tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants as hc
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(WeightsError) as e:
        AudioExtractor("facebook/wav2vec2-base-960h")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE=1" in msg and "\n" not in msg
    assert ("huggingface-cli download facebook/wav2vec2-base-960h config.json model.safetensors preprocessor_config.json "
            "--local-dir ~/models/wav2vec2-base-960h") in msg
    assert "--audio-backbone ~/models/wav2vec2-base-960h" in msg


def test_hub_id_from_local_cache(tmp_path, monkeypatch, no_network):
    "A hub id whose files are in the Hugging Face cache loads offline, and its id names the hub id and the sha256."
    import huggingface_hub.constants as hc
    cache = tmp_path / "hub"
    snap = cache / "models--acme--w2v-tiny" / "snapshots" / ("a" * 40)
    save_w2v(snap, seed=2)
    (cache / "models--acme--w2v-tiny" / "refs").mkdir(parents=True)
    (cache / "models--acme--w2v-tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    ex = AudioExtractor("acme/w2v-tiny", precision="fp32")
    assert ex.weights_id == f"acme/w2v-tiny@sha256:{sha256_file(snap / 'model.safetensors')}"
    w = noise(1.0)
    np.testing.assert_allclose(ex.features(w)[1], AudioExtractor("random-tiny:2", precision="fp32").features(w)[1], atol=1e-5)


# ---------------------------------------------------------------- timing, chunking, stitching

def test_tiny_shapes_and_times():
    ex = AudioExtractor("random-tiny")
    times, feats = ex.features(noise(2.5))
    assert feats.shape == ((40000 - 400) // 320 + 1, 64) and feats.dtype == np.float32
    np.testing.assert_allclose(times, 0.0125 + 0.02 * np.arange(len(feats)), atol=1e-12)
    assert (ex.hop, ex.receptive_field, ex.dim, ex.sr) == (320, 400, 64, 16000)


def test_full_size_random_dims():
    ex = AudioExtractor("random", precision="fp32")
    t, f = ex.features(noise(1.0))
    assert f.shape == (49, 768) and ex.dim == 768 and ex.num_layers == 12 and ex.group_norm
    assert ex.weights_id == "random:0"


def test_vector_times_match_the_conv_stack(local_model_dir):
    "An impulse at time p changes exactly the conv vectors whose window holds p, and their centres surround p."
    ex = AudioExtractor(str(local_model_dir), precision="fp32")
    n = 2 * SR
    for p in (1234, 16000, 27777):
        x = np.zeros(n, np.float32); y = x.copy(); y[p] = 1.0
        with torch.inference_mode():
            fx = ex.model.feature_extractor(torch.from_numpy(x)[None])[0].T.numpy()
            fy = ex.model.feature_extractor(torch.from_numpy(y)[None])[0].T.numpy()
        changed = np.flatnonzero(np.abs(fx - fy).max(1) > 0)
        t = ex.times(len(fx))[changed]
        centre = (p + 0.5) / SR
        assert np.abs(t - centre).max() <= ex.receptive_field / 2 / SR + 1e-9
        assert abs(t.mean() - centre) < ex.hop / SR
        np.testing.assert_array_equal(changed, [i for i in range(len(fx)) if 320 * i <= p < 320 * i + 400])


@pytest.mark.parametrize("seconds", [2.49, 7.3])
def test_chunked_equals_unchunked_exactly_for_a_local_model(local_model_dir, seconds):
    w = noise(seconds, seed=3)
    full = AudioExtractor(str(local_model_dir), layer=0, precision="fp32", chunk_s=60)
    ch = AudioExtractor(str(local_model_dir), layer=0, precision="fp32", chunk_s=2.5, overlap_s=1.0)
    ta, a = full.features(w); tb, b = ch.features(w)
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_chunked_close_to_unchunked_for_group_norm():
    "With a group-norm model each chunk is normalised on its own; on a stationary signal the vectors still agree."
    w = noise(9.0, seed=4)
    ta, a = AudioExtractor("random-tiny", precision="fp32", chunk_s=60).features(w)
    tb, b = AudioExtractor("random-tiny", precision="fp32", chunk_s=3.0, overlap_s=1.0).features(w)
    np.testing.assert_array_equal(ta, tb)
    assert cosine(a, b).min() > 0.98


def test_chunk_bounds_and_stitch_cover_every_vector_once():
    K, S = (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)
    for n in [400, 1000, 48000, 48001, 48000 + 319, 16000 * 61 + 7, 16000 * 300]:
        for chunk, ov in [(48000, 16000), (16000 * 30, 16000), (3200, 640)]:
            b = chunk_bounds(n, chunk, ov, 320)
            assert b[0][0] == 0 and b[-1][1] == n
            assert all(a % 320 == 0 for a, _ in b)
            assert all(e - s >= min(chunk, n) for s, e in b)  # never a short tail chunk
            idx = np.concatenate([g0 + np.flatnonzero(keep) for g0, keep in stitch_keep(b, K, S)])
            np.testing.assert_array_equal(idx, np.arange(conv_out_len(n, K, S)))


def test_long_audio_bounded_chunks(monkeypatch):
    "A 95 s clip with 30 s chunks never runs the model on more than one chunk (+ hop) of samples."
    ex = AudioExtractor("random-tiny", chunk_s=30, overlap_s=1)
    seen = []
    orig = ex.model.forward
    def spy(x, *a, **k):
        seen.append(tuple(x.shape)); return orig(x, *a, **k)
    monkeypatch.setattr(ex.model, "forward", spy)
    t, f = ex.features(noise(95.0))
    assert len(f) == (95 * SR - 400) // 320 + 1
    assert max(s[-1] for s in seen) < 30 * SR + 320 and len(seen) == 4


def test_no_attention_mask_and_equal_length_batches(monkeypatch):
    ex = AudioExtractor("random-tiny", precision="fp32", chunk_s=2.0, overlap_s=0.5, batch_size=4)
    assert ex.group_norm
    calls = []
    orig = ex.model.forward
    def spy(*a, **k):
        calls.append((a, k)); return orig(*a, **k)
    monkeypatch.setattr(ex.model, "forward", spy)
    w = noise(8.3)
    _, batched = ex.features(w)
    for a, k in calls:
        assert k.get("attention_mask") is None and len(a) == 1  # only the waveform, never a mask
    assert any(a[0].shape[0] > 1 for a, _ in calls)            # equal-length chunks ran together
    one = AudioExtractor("random-tiny", precision="fp32", chunk_s=2.0, overlap_s=0.5, batch_size=1)
    np.testing.assert_allclose(batched, one.features(w)[1], atol=1e-5)


# ---------------------------------------------------------------- normalisation, layers, inputs, grid

def _model_inputs(ex, monkeypatch):
    seen = []
    orig = ex.model.forward
    def spy(x, *a, **k):
        seen.append(x.detach().clone()); return orig(x, *a, **k)
    monkeypatch.setattr(ex.model, "forward", spy)
    return seen


def test_normalisation_follows_the_checkpoint_config(tmp_path, monkeypatch):
    w = 3 * noise(2.0, seed=5) + 0.3
    ex = AudioExtractor("random-tiny", precision="fp32")
    assert ex.do_normalize  # Wav2Vec2FeatureExtractor(do_normalize=True): zero mean, unit variance per input
    seen = _model_inputs(ex, monkeypatch)
    ex.features(w)
    x = seen[0][0].double()
    assert abs(x.mean().item()) < 1e-5 and abs(x.std(unbiased=False).item() - 1) < 1e-4
    expect = (w - w.mean()) / np.sqrt(w.var() + 1e-7)
    np.testing.assert_allclose(x.numpy(), expect, atol=1e-4)
    raw = AudioExtractor(str(save_w2v(tmp_path / "raw", do_normalize=False)), precision="fp32")
    assert not raw.do_normalize
    seen = _model_inputs(raw, monkeypatch)
    raw.features(w)
    np.testing.assert_array_equal(seen[0][0].numpy(), w)  # passed through untouched


def test_layer_choice():
    w = noise(1.0)
    last = AudioExtractor("random-tiny", precision="fp32").features(w)[1]
    np.testing.assert_array_equal(AudioExtractor("random-tiny", layer=2, precision="fp32").features(w)[1], last)
    first = AudioExtractor("random-tiny", layer=0, precision="fp32").features(w)[1]
    assert np.abs(first - last).max() > 1e-2
    with pytest.raises(ConfigError, match="out of range"): AudioExtractor("random-tiny", layer=3)
    with pytest.raises(ConfigError): AudioExtractor("random-tiny", chunk_s=1.0, overlap_s=1.0)


def test_bad_and_short_inputs():
    ex = AudioExtractor("random-tiny")
    with pytest.raises(DataError, match="mono"): ex.features(np.zeros((2, 16000), np.float32))
    with pytest.raises(DataError, match="empty"): ex.features(np.zeros(0, np.float32))
    bad = noise(1.0); bad[5] = np.nan
    with pytest.raises(DataError, match="NaN"): ex.features(bad)
    t, f = ex.features(noise(0.005))  # shorter than one receptive field: padded to 25 ms -> one vector
    assert f.shape == (1, 64) and t[0] == pytest.approx(0.0125)
    t2, f2 = ex.features(torch.from_numpy(noise(1.0)))  # torch input accepted
    assert f2.shape == (49, 64)


def test_extract_pools_onto_the_grid():
    ex = AudioExtractor("random-tiny")
    w = noise(3.1)
    times, feats = ex.features(w)
    grid = TimeGrid.for_duration(3.1, 0.25)
    A = ex.extract(w, grid)
    assert A.shape == (grid.T, 64) and A.dtype == np.float32
    for k in range(grid.T):
        sel = (times >= grid.starts[k]) & (times < grid.starts[k] + 0.25)
        np.testing.assert_allclose(A[k], feats[sel].mean(0), atol=1e-5)


# ---------------------------------------------------------------- precision

def test_precision_auto_falls_back_without_bf16(monkeypatch):
    monkeypatch.setattr(au, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(au, "int8_supported", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cpu", int8=True) == "fp32"
    ex = AudioExtractor("random-tiny", precision="auto")
    assert ex.precision_used == "fp32"
    assert not isinstance(ex.model.feature_extractor.conv_layers[0], Float32Island)


def test_precision_bf16_path(monkeypatch):
    monkeypatch.setattr(au, "cpu_supports_bf16", lambda: True)
    fast = AudioExtractor("random-tiny", precision="auto")
    assert fast.precision_used == "bf16"
    assert isinstance(fast.model.feature_extractor.conv_layers[0], Float32Island)  # first conv + group norm in fp32
    w = noise(3.0)
    tf, f = fast.features(w)
    tr, r = AudioExtractor("random-tiny", precision="fp32").features(w)
    np.testing.assert_array_equal(tf, tr)
    assert f.dtype == np.float32 and cosine(f, r).min() > 0.99
    with pytest.raises(ConfigError): resolve_precision("half")


def test_cpu_capability_check_reads_flags(monkeypatch):
    monkeypatch.setattr(au, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert not au.cpu_supports_bf16()
    monkeypatch.setattr(au, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert au.cpu_supports_bf16()
    monkeypatch.setattr(au, "cpu_flags", lambda: {"amx_bf16", "amx_tile"})
    assert au.cpu_supports_bf16()


def test_bf16_weights_stored_once_are_bit_identical_to_autocast(monkeypatch):
    monkeypatch.setattr(au, "cpu_supports_bf16", lambda: True)
    fast = AudioExtractor("random-tiny", precision="auto")
    assert fast.model.encoder.layers[0].attention.q_proj.weight.dtype == torch.bfloat16
    assert fast.model.encoder.layer_norm.weight.dtype == torch.float32  # norms stay fp32
    assert fast.model.feature_extractor.conv_layers[0].module.conv.weight.dtype == torch.float32  # the fp32 island
    plain = AudioExtractor("random-tiny", precision="auto")
    plain.model.float()
    w = noise(2.0)
    np.testing.assert_array_equal(fast.features(w)[1], plain.features(w)[1])


# ---------------------------------------------------------------- int8 (x86 CPUs without native bf16)

needs_int8 = pytest.mark.skipif(not au.int8_supported(), reason="no oneDNN int8 kernels on this CPU")


def test_resolve_precision_int8(monkeypatch):
    monkeypatch.setattr(au, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(au, "int8_supported", lambda: True)
    assert resolve_precision("auto", "cpu", int8=True) == "int8"
    assert resolve_precision("auto", "cpu") == "fp32"               # a model without an int8 path
    assert resolve_precision("int8", "cpu") == "fp32"
    with pytest.raises(ConfigError, match="CPU path"): resolve_precision("int8", "cuda", int8=True)
    monkeypatch.setattr(au, "cpu_supports_bf16", lambda: True)      # native bf16 wins over int8
    assert resolve_precision("auto", "cpu", int8=True) == "bf16"
    monkeypatch.setattr(au, "int8_supported", lambda: False)
    with pytest.raises(ConfigError, match="AVX2"): resolve_precision("int8", "cpu", int8=True)


@needs_int8
def test_int8_extractor_agrees_with_fp32(monkeypatch):
    monkeypatch.setattr(au, "cpu_supports_bf16", lambda: False)
    ex = AudioExtractor("random-tiny", precision="auto")
    assert ex.precision_used == "int8"
    chk = ex.describe()["int8_check"]
    assert chk["cosine_min"] >= au.INT8_MIN_COSINE and chk["linears"] == 13 and chk["gelu_fused"] == 2
    assert chk["conv_layers_int8"] == 6 and chk["pos_conv"] == "fft"
    assert not any(type(m) in (torch.nn.Linear, torch.nn.Conv1d) for m in ex.model.modules())
    w = noise(5.0)
    t8, f8 = ex.features(w)
    t32, f32 = AudioExtractor("random-tiny", precision="fp32").features(w)
    np.testing.assert_array_equal(t8, t32)
    assert f8.dtype == np.float32 and cosine(f8, f32).min() > 0.99
    assert 0 < np.abs(f8 - f32).max()                                # really a different (int8) computation


@needs_int8
def test_int8_rejected_by_probe_runs_fp32(monkeypatch):
    monkeypatch.setattr(au, "INT8_MIN_COSINE", 1.01)                 # no int8 model can pass: the fallback must run
    with pytest.warns(UserWarning, match="running fp32 instead"):
        ex = AudioExtractor("random-tiny", precision="int8")
    assert ex.precision_used == "fp32" and ex.describe()["int8_check"]["cosine_min"] < 1.01
    w = noise(3.0)
    np.testing.assert_array_equal(ex.features(w)[1], AudioExtractor("random-tiny", precision="fp32").features(w)[1])


@needs_int8
def test_int8_linear_does_not_saturate():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64)
    lin.weight.data.uniform_(-1, 1)                                  # many weights at their scale's edge
    x = torch.rand(32, 256) * 4                                      # non-negative: large uint8 codes
    with torch.inference_mode():
        y, ref = au.Int8Linear.from_linear(lin)(x), lin(x)
    assert torch.nn.functional.cosine_similarity(y, ref, -1).min() > 0.999


@needs_int8
def test_int8_check_catches_a_broken_model():
    import copy
    wm, *_ = load_wav2vec2("random-tiny")
    au.bake_weight_norm(wm)
    good, bad = copy.deepcopy(wm), copy.deepcopy(wm)
    au.quantize_wav2vec2(good); au.quantize_wav2vec2(bad)
    bad.feature_projection.projection.w_scale.mul_(4)
    assert au.int8_check(wm, good, au.int8_probe_wave())["cosine_min"] >= au.INT8_MIN_COSINE
    assert au.int8_check(wm, bad, au.int8_probe_wave())["cosine_min"] < au.INT8_MIN_COSINE


@needs_int8
def test_int8_batched_chunks_equal_one_by_one_and_guards():
    w = noise(7.0)
    _, one = AudioExtractor("random-tiny", precision="int8", chunk_s=2.0, overlap_s=1.0, batch_size=1).features(w)
    ex4 = AudioExtractor("random-tiny", precision="int8", chunk_s=2.0, overlap_s=1.0, batch_size=4)
    _, four = ex4.features(w)
    np.testing.assert_array_equal(one, four)                         # a chunk's features never depend on its neighbours
    assert ex4.describe()["int8_scheme"] == au.INT8_SCHEME
    lin = au.Int8Linear(torch.randn(8, 4))
    assert lin(torch.zeros(0, 4)).shape == (0, 8)
    with pytest.raises(DataError, match="non-finite"): lin(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))


@needs_int8
def test_int8_check_catches_a_broken_conv_layer():
    import copy
    wm, *_ = load_wav2vec2("random-tiny")
    au.bake_weight_norm(wm)
    bad = copy.deepcopy(wm); au.quantize_wav2vec2(bad)
    bad.feature_extractor.layers[2].gemm.w_scale.mul_(4)                  # one int8 conv layer's scales off by 4x
    assert au.int8_check(wm, bad, au.int8_probe_wave())["cosine_min"] < au.INT8_MIN_COSINE


@pytest.mark.parametrize("cin,groups,k,pad,bias,T", [(24, 4, 16, 8, True, 3), (24, 4, 16, 8, True, 200),
                                                     (8, 1, 5, 0, False, 64), (16, 16, 128, 64, True, 499)])
def test_fft_conv_matches_conv(cin, groups, k, pad, bias, T):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(cin, cin, k, padding=pad, groups=groups, bias=bias)
    x = torch.randn(2, cin, T)
    with torch.inference_mode():
        ref, y = conv(x), au.FFTConv1d(conv)(x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=1e-4)


def test_fft_conv_refuses_what_it_cannot_do():
    with pytest.raises(DataError, match="fewer than the kernel"):
        au.FFTConv1d(torch.nn.Conv1d(4, 4, 16, padding=2))(torch.randn(1, 4, 5))
    for conv in (torch.nn.Conv1d(4, 4, 3, stride=2), torch.nn.Conv1d(4, 4, 3, dilation=2), torch.nn.Conv1d(4, 4, 3, padding="same"),
                 torch.nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect")):
        with pytest.raises(ConfigError, match="stride-1"): au.FFTConv1d(conv)


@pytest.mark.parametrize("variant", [{}, dict(conv_bias=True), dict(feat_extract_norm="layer", conv_bias=True)])
def test_first_conv_gemm_is_exact(variant):
    from transformers import Wav2Vec2Model
    layer = random_init(lambda: Wav2Vec2Model(tiny_wav2vec2_config(**variant)), 3).feature_extractor.conv_layers[0].eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                                            # a norm that is not the identity (γ of both signs, β)
        layer.layer_norm.weight.copy_(torch.rand(layer.layer_norm.weight.shape, generator=g) * 4 - 2)
        layer.layer_norm.bias.copy_(torch.rand(layer.layer_norm.bias.shape, generator=g) * 2 - 1)
        if layer.conv.bias is not None: layer.conv.bias.copy_(torch.rand(layer.conv.bias.shape, generator=g) - 0.5)
    x = torch.randn(5000) * torch.linspace(0.001, 3, 5000) + 0.2     # a DC offset and a rising level
    with torch.inference_mode():
        ref, y = layer(x[None, None])[0].T, au.FirstConvGemm(layer)(x)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


@needs_int8
def test_int8_window_conv_one_scale_per_step():
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(32, 48, 3, 2, bias=True)
    post = au._NormAct(None, torch.nn.GELU())
    h = torch.nn.functional.gelu(torch.randn(301, 32)); h[150:] *= 1e-4   # a quiet stretch after a loud one
    m = au.Int8WindowConv(conv, post, block=32)
    with torch.inference_mode():
        ref = torch.nn.functional.gelu(conv(h.T[None])[0].T)
        y = m(h)
        alone = m(h[150:])                                         # the quiet stretch on its own
    assert y.shape == ref.shape == (150, 48)
    assert torch.nn.functional.cosine_similarity(y, ref, -1).min() > 0.999   # quiet steps keep their resolution
    torch.testing.assert_close(alone, y[75:], atol=1e-6, rtol=1e-5)          # a step depends on its window alone
    with pytest.raises(DataError, match="non-finite"): m(torch.full((9, 32), float("inf")))
    with pytest.raises(ConfigError, match="unpadded"): au.Int8WindowConv(torch.nn.Conv1d(4, 4, 3, padding=1), post)


@needs_int8
def test_int8_encoder_agrees_with_fp32_encoder():
    from transformers import Wav2Vec2Model
    for variant in ({}, dict(feat_extract_norm="layer", conv_bias=True)):
        enc = random_init(lambda: Wav2Vec2Model(tiny_wav2vec2_config(**variant)), 1).feature_extractor.eval()
        x = torch.from_numpy(noise(1.0))[None].repeat(2, 1); x[1] *= 0.01   # the same sound, quiet: its own scales
        with torch.inference_mode():
            ref, y = enc(x), au.Wav2Vec2Int8Encoder(enc)(x)
        assert y.shape == ref.shape
        c = torch.nn.functional.cosine_similarity(y.transpose(1, 2), ref.transpose(1, 2), -1)
        assert c.min() > 0.995, (variant, c.min())


@needs_int8
def test_int8_check_uses_the_extracted_layer():
    ex = AudioExtractor("random-tiny", precision="int8", layer=1)
    assert ex.int8_check["layer"] == 1 and ex.int8_check["vectors"] == 99
