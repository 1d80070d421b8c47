"""Converting a QAT checkpoint in a new process: every argument is honoured or refused, never ignored."""

import lightning.pytorch as pl
import pytest
from conftest import BoringClassifier, pretrained_tiny, trainer_kwargs

from lightning_qat import QATCallback, convert_checkpoint, load_qat_checkpoint
from lightning_qat.lightning.checkpoint import STATE_KEY, read_checkpoint


class MyQAT(QATCallback):
    """A user's subclass: its checkpoints keep the state under the same key."""


@pytest.fixture(scope="module")
def subclass_checkpoint(tmp_path_factory, digits8, float_tiny):
    tmp_path = tmp_path_factory.mktemp("subclass")
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[MyQAT(evaluate=None)])
    )
    trainer.fit(pretrained_tiny(float_tiny), datamodule=digits8)
    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    return tmp_path / "qat.ckpt"


def test_a_subclass_keeps_its_state_under_the_callback_state_key(subclass_checkpoint):
    assert MyQAT().state_key == QATCallback().state_key == STATE_KEY
    assert STATE_KEY in read_checkpoint(subclass_checkpoint)["callbacks"]
    model = load_qat_checkpoint(BoringClassifier, subclass_checkpoint)
    assert model.net.__class__.__name__ == "GraphModule"  # prepared as in the run


def test_convert_honours_evaluation_and_output_arguments(tmp_path, subclass_checkpoint, digits8):
    report = convert_checkpoint(
        BoringClassifier(), subclass_checkpoint, datamodule=digits8, save_dir=str(tmp_path), evaluate="test"
    )
    assert report.stage == "test"
    assert "test_acc" in report.metrics["int8"]
    assert (tmp_path / "model_int8.pt").is_file()


@pytest.mark.parametrize(
    ("kwargs", "refused"),
    [
        ({"skip": ["fc1"]}, r"skip=\['fc1'\] cannot be honoured: the checkpoint's network was prepared"),
        ({"backend": "qnnpack"}, "backend='qnnpack' cannot be honoured"),
        ({"freeze_bn_after": 1}, "freeze_bn_after=1 acts during training"),
        ({"weights": "best"}, "weights='best' acts during training"),
        ({"convert": "best"}, "convert='best' acts during training"),
        ({"save_dri": "x"}, r"'save_dri' is not a QATCallback argument; valid ones here: \[.*'save_dir'"),
    ],
)
def test_an_argument_a_conversion_cannot_honour_is_an_error(tmp_path, subclass_checkpoint, kwargs, refused):
    with pytest.raises(ValueError, match=refused):
        convert_checkpoint(BoringClassifier(), subclass_checkpoint, save_dir=str(tmp_path), **kwargs)
    assert not (tmp_path / "model_int8.pt").exists()


def test_arguments_next_to_a_trainer_are_an_error(tmp_path, subclass_checkpoint):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[QATCallback()]))
    with pytest.raises(ValueError, match=r"got a trainer and QATCallback arguments \['save_dir'\]"):
        convert_checkpoint(BoringClassifier(), subclass_checkpoint, trainer=trainer, save_dir=str(tmp_path))
    with pytest.raises(ValueError, match="needs a Trainer with a QATCallback"):
        convert_checkpoint(BoringClassifier(), subclass_checkpoint, trainer=pl.Trainer(**trainer_kwargs(tmp_path)))
