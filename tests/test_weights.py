"Tests of avar_net.weights: backbone specs, the offline hub cache, safe weight files, seeded random weights."
import socket
import pytest
import torch
from torch import nn

from avar_net.core import ConfigError, WeightsError
from avar_net.weights import (WeightSpec, fetch_hint, fetch_hub_files, load_state_file, parse_weight_spec,
                              pick_weight_file, random_init)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k): raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


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


def test_fetch_hub_files_offline_says_how_to_fetch(tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants as hc
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    hint = fetch_hint("acme/tiny", "config.json model.safetensors", "~/models/tiny", "--video-backbone",
                      "VideoExtractor")
    with pytest.raises(WeightsError) as e:
        fetch_hub_files("acme/tiny", [("config.json",), ("model.safetensors", "pytorch_model.bin")], hint)
    msg = str(e.value)
    assert "config.json, model.safetensors or pytorch_model.bin not found" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "huggingface-cli download acme/tiny config.json model.safetensors --local-dir ~/models/tiny" in msg
    assert "--video-backbone ~/models/tiny" in msg and "\n" not in msg


def test_weight_files_are_read_safely(tmp_path):
    assert pick_weight_file(tmp_path) is None
    torch.save({"model": {"module.w": torch.ones(2), "step": 3}}, tmp_path / "pytorch_model.bin")
    assert pick_weight_file(tmp_path) == tmp_path / "pytorch_model.bin"
    assert list(load_state_file(tmp_path / "pytorch_model.bin")) == ["w"]   # wrapper, prefix and non-tensors removed
    torch.save({"w": torch.ones(2), "evil": object}, tmp_path / "bad.bin")
    with pytest.raises(WeightsError, match="cannot read weights"): load_state_file(tmp_path / "bad.bin")


def test_random_init_is_seeded_and_leaves_the_caller_rng_alone():
    torch.manual_seed(5); expect = torch.rand(3)
    torch.manual_seed(5)
    a, b = random_init(lambda: nn.Linear(4, 4), 1), random_init(lambda: nn.Linear(4, 4), 1)
    assert torch.equal(torch.rand(3), expect)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, random_init(lambda: nn.Linear(4, 4), 2).weight)
