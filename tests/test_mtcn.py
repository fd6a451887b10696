"""avar_net.mtcn against the MS-TCN reference (Farha & Gall, CVPR 2019): the reference model layout, an independent
float64 re-statement of the equations with plain torch.nn.functional ops, padding invariance, gradients, determinism,
the smoothing/MIL heads and the temporal baselines."""
import copy, math
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from avar_net.core import DataError, ConfigError, seed_everything
from avar_net.mtcn import (MTCN, TEMPORAL, smoothing_loss, mstcn_loss, mil_topk, clip_logits, anomaly_logits,
                           clip_loss, mil_loss, TransformerTemporal, BiGRUTemporal, sinusoidal_positions)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    "These models are tiny: one intra-op thread is faster and immune to oversubscription on shared CI machines."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- the public MS-TCN model.py layout (MultiStageModel / SingleStageModel / DilatedResidualLayer) ----------------
class MultiStageModel(nn.Module):
    def __init__(self, num_stages, num_layers, num_f_maps, dim, num_classes):
        super(MultiStageModel, self).__init__()
        self.stage1 = SingleStageModel(num_layers, num_f_maps, dim, num_classes)
        self.stages = nn.ModuleList([copy.deepcopy(SingleStageModel(num_layers, num_f_maps, num_classes, num_classes))
                                     for s in range(num_stages - 1)])

    def forward(self, x, mask):
        out = self.stage1(x, mask)
        outputs = out.unsqueeze(0)
        for s in self.stages:
            out = s(F.softmax(out, dim=1) * mask[:, 0:1, :], mask)
            outputs = torch.cat((outputs, out.unsqueeze(0)), dim=0)
        return outputs


class SingleStageModel(nn.Module):
    def __init__(self, num_layers, num_f_maps, dim, num_classes):
        super(SingleStageModel, self).__init__()
        self.conv_1x1 = nn.Conv1d(dim, num_f_maps, 1)
        self.layers = nn.ModuleList([copy.deepcopy(DilatedResidualLayer(2 ** i, num_f_maps, num_f_maps))
                                     for i in range(num_layers)])
        self.conv_out = nn.Conv1d(num_f_maps, num_classes, 1)

    def forward(self, x, mask):
        out = self.conv_1x1(x)
        for layer in self.layers:
            out = layer(out, mask)
        out = self.conv_out(out) * mask[:, 0:1, :]
        return out


class DilatedResidualLayer(nn.Module):
    def __init__(self, dilation, in_channels, out_channels):
        super(DilatedResidualLayer, self).__init__()
        self.conv_dilated = nn.Conv1d(in_channels, out_channels, 3, padding=dilation, dilation=dilation)
        self.conv_1x1 = nn.Conv1d(out_channels, out_channels, 1)
        self.dropout = nn.Dropout()

    def forward(self, x, mask):
        out = F.relu(self.conv_dilated(x))
        out = self.conv_1x1(out)
        out = self.dropout(out)
        return (x + out) * mask[:, 0:1, :]


def reference_loss(predictions, batch_target, mask, num_classes):
    "The MS-TCN training loss as in its train loop (mask (B,C,T), targets -100 on padding)."
    ce, mse = nn.CrossEntropyLoss(ignore_index=-100), nn.MSELoss(reduction="none")
    loss = 0
    for p in predictions:
        loss += ce(p.transpose(2, 1).contiguous().view(-1, num_classes), batch_target.view(-1))
        sq = mse(F.log_softmax(p[:, :, 1:], dim=1), F.log_softmax(p.detach()[:, :, :-1], dim=1))
        loss += 0.15 * torch.mean(torch.clamp(sq, min=0, max=16) * mask[:, :, 1:])
    return loss


