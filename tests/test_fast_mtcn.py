"""avar_net.fast_mtcn: the swapped MTCN computes the reference classes' model (same parameters, same outputs up to
float rounding, same gradients), on padded batches too, inside an AVARNet, and reproducibly with dropout on."""
import copy
import pytest
import torch
from torch import nn
from avar_net.core import ConfigError, seed_everything
from avar_net.mtcn import MTCN, mstcn_loss
from avar_net.fast_mtcn import (FastDilatedResidualLayer, FastMTCN, FastSingleStageModel, accelerate, conv_taps,
                                fast_dropout)
from avar_net.model import AVARNet, AVARNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(D=16, C=4, S=3, L=6, Fm=8, dtype=torch.float32, seed=0):
    seed_everything(seed)
    ref = MTCN(D, C, num_stages=S, num_layers=L, num_f_maps=Fm).to(dtype)
    return ref, accelerate(copy.deepcopy(ref))


@pytest.mark.parametrize("k,d,T", [(3, 1, 9), (3, 4, 9), (3, 16, 9), (1, 1, 5)])
def test_conv_taps_is_conv1d(k, d, T):
    seed_everything(0)
    conv = nn.Conv1d(6, 5, k, padding=d if k == 3 else 0, dilation=d).double()
    x = torch.randn(2, T, 6, dtype=torch.float64)
    assert torch.allclose(conv_taps(x, conv, d), conv(x.transpose(1, 2)).transpose(1, 2), atol=1e-12, rtol=0)
    with pytest.raises(ConfigError, match="kernel sizes 1 and 3"):
        conv_taps(torch.randn(1, 4, 2), nn.Conv1d(2, 2, 5, padding=2))


def test_fast_dropout_is_inverted_dropout():
    z = fast_dropout(torch.ones(100_000), 0.5, True)
    assert set(z.unique().tolist()) == {0.0, 2.0} and abs(z.mean().item() - 1.0) < 0.02
    x = torch.randn(5)
    assert fast_dropout(x, 0.5, False) is x and fast_dropout(x, 0.0, True) is x


def test_swap_keeps_parameters_and_classes():
    ref, fast = _pair()
    assert type(fast) is FastMTCN and type(fast.stage1) is FastSingleStageModel
    assert all(type(l) is FastDilatedResidualLayer for s in [fast.stage1, *fast.stages] for l in s.layers)
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fast.parameters(), ref.parameters()))
    p = list(fast.parameters())
    assert accelerate(fast) is fast and all(a is b for a, b in zip(fast.parameters(), p))   # in place, idempotent
    ref.load_state_dict(fast.state_dict(), strict=True)


def test_swap_matches_reference_classes_eval_float64():
    ref, fast = _pair(dtype=torch.float64)
    ref.eval(); fast.eval()
    x = torch.randn(3, 50, 16, dtype=torch.float64)
    x[1, 31:] = float("nan")
    mask = torch.arange(50)[None] < torch.tensor([[50], [31], [2]])
    with torch.no_grad(): got, want = fast(x, mask), ref(x, mask)
    assert got.shape == want.shape == (3, 3, 50, 4)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)
    assert got[:, 1, 31:].abs().max().item() == 0.0


def test_swap_gradients_equal_reference_without_dropout():
    ref, fast = _pair(dtype=torch.float64)
    for m in (ref, fast):
        for mod in m.modules():
            if isinstance(mod, nn.Dropout): mod.p = 0.0
    x, tgt = torch.randn(2, 24, 16, dtype=torch.float64), torch.randint(0, 4, (2, 24))
    mask = torch.arange(24)[None] < torch.tensor([[24], [13]])
    for m in (ref, fast): mstcn_loss(m.train()(x, mask), tgt, mask).backward()
    for (n, a), b in zip(fast.named_parameters(), ref.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-9, rtol=1e-7), n


def test_accelerate_reaches_every_mtcn_of_a_model():
    early = accelerate(AVARNet(AVARNetConfig(audio_dim=6, video_dim=4, num_classes=3, num_stages=2, num_layers=2)))
    assert type(early.temporal) is FastMTCN
    late = accelerate(AVARNet(AVARNetConfig(audio_dim=6, video_dim=4, num_classes=3, fusion="late", num_stages=2,
                                            num_layers=2)))
    assert {type(m) for m in late.temporal.values()} == {FastMTCN}
    other = AVARNet(AVARNetConfig(audio_dim=6, video_dim=4, num_classes=3, temporal="bigru"))
    before = [type(m) for m in other.modules()]
    assert [type(m) for m in accelerate(other).modules()] == before          # nothing to swap


def test_training_with_dropout_is_reproducible():
    def run():
        torch.manual_seed(3)
        m = accelerate(AVARNet(AVARNetConfig(audio_dim=6, video_dim=4, num_classes=3, num_stages=2, num_layers=3,
                                             num_f_maps=8))).train()
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        a, v, y = torch.randn(2, 9, 6), torch.randn(2, 9, 4), torch.tensor([0, 2])
        mk = torch.arange(9)[None] < torch.tensor([[9], [5]])
        for _ in range(3):
            opt.zero_grad(); m.loss(m(a, v, mk), y, mk).backward(); opt.step()
        return m.state_dict()
    s1, s2 = run(), run()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
