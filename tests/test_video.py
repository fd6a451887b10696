"Tests of avar_net.video: preprocessing, weights, both backends (BGR), batching, pooling (fast path elsewhere)."
import socket
import numpy as np
import pytest
import torch

from avar_net.weights import random_init
from avar_net.core import ConfigError, DataError, WeightsError, sha256_file
from avar_net.data import TimeGrid
from avar_net.video import Preprocess, VideoExtractor, init_like_cvnets, tiny_mobilevit_config


def frames(n=4, size=64, seed=0):
    "Smooth-ish RGB frames (a colour gradient + a moving square) as uint8 (n, 3, size, size)."
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.stack([xx, yy, 1 - xx]) * 200
    out = base.expand(n, 3, size, size).clone() + torch.rand(n, 3, size, size, generator=g) * 20
    for i in range(n):
        o = (i * size // (2 * n)) + size // 8
        out[i, :, o:o + size // 4, o:o + size // 4] = torch.tensor([250.0, 30, 30]).view(3, 1, 1)
    return out.clamp(0, 255).to(torch.uint8)


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k): raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))


def save_hf_mobilevit(folder, seed=1, flip=True, size=64):
    from transformers import MobileViTImageProcessor, MobileViTModel
    model = random_init(lambda: init_like_cvnets(MobileViTModel(tiny_mobilevit_config())), seed).eval()
    model.save_pretrained(folder)
    proc = MobileViTImageProcessor(size={"shortest_edge": size}, crop_size={"height": 64, "width": 64},
                                   do_flip_channel_order=flip, resample=2)
    proc.save_pretrained(folder)
    return model, proc


# ---------------------------------------------------------------- shapes and preprocessing

def test_tiny_shapes():
    vx = VideoExtractor("random-tiny")
    f = vx.features(frames(5))
    assert f.shape == (5, 320) and f.dtype == np.float32
    assert (vx.dim, vx.input_size, vx.arch, vx.weights_id) == (320, 128, "mobilevit_xxs", "random-tiny:0")
    assert vx.features(torch.zeros(0, 3, 64, 64, dtype=torch.uint8)).shape == (0, 320)
    assert vx.features(frames(2).numpy()).shape == (2, 320)  # numpy input accepted


def test_full_size_random_dims_and_cfg():
    vx = VideoExtractor("random")
    assert (vx.dim, vx.input_size, vx.decode_size, vx.arch) == (640, 256, 284, "mobilevit_s")
    assert vx.preprocess == Preprocess(256, 284, "bicubic", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1 / 255, False)
    assert vx.features(frames(2, 256)).shape == (2, 640)


def test_full_size_transformers_backend_dims():
    vx = VideoExtractor("random", backend="transformers")
    assert (vx.dim, vx.input_size, vx.preprocess.bgr, vx.preprocess.resize) == (640, 256, True, 288)
    f = vx.features(frames(2, 256))
    assert f.shape == (2, 640) and np.abs(f).mean() > 1e-2  # a live random network, not ~1e-40 noise


def test_preprocessing_matches_timm_eval_transform():
    "Our tensor pipeline gives the features of timm's own (PIL) eval transform built from the same pretrained cfg."
    import timm
    from PIL import Image
    vx = VideoExtractor("random-tiny")
    cfg = timm.data.resolve_data_config({}, model=vx.model)
    tf = timm.data.create_transform(**cfg)
    fr = frames(3, 96)
    ref = torch.stack([tf(Image.fromarray(f.permute(1, 2, 0).numpy())) for f in fr])
    with torch.inference_mode(): want = vx.model(ref).numpy()
    got = vx.features(fr)
    assert cosine(got, want).min() > 0.9999
    assert (vx.preprocess(fr) - ref).abs().max() <= 2 / 255 + 1e-6  # PIL's resize within 2 levels of 255
    # and exact when frames arrive at decode_size (the resize is skipped, only the centre crop remains)
    fr71 = frames(2, vx.decode_size)
    ref71 = torch.stack([tf(Image.fromarray(f.permute(1, 2, 0).numpy())) for f in fr71])
    torch.testing.assert_close(vx.preprocess(fr71), ref71, atol=1e-6, rtol=0)


