import pickle

import pytest
import torch
import torchvision

from lightning_qat.app.models import ImageClassifier, load_float_weights


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_malicious_pickle_never_runs_and_the_error_says_why(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"w": Payload(marker)}}, f)
    with pytest.raises(ValueError, match=r"evil\.pt' holds Python objects besides tensors.*would run code"):
        load_float_weights(evil)
    with pytest.raises(ValueError, match="would run code"):
        ImageClassifier("resnet18", init_checkpoint=str(evil))
    assert not marker.exists()


def test_float_weights_load_from_a_plain_state_dict(tmp_path):
    net = torchvision.models.resnet18(num_classes=10)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    model = ImageClassifier("resnet18", init_checkpoint=str(tmp_path / "w.pt"))
    assert torch.equal(model.model.fc.weight, net.fc.weight)


def test_a_torchvision_state_dict_with_another_head_loads_the_backbone(tmp_path, caplog):
    imagenet = torchvision.models.resnet18(num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "resnet18.pth")
    model = ImageClassifier("resnet18", num_classes=10, init_checkpoint=str(tmp_path / "resnet18.pth"))
    assert torch.equal(model.model.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(model.model.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var)
    assert model.model.fc.weight.shape == (10, 512)  # re-initialised for 10 classes


def test_pretrained_weights_load_offline_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match=r"needs resnet18-f37072fd\.pth.*download https://.*put it at .*checkpoints"
    ):
        ImageClassifier("resnet18", weights="IMAGENET1K_V1")
    imagenet = torchvision.models.resnet18(num_classes=1000)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(imagenet.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = ImageClassifier("resnet18", num_classes=10, weights="DEFAULT")
    assert torch.equal(model.model.layer1[0].conv1.weight, imagenet.layer1[0].conv1.weight)
    with pytest.raises(ValueError, match=r"weights='IMAGENET9K' is not a weight of resnet18; choose one of"):
        ImageClassifier("resnet18", weights="IMAGENET9K")
