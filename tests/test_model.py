"""avar_net.model: AVARNet over every fusion x temporal model x task (shapes, padding invariance, gradients,
determinism, losses), the config, and save_pretrained/from_pretrained refusing every tampered checkpoint
without ever unpickling anything."""
import json, os, pickle
from pathlib import Path
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file, load_file
from avar_net.core import ConfigError, DataError, WeightsError, seed_everything
from avar_net.fusion import FUSIONS
from avar_net.mtcn import TEMPORAL, smoothing_loss, mil_topk, clip_logits
from avar_net.model import AVARNet, AVARNetConfig

DA, DV = 12, 10
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    "These models are tiny: one intra-op thread is faster and immune to oversubscription on shared CI machines."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = dict(audio_dim=DA, video_dim=DV, num_stages=2, num_layers=3, num_f_maps=8, dropout=0.1)


def cfg_for(fusion="early", temporal="mtcn", task="clip", **kw):
    return AVARNetConfig(**{**SMALL, "num_classes": 3 if task == "clip" else 2, "task": task,
                            "fusion": fusion, "temporal": temporal, **kw})


def batch(B=3, T=20, lengths=(20, 13, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    a, v = torch.randn(B, T, DA, generator=g), torch.randn(B, T, DV, generator=g)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    return a, v, mask


def flat(out):
    "Every tensor of an output dict, with stable names."
    res = {}
    for k, v in out.items():
        if isinstance(v, dict): res.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else: res[k] = v
    return res


COMBOS = [(f, t) for f in FUSIONS for t in TEMPORAL]


@pytest.mark.parametrize("fusion,temporal", COMBOS)
def test_shapes_padding_invariance_and_gradients(fusion, temporal):
    for task in ("clip", "weak"):
        seed_everything(0)
        model = AVARNet(cfg_for(fusion, temporal, task))
        a, v, mask = batch()
        lengths = mask.sum(1).tolist()
        C, S = model.cfg.num_classes, (2 if temporal == "mtcn" else 1)
        model.eval()
        with torch.no_grad():
            ap = torch.cat([a, torch.full((3, 7, DA), float("nan"))], 1)       # extra padding with garbage in it
            vp = torch.cat([v, 1e4 * torch.ones(3, 7, DV)], 1)
            mp = torch.cat([mask, torch.zeros(3, 7, dtype=torch.bool)], 1)
            out = flat(model(ap, vp, mp))
            alone = [flat(model(a[b:b + 1, :n], v[b:b + 1, :n], None)) for b, n in enumerate(lengths)]
        assert out["stage_logits"].shape == (S, 3, 27, C)
        assert out["step_probs"].shape == (3, 27, C)
        if task == "clip":
            assert out["logits"].shape == (3, C)
        else:
            assert out["step_scores"].shape == out["anomaly_logits"].shape == (3, 27)
            assert out["video_logit"].shape == (3,)
        for b, n in enumerate(lengths):
            for k, x in out.items():
                ref = alone[b][k]
                if k in ("logits", "video_logit"):
                    assert torch.allclose(x[b], ref[0], atol=1e-5), (task, k)
                elif k.endswith("stage_logits") or k.startswith("branch"):
                    assert torch.allclose(x[:, b, :n], ref[:, 0], atol=1e-5), (task, k)
                    assert x[:, b, n:].abs().sum().item() == 0.0, (task, k)
                else:
                    assert torch.allclose(x[b, :n], ref[0], atol=1e-5), (task, k)
                    assert x[b, n:].abs().sum().item() == 0.0, (task, k)
        # gradients reach every trainable parameter (train mode, dropout on)
        model.train()
        label = torch.tensor([0, 2, 1]) if task == "clip" else torch.tensor([1, 0, 1])
        loss = model.loss(model(a, v, mask), label, mask)
        assert torch.isfinite(loss)
        loss.backward()
        for n, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (task, n)


@pytest.mark.parametrize("task", ["clip", "weak"])
def test_loss_does_not_depend_on_padding(task):
    seed_everything(0)
    model = AVARNet(cfg_for("late", "mtcn", task)).eval()
    a, v, mask = batch()
    label = torch.tensor([1, 0, 1])
    l1 = model.loss(model(a, v, mask), label, mask)
    ap, vp = torch.cat([a, torch.randn(3, 30, DA)], 1), torch.cat([v, torch.randn(3, 30, DV)], 1)
    mp = torch.cat([mask, torch.zeros(3, 30, dtype=torch.bool)], 1)
    l2 = model.loss(model(ap, vp, mp), label, mp)
    assert abs(l1.item() - l2.item()) < 1e-5


def test_losses_are_as_documented():
    seed_everything(0)
    a, v, mask = batch()
    # clip: sum over stages of CE(mean-pooled stage logits) + 0.15 smoothing, optional class weights
    m = AVARNet(cfg_for())
    out, y = m(a, v, mask), torch.tensor([2, 0, 1])
    w = torch.tensor([1.0, 3.0, 0.5])
    want = sum(F.cross_entropy(clip_logits(p, mask), y, weight=w) + 0.15 * smoothing_loss(p, mask)
               for p in out["stage_logits"])
    assert torch.allclose(m.loss(out, y, mask, class_weights=w), want)
    assert torch.allclose(out["logits"], clip_logits(out["stage_logits"][-1], mask))
    # xd: sum over stages of BCE(top-k mean of l1 - l0) + 0.15 smoothing
    m = AVARNet(cfg_for(task="weak"))
    out, y = m(a, v, mask), torch.tensor([1, 0, 1])
    want = sum(F.binary_cross_entropy_with_logits(mil_topk(p[..., 1] - p[..., 0], mask), y.float())
               + 0.15 * smoothing_loss(p, mask) for p in out["stage_logits"])
    assert torch.allclose(m.loss(out, y, mask), want)
    assert torch.allclose(out["video_logit"], mil_topk(out["anomaly_logits"], mask))
    assert torch.allclose(torch.sigmoid(out["anomaly_logits"])[mask], out["step_scores"][mask], atol=1e-6)
    # late: the sum of the two branches' own losses; prediction = averaged probabilities
    m = AVARNet(cfg_for("late", smooth_weight=0.3))
    out, y = m(a, v, mask), torch.tensor([2, 0, 1])
    want = sum(F.cross_entropy(clip_logits(p, mask), y) + 0.3 * smoothing_loss(p, mask)
               for br in out["branch_stage_logits"].values() for p in br)
    assert torch.allclose(m.loss(out, y, mask), want)
    br = out["branch_stage_logits"]
    avg = (br["audio"][-1].softmax(-1) + br["video"][-1].softmax(-1)) / 2
    assert torch.allclose(out["step_probs"][mask], avg[mask], atol=1e-6)


def test_determinism():
    def run():
        seed_everything(3)
        m = AVARNet(cfg_for("intermediate", "mtcn")).train()
        a, v, mask = batch()
        seed_everything(4)
        out = m(a, v, mask)
        return out["stage_logits"], m.loss(out, torch.tensor([0, 1, 2]), mask)
    (o1, l1), (o2, l2) = run(), run()
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


def test_config_round_trip_and_errors():
    cfg = AVARNetConfig()
    assert (cfg.audio_dim, cfg.video_dim, cfg.num_classes, cfg.fusion, cfg.temporal) == (768, 640, 10, "early", "mtcn")
    assert (cfg.num_stages, cfg.num_layers, cfg.num_f_maps, cfg.dropout, cfg.smooth_weight, cfg.tau) == (4, 10, 64, 0.5,
                                                                                                         0.15, 4.0)
    assert AVARNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad, msg in [({"fusion": "x"}, "fusion must be one of"), ({"temporal": "lstm"}, "temporal must be one of"),
                     ({"task": "seg"}, "task must be one of"), ({"num_classes": 1}, "num_classes"),
                     ({"proj_dim": 0}, "proj_dim"), ({"dropout": -0.1}, "dropout"), ({"tau": float("inf")}, "tau"),
                     ({"smooth_weight": "0.1"}, "smooth_weight"), ({"num_f_maps": 8.0}, "num_f_maps"),
                     ({"task": "weak"}, "num_classes=2"), ({"extra": 1}, "unknown AVARNetConfig keys ['extra']")]:
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            AVARNetConfig.from_dict(bad)
    # the model keeps its own copy of the config
    c = cfg_for(); m = AVARNet(c); c.num_layers = 7
    assert m.cfg.num_layers == 3
    assert AVARNet(cfg_for().to_dict()).cfg == cfg_for()


def test_forward_errors():
    m = AVARNet(cfg_for())
    a, v, mask = batch()
    with pytest.raises(DataError, match="audio features have 11 dims, the model expects 12"):
        m(a[..., :11], v, mask)
    with pytest.raises(DataError, match="at least one valid step"):
        m(a, v, torch.zeros_like(mask))
    with pytest.raises(DataError, match="labels"):
        m.loss(m(a, v, mask), torch.tensor([0, 1]), mask)
    with pytest.raises(DataError, match=r"labels must lie in 0..2 for task 'clip', got \[0, 1, 3\]"):
        m.loss(m(a, v, mask), torch.tensor([0, 1, 3]), mask)
    xd = AVARNet(cfg_for(task="weak"))
    with pytest.raises(DataError, match="labels must lie in 0..1 for task 'weak'"):
        xd.loss(xd(a, v, mask), torch.tensor([0, 1, 2]), mask)
    with pytest.raises(ConfigError, match=r"class_weights must have shape \(3,\)"):
        m.loss(m(a, v, mask), torch.tensor([0, 1, 2]), mask, class_weights=[1.0, 2.0])


# ---- save / load -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion,temporal,task", [("early", "mtcn", "clip"), ("late", "bigru", "weak"),
                                                  ("intermediate", "transformer", "clip"), ("audio", "meanpool", "weak")])
