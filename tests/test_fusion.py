"""avar_net.fusion: one interface for every fusion kind, per-step normalisation, padding invariance, errors."""
import pytest
import torch
from avar_net.core import ConfigError, DataError, seed_everything
from avar_net.fusion import (FUSIONS, make_fusion, EarlyFusion, AudioOnly, VideoOnly, LateFusion, IntermediateFusion,
                             check_inputs)

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    "These models are tiny: one intra-op thread is faster and immune to oversubscription on shared CI machines."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


DA, DV = 12, 8


def _outs(kind, f, a, v, mask):
    o = f(a, v, mask)
    return list(o) if kind == "late" else [o]


@pytest.mark.parametrize("kind", FUSIONS)
@pytest.mark.parametrize("proj", [None, 6])
def test_shapes_and_out_dim(kind, proj):
    f = make_fusion(kind, DA, DV, proj)
    outs = _outs(kind, f, torch.randn(2, 7, DA), torch.randn(2, 7, DV), None)
    dims = list(f.out_dim) if kind == "late" else [f.out_dim]
    assert [o.shape for o in outs] == [(2, 7, d) for d in dims]


def test_default_widths():
    assert make_fusion("early", 768, 640).out_dim == 1408           # the paper's 1408-d early fusion
    assert make_fusion("audio", 768, 640).out_dim == 768
    assert make_fusion("video", 768, 640).out_dim == 640
    assert make_fusion("late", 768, 640).out_dim == (768, 640)
    assert make_fusion("intermediate", 768, 640).out_dim == 256
    assert make_fusion("early", 768, 640, proj_dim=128).out_dim == 128


@pytest.mark.parametrize("kind", FUSIONS)
def test_padding_never_changes_valid_steps(kind):
    seed_everything(0)
    f = make_fusion(kind, DA, DV).eval()
    a, v = torch.randn(2, 9, DA), torch.randn(2, 9, DV)
    with torch.no_grad():
        alone = [_outs(kind, f, a[b:b + 1, :n], v[b:b + 1, :n], None) for b, n in enumerate((9, 4))]
        ap = torch.cat([a, 1e3 * torch.randn(2, 6, DA)], 1)
        vp = torch.cat([v, torch.full((2, 6, DV), float("nan"))], 1)    # even NaN in padding must not leak
        mask = torch.arange(15)[None] < torch.tensor([[9], [4]])
        got = _outs(kind, f, ap, vp, mask)
    for b, n in enumerate((9, 4)):
        for g, r in zip(got, alone[b]):
            assert torch.allclose(g[b, :n], r[0], atol=1e-5)
            assert g[b, n:].abs().sum().item() == 0.0


def test_early_fusion_normalises_each_modality():
    "Scaling one modality by any factor leaves the output unchanged: neither stream can dominate by scale."
    seed_everything(0)
    f = EarlyFusion(DA, DV).eval()
    a, v = torch.randn(1, 5, DA), torch.randn(1, 5, DV)
    with torch.no_grad():
        assert torch.allclose(f(a, v), f(a * 1000.0, v * 0.1), atol=5e-3)   # up to LayerNorm eps
        out = f(a, v)
    assert torch.allclose(out[..., :DA].mean(-1), torch.zeros(1, 5), atol=1e-5)
    assert torch.allclose(out[..., DA:].mean(-1), torch.zeros(1, 5), atol=1e-5)


def test_no_batch_dependence():
    "A clip's output does not depend on the other clips of its batch (no batch statistics), in train mode too."
    seed_everything(0)
    for kind in FUSIONS:
        f = make_fusion(kind, DA, DV, 6).train()
        a, v = torch.randn(3, 5, DA), torch.randn(3, 5, DV)
        full = _outs(kind, f, a, v, None)
        one = _outs(kind, f, a[:1], v[:1], None)
        for x, y in zip(full, one):
            assert torch.allclose(x[:1], y, atol=1e-6)


def test_single_modalities_ignore_the_other_stream():
    a = torch.randn(2, 5, DA)
    f, g = AudioOnly(DA, DV), VideoOnly(DA, DV)
    assert torch.equal(f(a, torch.randn(2, 5, DV)), f(a, torch.randn(2, 5, DV)))
    v = torch.randn(2, 5, DV)
    assert torch.equal(g(torch.randn(2, 5, DA), v), g(torch.randn(2, 5, DA), v))


def test_late_combine_is_average_probability():
    seed_everything(0)
    la, lv = torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    mask = torch.arange(6)[None] < torch.tensor([[6], [2], [5]])
    comb = LateFusion.combine(la, lv, mask)
    want = (la.softmax(-1) + lv.softmax(-1)) / 2
    assert torch.allclose(comb.softmax(-1)[:, mask], want[:, mask], atol=1e-6)
    assert comb[:, ~mask].abs().sum().item() == 0.0


def test_intermediate_gate_and_gradients():
    seed_everything(0)
    f = IntermediateFusion(DA, DV, 6)
    out = f(torch.randn(2, 5, DA), torch.randn(2, 5, DV), torch.tensor([[True] * 5, [True] * 3 + [False] * 2]))
    out.sum().backward()
    for n, p in f.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("kind", FUSIONS)
def test_gradients_reach_every_parameter(kind):
    seed_everything(0)
    f = make_fusion(kind, DA, DV, 6)
    outs = _outs(kind, f, torch.randn(2, 5, DA), torch.randn(2, 5, DV), None)
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    for n, p in f.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_errors():
    with pytest.raises(ConfigError, match="unknown fusion 'concat'"):
        make_fusion("concat", DA, DV)
    with pytest.raises(ConfigError, match="audio_dim must be a positive integer"):
        make_fusion("early", 0, DV)
    with pytest.raises(ConfigError, match="proj_dim"):
        make_fusion("early", DA, DV, proj_dim=-3)
    f = make_fusion("early", DA, DV)
    with pytest.raises(DataError, match="video features have 9 dims, the model expects 8"):
        f(torch.randn(1, 4, DA), torch.randn(1, 4, 9))
    with pytest.raises(DataError, match="differ in batch or time"):
        f(torch.randn(1, 4, DA), torch.randn(1, 5, DV))
    with pytest.raises(DataError, match="mask"):
        f(torch.randn(1, 4, DA), torch.randn(1, 4, DV), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(DataError, match=r"\(B,T,Da\)"):
        check_inputs(torch.randn(4, DA), torch.randn(4, DV), None)
