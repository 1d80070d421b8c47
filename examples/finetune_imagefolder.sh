#!/usr/bin/env bash
# From an empty folder to an int8 model: fine-tune on your own images (here: the digits written as PNG files).
# Run from any directory; writes ./images and ./outputs. Extra arguments go to `lightning-qat fit`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python "$here/digits_to_folders.py" images    # or your own images/{train,val}/<class>/*.jpg
lightning-qat fit --config "$here/../configs/finetune_imagefolder.yaml" --data.root=images --model.num_classes=10 \
    --model.weights=null --data.image_size=32 --data.resize_size=null --data.num_workers=0 \
    --data.persistent_workers=false --trainer.max_epochs=3 "$@"