def test_save_load_round_trip(tmp_path, fusion, temporal, task):
    seed_everything(0)
    m = AVARNet(cfg_for(fusion, temporal, task, proj_dim=6)).eval()
    d = m.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    raw = json.loads((d / "config.json").read_text())
    assert raw["model_type"] == "avar_net" and raw["fusion"] == fusion
    m2 = AVARNet.from_pretrained(d)
    assert not m2.training and m2.cfg == m.cfg
    a, v, mask = batch()
    with torch.no_grad():
        o1, o2 = flat(m(a, v, mask)), flat(m2(a, v, mask))
    assert o1.keys() == o2.keys()
    for k in o1: assert torch.equal(o1[k], o2[k]), k
    m.save_pretrained(d)                                            # overwriting works, nothing left behind
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]


@pytest.fixture
def ckpt(tmp_path):
    seed_everything(0)
    d = AVARNet(cfg_for()).save_pretrained(tmp_path / "ckpt")
    return d


def _rewrite(d, edit, keep_meta=True):
    "Rewrite model.safetensors after `edit(tensors)` (optionally dropping the config metadata)."
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), "pt") as f: meta = f.metadata()
    t = load_file(str(d / "model.safetensors"))
    edit(t)
    save_file(t, str(d / "model.safetensors"), metadata=meta if keep_meta else None)