# ---- an independent float64 re-statement of the MS-TCN equations (functional ops, a state dict as weights) ---
def restated_forward(sd, x, m, num_stages, num_layers):
    "x (B,D,T), m (B,1,T) -> (S,B,C,T), exactly as the MS-TCN paper (Sec. 3) words it."
    def conv(h, name, d=1, k=1):
        return F.conv1d(h, sd[name + ".weight"], sd[name + ".bias"], padding=d if k == 3 else 0, dilation=d)

    def stage(prefix, h):
        h = conv(h, f"{prefix}.conv_1x1")
        for i in range(num_layers):
            o = F.relu(conv(h, f"{prefix}.layers.{i}.conv_dilated", d=2 ** i, k=3))
            o = conv(o, f"{prefix}.layers.{i}.conv_1x1")          # dropout is the identity in eval mode
            h = (h + o) * m
        return conv(h, f"{prefix}.conv_out") * m

    outs = [stage("stage1", x)]
    for k in range(num_stages - 1):
        outs.append(stage(f"stages.{k}", F.softmax(outs[-1], dim=1) * m))
    return torch.stack(outs)


def restated_loss_terms(p, target):
    "One unpadded sequence's stage scores p (C,T): (sum of CE over steps, sum of truncated squares, #pairs)."
    lp = F.log_softmax(p, dim=0)
    ce = -lp[target, torch.arange(p.shape[1])].sum()
    sq = torch.clamp((lp[:, 1:] - lp[:, :-1].detach()) ** 2, 0, 16).sum()
    return ce, sq, p.shape[1] - 1


def _f64_model(D, C, S=4, L=10, Fm=64, seed=0):
    seed_everything(seed)
    return MTCN(D, C, num_stages=S, num_layers=L, num_f_maps=Fm).double().eval()


def test_reference_state_dict_loads_strict_both_ways():
    ref = MultiStageModel(4, 10, 64, 32, 5)
    ours = MTCN(32, 5)
    assert set(ref.state_dict()) == set(ours.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape


def test_matches_reference_model_unpadded():
    ours = _f64_model(32, 5)
    ref = MultiStageModel(4, 10, 64, 32, 5).double().eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 70, 32, dtype=torch.float64)
    with torch.no_grad():
        got = ours(x, torch.ones(2, 70, dtype=torch.bool))
        want = ref(x.transpose(1, 2), torch.ones(2, 5, 70, dtype=torch.float64)).transpose(2, 3)
    assert got.shape == (4, 2, 70, 5)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_matches_restated_equations_outputs_and_loss():
    D, C, T = 24, 6, 90
    ours = _f64_model(D, C)
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(3, T, D, dtype=torch.float64)
    tgt = torch.randint(0, C, (3, T))
    full = torch.ones(3, T, dtype=torch.bool)
    with torch.no_grad():
        got = ours(x, full)
        want = restated_forward(sd, x.transpose(1, 2), torch.ones(3, 1, T, dtype=torch.float64), 4, 10)
    assert torch.allclose(got, want.transpose(2, 3), atol=1e-10, rtol=0)
    # loss: ours vs the reference train-loop formula vs the functional re-statement
    ours_loss = mstcn_loss(got, tgt, full)
    ref_loss = reference_loss(want, tgt, torch.ones(3, C, T, dtype=torch.float64), C)
    terms = [restated_loss_terms(p[b], tgt[b]) for p in want for b in range(3)]
    re_loss = sum(ce / (3 * T) + 0.15 * sq / (3 * C * (T - 1)) for ce, sq, _ in terms)
    assert abs(ours_loss.item() - ref_loss.item()) < 1e-10
    assert abs(ours_loss.item() - re_loss.item()) < 1e-10


def test_padded_batch_equals_reference_per_sequence():
    "With padding, each clip's outputs and the pooled loss equal the re-statement run on the unpadded clip alone."
    D, C, T = 16, 4, 80
    lengths = [80, 53, 9]
    ours = _f64_model(D, C, S=3, L=7, Fm=16)
    sd = ours.state_dict()
    x = torch.randn(3, T, D, dtype=torch.float64)
    x[1, 53:], x[2, 9:] = 1e3, -7.0                       # garbage in padded steps
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    tgt = torch.randint(0, C, (3, T))
    with torch.no_grad():
        got = ours(x, mask)
        for b, n in enumerate(lengths):
            want = restated_forward(sd, x[b:b + 1, :n].transpose(1, 2), torch.ones(1, 1, n, dtype=torch.float64), 3, 7)
            assert torch.allclose(got[:, b, :n], want[:, 0].transpose(1, 2), atol=1e-10, rtol=0)
            assert got[:, b, n:].abs().sum().item() == 0.0
        loss = mstcn_loss(got, tgt, mask)
        want_loss = 0
        for s in range(3):
            terms = [restated_loss_terms(
                restated_forward(sd, x[b:b + 1, :n].transpose(1, 2), torch.ones(1, 1, n, dtype=torch.float64),
                                 3, 7)[s, 0],
                tgt[b, :n]) for b, n in enumerate(lengths)]
            want_loss += (sum(t[0] for t in terms) / sum(lengths)
                          + 0.15 * sum(t[1] for t in terms) / (C * sum(t[2] for t in terms)))
    assert abs(loss.item() - want_loss.item()) < 1e-10


