"""Tests of avar_net.fast_backbones: precision choice, the bf16 and int8 paths of Wav2Vec2 and MobileViT, the exact
rewrites (FFT convolution, first-conv GEMM, folded batch norms, channels-last unfold), each against the reference."""
import copy
import numpy as np
import pytest
import torch
from torch import nn

import avar_net.fast_backbones as fb
from avar_net.audio import AudioExtractor, load_wav2vec2, tiny_wav2vec2_config
from avar_net.core import ConfigError, DataError
from avar_net.fast_backbones import Float32Island, MobileVitBlockNHWC, fold_batchnorm, resolve_precision
from avar_net.video import VideoExtractor, init_like_cvnets, tiny_mobilevit_config
from avar_net.weights import random_init

SR = 16000
needs_int8 = pytest.mark.skipif(not fb.int8_supported(), reason="no oneDNN int8 kernels on this CPU")


def noise(seconds, seed=0, scale=0.1):
    return (scale * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


from test_video import frames   # the same smooth test frames as the reference tests


# ---------------------------------------------------------------- Wav2Vec2: precision, bf16, int8

def test_wav2vec2_precision_auto_falls_back_without_bf16(monkeypatch):
    monkeypatch.setattr(fb, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(fb, "int8_supported", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cpu", int8=True) == "fp32"
    ex = fb.accelerate_wav2vec2(AudioExtractor("random-tiny"), "auto")
    assert ex.precision_used == "fp32"
    assert not isinstance(ex.model.feature_extractor.conv_layers[0], Float32Island)


def test_wav2vec2_precision_bf16_path(monkeypatch):
    monkeypatch.setattr(fb, "cpu_supports_bf16", lambda: True)
    fast = fb.accelerate_wav2vec2(AudioExtractor("random-tiny"), "auto")
    assert fast.precision_used == "bf16"
    assert isinstance(fast.model.model.feature_extractor.conv_layers[0], Float32Island)  # first conv + norm in fp32
    w = noise(3.0)
    tf, f = fast.features(w)
    tr, r = AudioExtractor("random-tiny").features(w)
    np.testing.assert_array_equal(tf, tr)
    assert f.dtype == np.float32 and cosine(f, r).min() > 0.99
    with pytest.raises(ConfigError): resolve_precision("half")


def test_cpu_capability_check_reads_flags(monkeypatch):
    monkeypatch.setattr(fb, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert not fb.cpu_supports_bf16()
    monkeypatch.setattr(fb, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert fb.cpu_supports_bf16()
    monkeypatch.setattr(fb, "cpu_flags", lambda: {"amx_bf16", "amx_tile"})
    assert fb.cpu_supports_bf16()


def test_wav2vec2_bf16_weights_stored_once_are_bit_identical_to_autocast(monkeypatch):
    monkeypatch.setattr(fb, "cpu_supports_bf16", lambda: True)
    fast = fb.accelerate_wav2vec2(AudioExtractor("random-tiny"), "auto")
    w2v = fast.model.model                                          # inside the FastWav2Vec2 wrapper
    assert w2v.encoder.layers[0].attention.q_proj.weight.dtype == torch.bfloat16
    assert w2v.encoder.layer_norm.weight.dtype == torch.float32  # norms stay fp32
    assert w2v.feature_extractor.conv_layers[0].module.conv.weight.dtype == torch.float32  # the fp32 island
    plain = fb.accelerate_wav2vec2(AudioExtractor("random-tiny"), "auto")
    plain.model.float()
    w = noise(2.0)
    np.testing.assert_array_equal(fast.features(w)[1], plain.features(w)[1])


def test_resolve_precision_int8(monkeypatch):
    monkeypatch.setattr(fb, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(fb, "int8_supported", lambda: True)
    assert resolve_precision("auto", "cpu", int8=True) == "int8"
    assert resolve_precision("auto", "cpu") == "fp32"               # a model without an int8 path
    assert resolve_precision("int8", "cpu") == "fp32"
    with pytest.raises(ConfigError, match="CPU path"): resolve_precision("int8", "cuda", int8=True)
    monkeypatch.setattr(fb, "cpu_supports_bf16", lambda: True)      # native bf16 wins over int8
    assert resolve_precision("auto", "cpu", int8=True) == "bf16"
    monkeypatch.setattr(fb, "int8_supported", lambda: False)
    with pytest.raises(ConfigError, match="AVX2"): resolve_precision("int8", "cpu", int8=True)


@needs_int8
def test_wav2vec2_int8_extractor_agrees_with_fp32(monkeypatch):
    monkeypatch.setattr(fb, "cpu_supports_bf16", lambda: False)
    ex = fb.accelerate_wav2vec2(AudioExtractor("random-tiny"), "auto")
    assert ex.precision_used == "int8"
    chk = ex.describe()["int8_check"]
    assert chk["cosine_min"] >= fb.INT8_MIN_COSINE and chk["linears"] == 13 and chk["gelu_fused"] == 2
    assert chk["conv_layers_int8"] == 6 and chk["pos_conv"] == "fft"
    assert not any(type(m) in (torch.nn.Linear, torch.nn.Conv1d) for m in ex.model.modules())
    w = noise(5.0)
    t8, f8 = ex.features(w)
    t32, f32 = AudioExtractor("random-tiny").features(w)
    np.testing.assert_array_equal(t8, t32)
    assert f8.dtype == np.float32 and cosine(f8, f32).min() > 0.99
    assert 0 < np.abs(f8 - f32).max()                                # really a different (int8) computation


@needs_int8
def test_wav2vec2_int8_rejected_by_probe_runs_fp32(monkeypatch):
    monkeypatch.setattr(fb, "INT8_MIN_COSINE", 1.01)                 # no int8 model can pass: the fallback must run
    with pytest.warns(UserWarning, match="running fp32 instead"):
        ex = fb.accelerate_wav2vec2(AudioExtractor("random-tiny"), "int8")
    assert ex.precision_used == "fp32" and ex.describe()["int8_check"]["cosine_min"] < 1.01
    w = noise(3.0)
    np.testing.assert_array_equal(ex.features(w)[1], AudioExtractor("random-tiny").features(w)[1])


@needs_int8
def test_int8_linear_does_not_saturate():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64)
    lin.weight.data.uniform_(-1, 1)                                  # many weights at their scale's edge
    x = torch.rand(32, 256) * 4                                      # non-negative: large uint8 codes
    with torch.inference_mode():
        y, ref = fb.Int8Linear.from_linear(lin)(x), lin(x)
    assert torch.nn.functional.cosine_similarity(y, ref, -1).min() > 0.999


@needs_int8
def test_wav2vec2_int8_check_catches_a_broken_model():
    wm, *_ = load_wav2vec2("random-tiny")
    fb.bake_weight_norm(wm)
    good, bad = copy.deepcopy(wm), copy.deepcopy(wm)
    fb.quantize_wav2vec2(good); fb.quantize_wav2vec2(bad)
    bad.feature_projection.projection.w_scale.mul_(4)
    assert fb.int8_check(wm, good, fb.int8_probe_wave())["cosine_min"] >= fb.INT8_MIN_COSINE
    assert fb.int8_check(wm, bad, fb.int8_probe_wave())["cosine_min"] < fb.INT8_MIN_COSINE


@needs_int8
def test_wav2vec2_int8_batched_chunks_equal_one_by_one_and_guards():
    w = noise(7.0)
    one_ex = fb.accelerate_wav2vec2(AudioExtractor("random-tiny", chunk_s=2.0, overlap_s=1.0, batch_size=1), "int8")
    _, one = one_ex.features(w)
    ex4 = fb.accelerate_wav2vec2(AudioExtractor("random-tiny", chunk_s=2.0, overlap_s=1.0, batch_size=4), "int8")
    _, four = ex4.features(w)
    np.testing.assert_array_equal(one, four)                         # a chunk's features never depend on its neighbours
    assert ex4.describe()["int8_scheme"] == fb.INT8_SCHEME
    lin = fb.Int8Linear(torch.randn(8, 4))
    assert lin(torch.zeros(0, 4)).shape == (0, 8)
    with pytest.raises(DataError, match="non-finite"): lin(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))


@needs_int8
def test_wav2vec2_int8_check_catches_a_broken_conv_layer():
    wm, *_ = load_wav2vec2("random-tiny")
    fb.bake_weight_norm(wm)
    bad = copy.deepcopy(wm); fb.quantize_wav2vec2(bad)
    bad.feature_extractor.layers[2].gemm.w_scale.mul_(4)                  # one int8 conv layer's scales off by 4x
    assert fb.int8_check(wm, bad, fb.int8_probe_wave())["cosine_min"] < fb.INT8_MIN_COSINE


@pytest.mark.parametrize("cin,groups,k,pad,bias,T", [(24, 4, 16, 8, True, 3), (24, 4, 16, 8, True, 200),
                                                     (8, 1, 5, 0, False, 64), (16, 16, 128, 64, True, 499)])
def test_fft_conv_matches_conv(cin, groups, k, pad, bias, T):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(cin, cin, k, padding=pad, groups=groups, bias=bias)
    x = torch.randn(2, cin, T)
    with torch.inference_mode():
        ref, y = conv(x), fb.FFTConv1d(conv)(x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=1e-4)


def test_fft_conv_refuses_what_it_cannot_do():
    with pytest.raises(DataError, match="fewer than the kernel"):
        fb.FFTConv1d(torch.nn.Conv1d(4, 4, 16, padding=2))(torch.randn(1, 4, 5))
    for conv in (torch.nn.Conv1d(4, 4, 3, stride=2), torch.nn.Conv1d(4, 4, 3, dilation=2),
                 torch.nn.Conv1d(4, 4, 3, padding="same"), torch.nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect")):
        with pytest.raises(ConfigError, match="stride-1"): fb.FFTConv1d(conv)


@pytest.mark.parametrize("variant", [{}, dict(conv_bias=True), dict(feat_extract_norm="layer", conv_bias=True)])
def test_first_conv_gemm_is_exact(variant):
    from transformers import Wav2Vec2Model
    model = random_init(lambda: Wav2Vec2Model(tiny_wav2vec2_config(**variant)), 3)
    layer = model.feature_extractor.conv_layers[0].eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                                     # a norm that is not the identity (γ of both signs, β)
        layer.layer_norm.weight.copy_(torch.rand(layer.layer_norm.weight.shape, generator=g) * 4 - 2)
        layer.layer_norm.bias.copy_(torch.rand(layer.layer_norm.bias.shape, generator=g) * 2 - 1)
        if layer.conv.bias is not None: layer.conv.bias.copy_(torch.rand(layer.conv.bias.shape, generator=g) - 0.5)
    x = torch.randn(5000) * torch.linspace(0.001, 3, 5000) + 0.2     # a DC offset and a rising level
    with torch.inference_mode():
        ref, y = layer(x[None, None])[0].T, fb.FirstConvGemm(layer)(x)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


@needs_int8
def test_int8_window_conv_one_scale_per_step():
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(32, 48, 3, 2, bias=True)
    post = fb._NormAct(None, torch.nn.GELU())
    h = torch.nn.functional.gelu(torch.randn(301, 32)); h[150:] *= 1e-4   # a quiet stretch after a loud one
    m = fb.Int8WindowConv(conv, post, block=32)
    with torch.inference_mode():
        ref = torch.nn.functional.gelu(conv(h.T[None])[0].T)
        y = m(h)
        alone = m(h[150:])                                         # the quiet stretch on its own
    assert y.shape == ref.shape == (150, 48)
    assert torch.nn.functional.cosine_similarity(y, ref, -1).min() > 0.999   # quiet steps keep their resolution
    torch.testing.assert_close(alone, y[75:], atol=1e-6, rtol=1e-5)          # a step depends on its window alone
    with pytest.raises(DataError, match="non-finite"): m(torch.full((9, 32), float("inf")))
    with pytest.raises(ConfigError, match="unpadded"): fb.Int8WindowConv(torch.nn.Conv1d(4, 4, 3, padding=1), post)


@needs_int8
def test_wav2vec2_int8_encoder_agrees_with_fp32_encoder():
    from transformers import Wav2Vec2Model
    for variant in ({}, dict(feat_extract_norm="layer", conv_bias=True)):
        enc = random_init(lambda: Wav2Vec2Model(tiny_wav2vec2_config(**variant)), 1).feature_extractor.eval()
        x = torch.from_numpy(noise(1.0))[None].repeat(2, 1); x[1] *= 0.01   # the same sound, quiet: its own scales
        with torch.inference_mode():
            ref, y = enc(x), fb.Wav2Vec2Int8Encoder(enc)(x)
        assert y.shape == ref.shape
        c = torch.nn.functional.cosine_similarity(y.transpose(1, 2), ref.transpose(1, 2), -1)
        assert c.min() > 0.995, (variant, c.min())


@needs_int8
def test_wav2vec2_int8_check_uses_the_extracted_layer():
    ex = fb.accelerate_wav2vec2(AudioExtractor("random-tiny", layer=1), "int8")
    assert ex.describe()["int8_check"]["layer"] == 1 and ex.describe()["int8_check"]["vectors"] == 99


# ---------------------------------------------------------------- MobileViT: folded norms, channels-last, bf16, int8

def test_fold_batchnorm_is_exact():
    import timm
    m = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=0).eval()
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.normal_(0, 0.2); b.running_var.uniform_(0.5, 2.0)
            b.weight.data.uniform_(0.5, 1.5); b.bias.data.normal_(0, 0.2)
    f = copy.deepcopy(m)
    assert fold_batchnorm(f) == sum(isinstance(b, nn.BatchNorm2d) for b in m.modules())
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode(): torch.testing.assert_close(f(x), m(x), atol=1e-4, rtol=1e-4)
    from transformers import MobileViTModel
    h = random_init(lambda: init_like_cvnets(MobileViTModel(tiny_mobilevit_config())), 0).eval()
    for b in h.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.normal_(0, 0.2); b.running_var.uniform_(0.5, 2.0); b.bias.data.normal_(0, 0.2)
    hf = copy.deepcopy(h)
    assert fold_batchnorm(hf) > 10
    with torch.inference_mode():
        torch.testing.assert_close(hf(pixel_values=x).pooler_output, h(pixel_values=x).pooler_output,
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["timm", "transformers"])
def test_mobilevit_fast_path_agrees_with_fp32(monkeypatch, backend):
    monkeypatch.setattr(fb, "cpu_supports_bf16", lambda: True)
    fast = fb.accelerate_mobilevit(VideoExtractor("random-tiny", backend=backend), "auto")
    ref = VideoExtractor("random-tiny", backend=backend)
    assert (fast.precision_used, ref.precision_used) == ("bf16+channels_last", "fp32")
    fr = frames(6)
    a, b = fast.features(fr), ref.features(fr)
    assert a.dtype == np.float32 and cosine(a, b).min() > 0.99


def test_mobilevit_precision_falls_back_without_bf16(monkeypatch):
    monkeypatch.setattr(fb, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(fb, "int8_supported", lambda: False)   # neither bf16 nor int8 kernels: the fp32 fast path
    vx = fb.accelerate_mobilevit(VideoExtractor("random-tiny"), "auto")
    assert vx.precision_used == "fp32+channels_last"  # fp32 maths, folded BN + channels-last layout
    assert "int8_check" not in vx.describe() and "int8_scheme" not in vx.describe()
    ref = VideoExtractor("random-tiny")
    fr = frames(3)
    np.testing.assert_allclose(vx.features(fr), ref.features(fr), atol=1e-4)
    # an explicit choice is honoured
    assert fb.accelerate_mobilevit(VideoExtractor("random-tiny"), "bf16").precision_used == "bf16+channels_last"


def test_mobilevit_nhwc_unfold_is_exact(monkeypatch):
    monkeypatch.setattr(fb, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(fb, "int8_supported", lambda: False)
    vx = fb.accelerate_mobilevit(VideoExtractor("random-tiny"), "auto")
    blocks = [m for m in vx.model.modules() if isinstance(m, MobileVitBlockNHWC)]
    assert len(blocks) == 3                                      # the fast path uses the channels-last unfold/fold
    fr = frames(5)
    a = vx.features(fr)
    for b in blocks: b.__class__ = MobileVitBlockNHWC.__mro__[1]   # back to timm's own forward
    np.testing.assert_allclose(vx.features(fr), a, atol=1e-6)    # same tokens, same numbers (bit-identical on x86)


@needs_int8
def test_mobilevit_int8_path_agrees_with_fp32_and_ignores_batch(monkeypatch):
    monkeypatch.setattr(fb, "cpu_supports_bf16", lambda: False)
    vx = fb.accelerate_mobilevit(VideoExtractor("random-tiny", batch_size=8), "auto")
    assert vx.precision_used == "int8+channels_last"
    d = vx.describe()
    assert d["int8_check"]["cosine_min"] >= fb.INT8_MIN_COSINE and d["int8_check"]["linears"] == 36
    assert d["int8_check"]["calibrated"] == 36 and d["int8_scheme"] == fb.MOBILEVIT_INT8_SCHEME
    lin = [m for m in vx.model.modules() if isinstance(m, fb.Int8Linear)]
    assert len(lin) == 36 and all(m.act_qparams is not None for m in lin)   # fixed scales everywhere
    fr = frames(8)
    fr[3] = fr[3] // 12                                          # one dark frame among bright ones
    f8 = vx.features(fr)
    f32 = VideoExtractor("random-tiny").features(fr)
    assert cosine(f8, f32).min() > 0.99 and np.abs(f8 - f32).max() > 0   # close to fp32, but really int8
    alone = vx.features(fr[3:4])                                 # a frame's features do not depend on its batch
    np.testing.assert_allclose(alone, f8[3:4], atol=1e-4)
    vx.batch_size = 3
    np.testing.assert_allclose(vx.features(fr), f8, atol=1e-4)
    # the transformers backend has no int8 path: the fp32 fast path runs
    hx = fb.accelerate_mobilevit(VideoExtractor("random-tiny", backend="transformers"), "auto")
    assert hx.precision_used == "fp32+channels_last"


@needs_int8
def test_mobilevit_int8_is_not_claimed_without_transformer_blocks():
    vx = fb.accelerate_mobilevit(VideoExtractor("random-tiny"), "int8")
    # a timm model of another kind
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    m, prec, chk = fb.mobilevit_int8(other, vx.preprocess, vx.decode_size)
    assert m is other and prec == "fp32" and chk is None         # nothing quantised: no int8 label, no int8 cache key


@needs_int8
def test_mobilevit_int8_rejected_by_check_runs_fp32(monkeypatch):
    monkeypatch.setattr(fb, "INT8_MIN_COSINE", 1.01)             # no int8 model can pass: the fallback must run
    with pytest.warns(UserWarning, match="running fp32 instead"):
        vx = fb.accelerate_mobilevit(VideoExtractor("random-tiny"), "int8")
    assert vx.precision_used == "fp32+channels_last" and vx.describe()["int8_check"]["cosine_min"] < 1.01
    assert "int8_scheme" not in vx.describe()
    assert not any(isinstance(m, fb.Int8Linear) for m in vx.model.modules())
    fr = frames(3)
    ref = VideoExtractor("random-tiny").features(fr)
    np.testing.assert_allclose(vx.features(fr), ref, atol=1e-4)


def test_mobilevit_bf16_weights_stored_once_are_bit_identical_to_autocast(monkeypatch):
    monkeypatch.setattr(fb, "cpu_supports_bf16", lambda: True)
    fast = fb.accelerate_mobilevit(VideoExtractor("random-tiny"), "auto")
    assert fast.model.model.stem.conv.weight.dtype == torch.bfloat16
    plain = fb.accelerate_mobilevit(VideoExtractor("random-tiny"), "auto")
    plain.model.float()  # fp32 weights again: autocast casts them on every call
    fr = frames(3)
    np.testing.assert_array_equal(fast.features(fr), plain.features(fr))
