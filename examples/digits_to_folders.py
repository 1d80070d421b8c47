"""Write scikit-learn's digits as PNG files in the ImageFolder layout: ROOT/{train,val}/<digit>/<n>.png."""

import sys
from pathlib import Path

from PIL import Image
from sklearn.datasets import load_digits


def main(root: str, val_every: int = 5) -> None:
    digits = load_digits()
    for n, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        split = "val" if n % val_every == 0 else "train"
        folder = Path(root) / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype("uint8")).save(folder / f"{n}.png")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "images")