def test_reference_leaks_padding_ours_does_not():
    "Documents the one deviation (ours): the reference's unmasked first conv_1x1 lets padding reach valid steps."
    ours = _f64_model(8, 3, S=2, L=4, Fm=8)
    ref = MultiStageModel(2, 4, 8, 8, 3).double().eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 20, 8, dtype=torch.float64)
    xp = torch.cat([x, torch.zeros(1, 12, 8, dtype=torch.float64)], 1)
    mp = torch.arange(32)[None] < 20
    with torch.no_grad():
        alone = ref(x.transpose(1, 2), torch.ones(1, 3, 20, dtype=torch.float64))
        ref_pad = ref(xp.transpose(1, 2), mp[:, None].expand(1, 3, 32).double())
        ours_pad = ours(xp, mp)
    assert (ref_pad[..., :20] - alone).abs().max().item() > 1e-6
    assert torch.allclose(ours_pad[:, :, :20], alone.transpose(2, 3), atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", list(TEMPORAL))
def test_padding_invariance_every_temporal_model(name):
    seed_everything(0)
    kw = dict(num_stages=3, num_layers=6) if name == "mtcn" else {}
    model = TEMPORAL[name](10, 4, num_f_maps=8, **kw).eval()
    x = torch.randn(2, 30, 10)
    with torch.no_grad():
        alone = [model(x[b:b + 1, :n], None) for b, n in enumerate((30, 11))]
        xp = torch.cat([x, 50 * torch.randn(2, 25, 10)], 1)
        xp[1, 20] = float("nan"); xp[0, 40] = float("inf")                # nothing in the padding may leak
        mask = torch.arange(55)[None] < torch.tensor([[30], [11]])
        got = model(xp, mask)
    S = 3 if name == "mtcn" else 1
    assert got.shape == (S, 2, 55, 4)
    for b, n in enumerate((30, 11)):
        assert torch.allclose(got[:, b, :n], alone[b][:, 0], atol=1e-5)
        assert got[:, b, n:].abs().max().item() == 0.0


@pytest.mark.parametrize("name", list(TEMPORAL))
def test_gradients_reach_every_parameter(name):
    seed_everything(0)
    kw = dict(num_stages=2, num_layers=4) if name == "mtcn" else {}
    if name == "transformer": kw["pos"] = "learned"
    model = TEMPORAL[name](10, 3, num_f_maps=8, dropout=0.1, **kw).train()
    x, mask = torch.randn(3, 16, 10), torch.arange(16)[None] < torch.tensor([[16], [12], [5]])
    out = model(x, mask)
    mstcn_loss(out, torch.randint(0, 3, (3, 16)), mask).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", list(TEMPORAL))
def test_determinism(name):
    def run():
        seed_everything(7)
        kw = dict(num_stages=2, num_layers=3) if name == "mtcn" else {}
        m = TEMPORAL[name](6, 3, num_f_maps=8, **kw).train()
        seed_everything(8)
        return m(torch.randn(2, 9, 6), None)
    assert torch.equal(run(), run())


def test_smoothing_loss_truncation_and_gradient_stop():
    lg = torch.tensor([[[0.0, 0.0], [100.0, 0.0], [100.0, 0.0]]], requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    l = smoothing_loss(lg, mask)
    assert abs(l.item() - (math.log(2) ** 2 + 16) / 4) < 1e-5       # 2 pairs x 2 classes; second pair is flat
    l.backward()
    # truncated entries give no gradient; the first step only appears detached (as t-1), so gets none
    assert lg.grad[0, 0].abs().sum().item() == 0.0
    assert smoothing_loss(torch.randn(2, 1, 3), torch.ones(2, 1, dtype=torch.bool)).item() == 0.0


def test_mstcn_loss_ignores_padded_targets_and_weights():
    seed_everything(0)
    sl = torch.randn(2, 2, 10, 3)
    mask = torch.arange(10)[None] < torch.tensor([[10], [4]])
    t1 = torch.randint(0, 3, (2, 10))
    t2 = t1.clone(); t2[1, 4:] = (t2[1, 4:] + 1) % 3
    assert torch.equal(mstcn_loss(sl, t1, mask), mstcn_loss(sl, t2, mask))
    w = torch.tensor([1.0, 2.0, 0.5])
    assert not torch.allclose(mstcn_loss(sl, t1, mask, weight=w), mstcn_loss(sl, t1, mask))


def test_mil_topk_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for T in (1, 15, 16, 17, 47, 100):
        s = torch.randn(4, T, generator=g)
        lengths = torch.randint(1, T + 1, (4,), generator=g)
        mask = torch.arange(T)[None] < lengths[:, None]
        got = mil_topk(s, mask)
        for b in range(4):
            n = int(lengths[b]); k = n // 16 + 1
            want = torch.sort(s[b, :n], descending=True).values[:k].mean()
            assert abs(got[b].item() - want.item()) < 1e-6


def test_heads_and_task_losses():
    seed_everything(0)
    sl = torch.randn(3, 2, 33, 2, requires_grad=True)
    mask = torch.arange(33)[None] < torch.tensor([[33], [20]])
    y = torch.tensor([1, 0])
    manual = sum(F.binary_cross_entropy_with_logits(mil_topk(p[..., 1] - p[..., 0], mask), y.float())
                 + 0.15 * smoothing_loss(p, mask) for p in sl)
    assert torch.allclose(mil_loss(sl, y, mask), manual)
    wl = mil_loss(sl, y, mask, weight=torch.tensor([0.25, 3.0]))
    manual_w = sum(F.binary_cross_entropy_with_logits(mil_topk(p[..., 1] - p[..., 0], mask), y.float(),
                                                     weight=torch.tensor([3.0, 0.25]))
                   + 0.15 * smoothing_loss(p, mask) for p in sl)
    assert torch.allclose(wl, manual_w)
    cl = clip_loss(sl, y, mask)
    manual_c = sum(F.cross_entropy((p * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), y)
                   + 0.15 * smoothing_loss(p, mask) for p in sl)
    assert torch.allclose(cl, manual_c)
    with pytest.raises(ConfigError, match="2 per-step classes"):
        anomaly_logits(torch.randn(1, 4, 3))
    assert clip_logits(torch.ones(1, 3, 2), torch.tensor([[True, False, False]])).tolist() == [[1.0, 1.0]]


def test_input_errors():
    m = MTCN(4, 3, num_stages=1, num_layers=2, num_f_maps=4)
    with pytest.raises(DataError, match="expected a sequence"):
        m(torch.randn(4, 5), None)
    with pytest.raises(DataError, match="does not match"):
        m(torch.randn(2, 5, 4), torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(DataError, match="at least one valid step"):
        m(torch.randn(2, 5, 4), torch.tensor([[True] * 5, [False] * 5]))
    with pytest.raises(DataError, match="right-padded"):
        BiGRUTemporal(4, 3)(torch.randn(1, 4, 4), torch.tensor([[True, False, True, False]]))
    with pytest.raises(DataError, match="longer than the learned positions"):
        TransformerTemporal(4, 3, 8, pos="learned", max_len=10)(torch.randn(1, 11, 4), None)
    with pytest.raises(ConfigError, match="divisible"):
        TransformerTemporal(4, 3, 10, nhead=4)


def test_sinusoidal_positions():
    pe = sinusoidal_positions(5, 6)
    assert pe.shape == (5, 6)
    assert torch.allclose(pe[0], torch.tensor([0.0, 1.0] * 3))
    assert abs(pe[3, 0].item() - math.sin(3.0)) < 1e-6
    assert sinusoidal_positions(4, 7).shape == (4, 7)      # odd widths work too
