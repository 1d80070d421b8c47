"""``python -m lightning_qat`` = ``lightning-qat``."""

from lightning_qat.app.cli import main

main()
