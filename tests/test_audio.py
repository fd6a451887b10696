"Tests of avar_net.audio: loading Wav2Vec2, timing, chunking, normalisation, pooling (fast paths: test_fast_backbones)."
import socket
import numpy as np
import pytest
import torch

from avar_net.audio import AudioExtractor, chunk_bounds, conv_out_len, load_wav2vec2, stitch_keep, tiny_wav2vec2_config
from avar_net.weights import random_init
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

def test_random_weights_reproducible_and_rng_untouched():
    torch.manual_seed(123); expect = torch.rand(3)
    torch.manual_seed(123)
    a = AudioExtractor("random-tiny:3")
    assert torch.equal(torch.rand(3), expect)  # building the model did not consume the caller's RNG
    b = AudioExtractor("random-tiny:3")
    c = AudioExtractor("random-tiny:4")
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
    loc = AudioExtractor(str(d))
    assert loc.weights_id == f"{d.resolve()}@sha256:{sha256_file(wfile)}"
    assert loc.weights_sha256 == sha256_file(wfile)
    ref = AudioExtractor("random-tiny:0")  # the same architecture and seed
    w = noise(1.5)
    np.testing.assert_allclose(loc.features(w)[1], ref.features(w)[1], atol=1e-5)
    # a path to the weight file inside the folder works too
    assert AudioExtractor(str(wfile)).weights_id.endswith(sha256_file(wfile))


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
    # no preprocessor_config.json
    random_init(lambda: Wav2Vec2Model(tiny_wav2vec2_config()), 0).save_pretrained(tmp_path)
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
    assert ("huggingface-cli download facebook/wav2vec2-base-960h config.json model.safetensors "
            "preprocessor_config.json "
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
    ex = AudioExtractor("acme/w2v-tiny")
    assert ex.weights_id == f"acme/w2v-tiny@sha256:{sha256_file(snap / 'model.safetensors')}"
    w = noise(1.0)
    ref = AudioExtractor("random-tiny:2")
    np.testing.assert_allclose(ex.features(w)[1], ref.features(w)[1], atol=1e-5)


# ---------------------------------------------------------------- timing, chunking, stitching

def test_tiny_shapes_and_times():
    ex = AudioExtractor("random-tiny")
    times, feats = ex.features(noise(2.5))
    assert feats.shape == ((40000 - 400) // 320 + 1, 64) and feats.dtype == np.float32
    np.testing.assert_allclose(times, 0.0125 + 0.02 * np.arange(len(feats)), atol=1e-12)
    assert (ex.hop, ex.receptive_field, ex.dim, ex.sr) == (320, 400, 64, 16000)


def test_full_size_random_dims():
    ex = AudioExtractor("random")
    t, f = ex.features(noise(1.0))
    assert f.shape == (49, 768) and ex.dim == 768 and ex.num_layers == 12 and ex.group_norm
    assert ex.weights_id == "random:0"


def test_vector_times_match_the_conv_stack(local_model_dir):
    "An impulse at time p changes exactly the conv vectors whose window holds p, and their centres surround p."
    ex = AudioExtractor(str(local_model_dir))
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
    full = AudioExtractor(str(local_model_dir), layer=0, chunk_s=60)
    ch = AudioExtractor(str(local_model_dir), layer=0, chunk_s=2.5, overlap_s=1.0)
    ta, a = full.features(w); tb, b = ch.features(w)
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_chunked_close_to_unchunked_for_group_norm():
    "With a group-norm model each chunk is normalised on its own; on a stationary signal the vectors still agree."
    w = noise(9.0, seed=4)
    ta, a = AudioExtractor("random-tiny", chunk_s=60).features(w)
    tb, b = AudioExtractor("random-tiny", chunk_s=3.0, overlap_s=1.0).features(w)
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
    ex = AudioExtractor("random-tiny", chunk_s=2.0, overlap_s=0.5, batch_size=4)
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
    one = AudioExtractor("random-tiny", chunk_s=2.0, overlap_s=0.5, batch_size=1)
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
    ex = AudioExtractor("random-tiny")
    assert ex.do_normalize  # Wav2Vec2FeatureExtractor(do_normalize=True): zero mean, unit variance per input
    seen = _model_inputs(ex, monkeypatch)
    ex.features(w)
    x = seen[0][0].double()
    assert abs(x.mean().item()) < 1e-5 and abs(x.std(unbiased=False).item() - 1) < 1e-4
    expect = (w - w.mean()) / np.sqrt(w.var() + 1e-7)
    np.testing.assert_allclose(x.numpy(), expect, atol=1e-4)
    raw = AudioExtractor(str(save_w2v(tmp_path / "raw", do_normalize=False)))
    assert not raw.do_normalize
    seen = _model_inputs(raw, monkeypatch)
    raw.features(w)
    np.testing.assert_array_equal(seen[0][0].numpy(), w)  # passed through untouched


def test_layer_choice():
    w = noise(1.0)
    last = AudioExtractor("random-tiny").features(w)[1]
    np.testing.assert_array_equal(AudioExtractor("random-tiny", layer=2).features(w)[1], last)
    first = AudioExtractor("random-tiny", layer=0).features(w)[1]
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
