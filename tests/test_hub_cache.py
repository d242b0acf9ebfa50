"""model.pretrained=true offline: weights already in the local Hugging Face cache are used; else one line."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding timm's resnet18 weights file (our own random weights, saved there)."""
    import huggingface_hub.constants as hc
    import timm
    from safetensors.torch import save_file

    repo = timm.models.get_pretrained_cfg("resnet18").hf_hub_id  # timm/resnet18.a1_in1k
    commit = "0" * 40
    root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    weights = timm.create_model("resnet18").state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return weights


def test_cached_hub_weights_load_offline(hf_cache):
    from visionsweep.models.backbones import create_backbone, hub_reachable

    assert hub_reachable("resnet18")
    model = create_backbone("resnet18", num_classes=3, pretrained=True)
    assert torch.equal(model.layer3[0].conv1.weight, hf_cache["layer3.0.conv1.weight"])  # the cached file
    assert model.fc.out_features == 3  # the head is new


def test_weights_missing_from_the_cache_offline_is_one_line(hf_cache):
    from visionsweep.errors import ConfigError
    from visionsweep.models.backbones import create_backbone, hub_reachable

    assert not hub_reachable("resnet34")
    with pytest.raises(ConfigError, match="model.pretrained=true needs the hub weights of 'resnet34'"):
        create_backbone("resnet34", num_classes=3, pretrained=True)
