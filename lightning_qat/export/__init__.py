"""The export layer: the int8 artifacts that reload without the training code (TorchScript; ONNX as an extra)."""
