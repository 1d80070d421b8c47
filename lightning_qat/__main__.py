"""``python -m lightning_qat`` = ``lightning-qat``."""

from lightning_qat.cli import main

main()