def test_preprocess_resizes_rectangular_frames_by_shorter_side():
    pp = Preprocess(64, 72, "bilinear")
    out = pp(torch.randint(0, 256, (1, 3, 90, 160), dtype=torch.uint8))
    assert out.shape == (1, 3, 64, 64)
    with pytest.raises(DataError, match="smaller than"):
        Preprocess(64, None)(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_bad_frames():
    vx = VideoExtractor("random-tiny")
    with pytest.raises(DataError, match=r"uint8 RGB tensor \(N, 3, H, W\)"): vx.features(frames(2).permute(0, 2, 3, 1))
    with pytest.raises(DataError): vx.features(frames(2).float())
    with pytest.raises(ConfigError, match="backend"): VideoExtractor("random-tiny", backend="onnx")


# ---------------------------------------------------------------- weights

def test_random_seeds_reproducible():
    torch.manual_seed(7); expect = torch.rand(2)
    torch.manual_seed(7)
    a = VideoExtractor("random-tiny:3")
    assert torch.equal(torch.rand(2), expect)
    b = VideoExtractor("random-tiny:3")
    c = VideoExtractor("random-tiny:4")
    fr = frames(3)
    np.testing.assert_array_equal(a.features(fr), b.features(fr))
    np.testing.assert_array_equal(a.features(fr), a.features(fr))  # deterministic inference
    assert np.abs(a.features(fr) - c.features(fr)).max() > 1e-3
    assert c.weights_id == "random-tiny:4"


def test_timm_local_round_trip(tmp_path, no_network):
    import timm
    from timm.models import save_for_hf
    model = random_init(lambda: timm.create_model("mobilevit_xxs", pretrained=False), 5).eval()
    save_for_hf(model, tmp_path / "m", safe_serialization=True)
    vx = VideoExtractor(str(tmp_path / "m"))
    wfile = tmp_path / "m" / "model.safetensors"
    assert vx.weights_id == f"{(tmp_path / 'm').resolve()}@sha256:{sha256_file(wfile)}"
    assert (vx.arch, vx.dim, vx.input_size) == ("mobilevit_xxs", 320, 256)
    fr = frames(2, 256)
    model.reset_classifier(0)
    with torch.inference_mode(): want = model(vx.preprocess(fr)).numpy()
    np.testing.assert_allclose(vx.features(fr), want, atol=1e-5)
    # the bare weight file (architecture recognised from its shapes), and a legacy .bin read with weights_only
    np.testing.assert_allclose(VideoExtractor(str(wfile)).features(fr), want, atol=1e-5)
    (tmp_path / "b").mkdir()
    torch.save(model.state_dict(), tmp_path / "b" / "pytorch_model.bin")
    vb = VideoExtractor(str(tmp_path / "b"))
    assert vb.weights_id.endswith(sha256_file(tmp_path / "b" / "pytorch_model.bin"))
    np.testing.assert_allclose(vb.features(fr), want, atol=1e-5)


def test_timm_local_errors(tmp_path):
    with pytest.raises(WeightsError, match="no model.safetensors") as e:
        VideoExtractor(str(tmp_path))
    assert "huggingface-cli download timm/mobilevit_s.cvnets_in1k model.safetensors" in str(e.value)
    torch.save({"w": torch.ones(1), "evil": print}, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="cannot read weights"):  # weights_only=True refuses pickled code
        VideoExtractor(str(tmp_path))
    (tmp_path / "pytorch_model.bin").unlink()
    torch.save({"final_conv.conv.weight": torch.ones(640, 160, 1, 1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="do not fit mobilevit_s"):
        VideoExtractor(str(tmp_path))
    hf = tmp_path / "hf"; save_hf_mobilevit(hf)
    with pytest.raises(WeightsError, match="backend='transformers'"):
        VideoExtractor(str(hf))


def test_hub_names_without_cache_offline(empty_hub_cache, no_network):
    with pytest.raises(WeightsError) as e:
        VideoExtractor("mobilevit_s")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE=1" in msg and "\n" not in msg
    assert ("huggingface-cli download timm/mobilevit_s.cvnets_in1k model.safetensors config.json "
            "--local-dir ~/models/mobilevit_s") in msg
    assert "--video-backbone ~/models/mobilevit_s" in msg
    with pytest.raises(WeightsError, match="timm/mobilevit_xs.cvnets_in1k"):
        VideoExtractor("mobilevit_xs")
    with pytest.raises(WeightsError,
                       match="apple/mobilevit-small config.json model.safetensors preprocessor_config.json"):
        VideoExtractor("mobilevit_s", backend="transformers")
    with pytest.raises(WeightsError, match="not a timm model"):
        VideoExtractor("resnet_nonexistent_xyz")


def test_timm_hub_name_from_local_cache(tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants as hc
    import timm
    from timm.models import save_for_hf
    cache = tmp_path / "hub"
    repo = cache / "models--timm--mobilevit_xxs.cvnets_in1k"
    snap = repo / "snapshots" / ("b" * 40)
    model = random_init(lambda: timm.create_model("mobilevit_xxs", pretrained=False), 9).eval()
    save_for_hf(model, snap, safe_serialization=True)
    (repo / "refs").mkdir(); (repo / "refs" / "main").write_text("b" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1"); monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    vx = VideoExtractor("mobilevit_xxs")
    assert vx.weights_id == f"mobilevit_xxs@sha256:{sha256_file(snap / 'model.safetensors')}"
    assert VideoExtractor("hf-hub:timm/mobilevit_xxs.cvnets_in1k").arch == "mobilevit_xxs"


# ---------------------------------------------------------------- transformers backend: BGR

@pytest.mark.parametrize("flip", [True, False])
def test_transformers_backend_matches_its_image_processor(tmp_path, flip):
    model, proc = save_hf_mobilevit(tmp_path, flip=flip, size=72)
    vx = VideoExtractor(str(tmp_path), backend="transformers")
    assert vx.preprocess.bgr is flip and (vx.input_size, vx.decode_size) == (64, 72)
    fr = frames(3, 72)  # at decode size: resize is a no-op in both pipelines, so the comparison is exact
    pix = proc(images=[f.permute(1, 2, 0).numpy() for f in fr], return_tensors="pt")["pixel_values"]
    with torch.inference_mode(): want = model(pixel_values=pix).pooler_output.numpy()
    got = vx.features(fr)
    np.testing.assert_allclose(got, want, atol=1e-4)
    rgb = fr[:, :, 4:68, 4:68].float() / 255
    with torch.inference_mode():
        manual = model(pixel_values=rgb.flip(1) if flip else rgb).pooler_output.numpy()
    np.testing.assert_allclose(got, manual, atol=1e-4)
    # feeding the other channel order changes the features far beyond rounding
    assert np.abs(vx.features(fr.flip(1)) - want).max() > 100 * np.abs(got - want).max() + 1e-3


def test_transformers_backend_resize_close_to_processor(tmp_path):
    model, proc = save_hf_mobilevit(tmp_path, size=72)
    vx = VideoExtractor(str(tmp_path), backend="transformers")
    fr = frames(3, 100)
    pix = proc(images=[f.permute(1, 2, 0).numpy() for f in fr], return_tensors="pt")["pixel_values"]
    with torch.inference_mode(): want = model(pixel_values=pix).pooler_output.numpy()
    assert cosine(vx.features(fr), want).min() > 0.999


def test_transformers_local_missing_files(tmp_path):
    from transformers import MobileViTModel
    random_init(lambda: MobileViTModel(tiny_mobilevit_config()), 0).save_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="missing preprocessor_config.json"):
        VideoExtractor(str(tmp_path), backend="transformers")


# ---------------------------------------------------------------- batching

def test_batching_does_not_change_features():
    fr = frames(7)
    a = VideoExtractor("random-tiny", batch_size=1).features(fr)
    b = VideoExtractor("random-tiny", batch_size=4).features(fr)
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ConfigError): VideoExtractor("random-tiny", batch_size=0)


# ---------------------------------------------------------------- pooling

def test_extract_averages_the_frames_of_each_step():
    vx = VideoExtractor("random-tiny")
    fr = frames(8)
    t = (np.arange(8) + 0.5) / 4.0          # 4 fps over 2 s
    grid = TimeGrid.for_duration(2.0, 0.5)  # two frames per step
    f = vx.features(fr)
    V = vx.extract(t, fr, grid)
    assert V.shape == (4, 320) and V.dtype == np.float32
    np.testing.assert_allclose(V, f.reshape(4, 2, -1).mean(1), atol=1e-5)
