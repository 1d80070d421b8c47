import pytest
import torch
from PIL import Image

from lightning_qat.app.image_folder import ImageFolderDataModule


def _write(root, split, classes, per_class=3, size=12):
    for label in classes:
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            Image.new("L", (size, size), color=40 * n).save(folder / f"{n}.png")


def test_reads_the_layout_with_its_classes_and_every_stage(tmp_path):
    _write(tmp_path, "train", ["cat", "dog"])
    _write(tmp_path, "val", ["cat", "dog"], per_class=2)
    (tmp_path / "predict").mkdir()
    Image.new("RGB", (20, 16)).save(tmp_path / "predict" / "a.jpg")
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, resize_size=10, batch_size=4)
    assert dm.classes == ["cat", "dog"]
    assert dm.num_classes == 2
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8)
    assert set(y.tolist()) <= {0, 1}
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 8, 8)
    assert y.tolist() == [0, 0, 1, 1]
    (image,) = next(iter(dm.predict_dataloader()))
    assert image.shape == (1, 3, 8, 8)
    assert torch.isfinite(image).all()


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("no val folder", r"No val folder at .*/val"),
        ("empty class folder", r"class folder .*/train/dog is empty"),
        ("not an image", r"notes\.txt is not an image"),
        ("classes differ", r"/val has the classes \['cat'\], but .*/train has \['cat', 'dog'\]"),
    ],
)
def test_bad_layouts_are_named_when_the_datamodule_is_built(tmp_path, case, match):
    _write(tmp_path, "train", ["cat", "dog"])
    if case != "no val folder":
        _write(tmp_path, "val", ["cat"] if case == "classes differ" else ["cat", "dog"])
    if case == "empty class folder":
        for file in (tmp_path / "train" / "dog").iterdir():
            file.unlink()
    if case == "not an image":
        (tmp_path / "train" / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=match):
        ImageFolderDataModule(str(tmp_path))
