import pickle

import pytest
import torch
import torchvision

from lightning_qat.models import ImageClassifier, load_float_weights


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
