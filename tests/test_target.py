import pytest
import torch
from conftest import BoringClassifier

from lightning_qat.lightning.target import find_target


def test_find_target_default_ignores_metrics_and_losses():
    assert find_target(BoringClassifier(), None) == "net"


def test_find_target_lists_candidates_when_ambiguous():
    model = BoringClassifier()
    model.head = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"several networks.*\['head', 'net'\]"):
        find_target(model, None)


def test_find_target_dotted_path_and_bad_name():
    model = BoringClassifier()
    assert find_target(model, "net.fc1") == "net.fc1"
    with pytest.raises(ValueError, match=r"'net.fc9'.*did you mean"):
        find_target(model, "net.fc9")
    with pytest.raises(ValueError, match="metrics and losses are never quantized"):
        find_target(model, "val_acc")