def _edit_config(d, **kw):
    cfg = json.loads((d / "config.json").read_text()); cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


K = "temporal.stage1.conv_1x1.weight"


@pytest.mark.parametrize("case,msg", [
    ("shape", rf"tensor '{K}' expected float32 \(8, 22, 1\) \(from config.json\), found float32 \(8, 21, 1\)"),
    ("dtype", rf"tensor '{K}' expected float32 \(8, 22, 1\) \(from config.json\), found float64 \(8, 22, 1\)"),
    ("extra", r"unexpected tensors \['temporal.extra.weight'\]"),
    ("missing", rf"missing tensors \['{K}'\]"),
    ("nan", rf"tensor '{K}' contains NaN or Inf"),
    ("config_vs_meta",
     r"saved with a different config than .*config.json: num_f_maps: 8 \(tensors\) vs 16 \(config.json\)"),
    ("config_no_meta",
     r"tensor 'scaler.audio_mean' expected float32 \(13,\) \(from config.json\), found float32 \(12,\)"),
    ("layers_no_meta", r"missing tensors \['temporal.stage1.layers.3.conv_1x1.bias'"),
    ("unknown_key", r"config.json: unknown AVARNetConfig keys \['hidden_size'\]"),
    ("bad_value", r"config.json: AVARNetConfig.fusion must be one of"),
    ("model_type", r"model_type is 'bert', expected 'avar_net'"),
    ("not_json", r"config.json: not a readable JSON config"),
    ("json_list", r"config.json: the config must be a JSON object"),
    ("garbage", r"model.safetensors: not a readable safetensors file"),
    ("truncated", r"model.safetensors: not a readable safetensors file"),
    ("no_weights", r"model.safetensors: missing"),
    ("no_config", r"config.json: missing"),
])
def test_tampered_checkpoints_are_refused(ckpt, case, msg):
    d = ckpt
    if case == "shape": _rewrite(d, lambda t: t.__setitem__(K, t[K][:, :21].contiguous()))
    elif case == "dtype": _rewrite(d, lambda t: t.__setitem__(K, t[K].double()))
    elif case == "extra": _rewrite(d, lambda t: t.__setitem__("temporal.extra.weight", torch.zeros(2)))
    elif case == "missing": _rewrite(d, lambda t: t.pop(K))
    elif case == "nan": _rewrite(d, lambda t: t[K].view(-1).__setitem__(0, float("nan")))
    elif case == "config_vs_meta": _edit_config(d, num_f_maps=16)
    elif case == "config_no_meta": _rewrite(d, lambda t: None, keep_meta=False); _edit_config(d, audio_dim=13)
    elif case == "layers_no_meta": _rewrite(d, lambda t: None, keep_meta=False); _edit_config(d, num_layers=4)
    elif case == "unknown_key": _edit_config(d, hidden_size=3)
    elif case == "bad_value": _edit_config(d, fusion="concat")
    elif case == "model_type": _edit_config(d, model_type="bert")
    elif case == "not_json": (d / "config.json").write_text("{not json")
    elif case == "json_list": (d / "config.json").write_text("[1, 2]")
    elif case == "garbage": (d / "model.safetensors").write_bytes(os.urandom(300))
    elif case == "truncated":
        b = (d / "model.safetensors").read_bytes(); (d / "model.safetensors").write_bytes(b[: len(b) // 2])
    elif case == "no_weights": (d / "model.safetensors").unlink()
    elif case == "no_config": (d / "config.json").unlink()
    with pytest.raises(WeightsError, match=msg):
        AVARNet.from_pretrained(d)


def test_training_only_fields_may_be_edited(ckpt):
    "dropout, smooth_weight and tau change no tensor: a config.json edited to fine-tune with other values loads."
    _edit_config(ckpt, dropout=0.2, smooth_weight=0.5, tau=3.0)
    m = AVARNet.from_pretrained(ckpt)
    assert (m.cfg.dropout, m.cfg.smooth_weight, m.cfg.tau) == (0.2, 0.5, 3.0)
    assert m.temporal.stage1.layers[0].dropout.p == 0.2


class _Payload:
    "Unpickling this would create a marker file: proof that a loader executed code."
    def __init__(self, path): self.path = path
    def __reduce__(self): return (Path.touch, (Path(self.path),))


def test_loading_never_unpickles(ckpt, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"; evil.mkdir()
    (evil / "config.json").write_text((ckpt / "config.json").read_text())
    torch.save({"x": _Payload(marker)}, evil / "model.safetensors")    # a pickle disguised as safetensors

    def forbidden(*a, **k): raise AssertionError("pickle/torch.load used while loading a model")
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    AVARNet.from_pretrained(ckpt)                                       # the good checkpoint loads without pickle
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        AVARNet.from_pretrained(evil)
    assert not marker.exists()


def test_parameters_and_flops():
    m = AVARNet()
    assert m.num_parameters() == sum(p.numel() for p in m.parameters())
    assert 0.7e6 < m.num_parameters() < 0.8e6                           # early fusion + default MTCN
    for p in m.fusion.parameters(): p.requires_grad_(False)
    assert m.num_parameters(trainable_only=True) == m.num_parameters() - 2 * (768 + 640)
    f16, f32 = m.flops(T=16), m.flops(T=32)
    assert f32 == 2 * f16 > 0                                         # convolutions: linear in T
    assert m.training                                                   # flops() restores the mode
    tf = AVARNet(AVARNetConfig(temporal="transformer"))
    # attention is counted: 2 layers x (QK^T + AV) x 2 FLOPs/MAC x T^2 x 64 is the part that is not linear in T
    assert tf.flops(T=32) - 2 * tf.flops(T=16) == 2 * 2 * 2 * (32 ** 2 - 2 * 16 ** 2) * 64
    assert torch.backends.mha.get_fastpath_enabled()                    # and the fast path is restored
    for t in TEMPORAL:
        assert AVARNet(cfg_for("late", t)).flops(T=8) > 0
