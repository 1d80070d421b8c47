import pytest

from lightning_qat.quantization import backends


@pytest.mark.parametrize(("machine", "expected"), [("x86_64", "x86"), ("AMD64", "x86"), ("aarch64", "qnnpack")])
def test_default_backend_follows_the_cpu(monkeypatch, machine, expected):
    monkeypatch.setattr(backends.platform, "machine", lambda: machine)
    monkeypatch.setattr(backends, "engines", lambda: ["none", "fbgemm", "qnnpack", "x86"])
    assert backends.default_backend() == expected


def test_default_backend_falls_back_to_a_supported_engine(monkeypatch):
    monkeypatch.setattr(backends.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(backends, "engines", lambda: ["none", "fbgemm"])
    assert backends.default_backend() == "fbgemm"


def test_unsupported_backend_names_what_this_machine_supports(monkeypatch):
    monkeypatch.setattr(backends, "engines", lambda: ["none", "qnnpack"])
    with pytest.raises(ValueError, match=r"'x86' is not supported.*\['qnnpack'\]"):
        backends.resolve_backend("x86")
