import struct
import zipfile

import pytest
import torch
from conftest import TinyNet

from lightning_qat import ArtifactError, load_quantized
from lightning_qat.export.torchscript import read_artifact_info, save_torchscript
from lightning_qat.quantization import ao
from lightning_qat.quantization.convert import to_int8
from lightning_qat.quantization.prepare import prepare_model


@pytest.fixture
def artifact(tmp_path, digits8):
    x, _ = digits8.splits["val"].tensors
    prepared = prepare_model(TinyNet(), "x86", "fx", [], (x[:2],))
    with torch.no_grad(), ao.quiet():
        prepared.module(x[:256])
    int8 = to_int8(prepared.module, "fx", "x86", (x[:2],))
    return save_torchscript(int8, tmp_path / "model_int8.pt", "x86", (x[:2],)), int8, x


def test_the_artifact_carries_the_sha256_of_its_content(artifact):
    path, int8, x = artifact
    info = read_artifact_info(path)
    assert len(info["sha256"]) == 64
    with torch.no_grad(), ao.quiet():
        assert torch.equal(load_quantized(path)(x), int8(x))


def _tensor_entry(path):
    with zipfile.ZipFile(path) as archive:
        return archive.getinfo(next(n for n in archive.namelist() if "/constants/" in n))


def test_a_flipped_byte_is_rejected_naming_the_file(artifact, tmp_path):
    path, _, _ = artifact
    entry = _tensor_entry(path)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
    data[entry.header_offset + 30 + name_length + extra_length + 3] ^= 0x01  # inside the tensor's bytes
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"flipped\.pt' is corrupted"):
        load_quantized(bad)


def test_a_consistently_rewritten_entry_fails_the_sha256(artifact, tmp_path):
    """A changed tensor whose zip checksum was updated too: only the content digest can tell."""
    path, _, _ = artifact
    name = _tensor_entry(path).filename
    forged = tmp_path / "forged.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(forged, "w", zipfile.ZIP_STORED) as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == name:
                data = bytes([data[0] ^ 0x01]) + data[1:]
            target.writestr(item, data)
    with pytest.raises(ValueError, match=r"forged\.pt' is corrupted: its content's sha256 is .* its metadata says"):
        load_quantized(forged)


def test_the_archive_folder_is_named_after_the_artifact(artifact):
    """torch names an archive's root folder after the file written: the final name, not a temporary one."""
    path, _, _ = artifact
    with zipfile.ZipFile(path) as archive:
        roots = {name.split("/", 1)[0] for name in archive.namelist()}
    assert roots == {"model_int8"}


def test_metadata_that_is_not_json_is_an_artifact_error_naming_the_file(artifact, tmp_path):
    path, _, _ = artifact
    broken = tmp_path / "broken.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(broken, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info, b"{not json" if info.filename.endswith("extra/lightning_qat.json") else data)
    with pytest.raises(ArtifactError, match=r"broken\.pt' is corrupted: its lightning_qat\.json metadata is not JSON"):
        load_quantized(broken)


def test_loading_leaves_the_process_quantized_engine_as_it_was(artifact):
    path, int8, x = artifact
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "qnnpack"  # the user's setting, not the artifact's backend
        model = load_quantized(path)
        assert torch.backends.quantized.engine == "qnnpack"
        with torch.no_grad(), ao.quiet():
            assert torch.equal(model(x), int8(x))  # the weights were packed for x86 at load and keep it
    finally:
        torch.backends.quantized.engine = previous


def test_an_x86_artifact_runs_each_input_shape_on_a_copy_of_its_own(artifact):
    """oneDNN's int8 convolutions keep the kernel of their first call's shape, per packed weight: one loaded copy ran
    batch 1 at 0.42x float after batch 8 came first (ghostnet_100). So each shape gets its own copy, same outputs."""
    path, _, x = artifact
    loaded, once = load_quantized(path, copies=2), load_quantized(path, copies=1)
    threads = torch.get_num_threads()
    with torch.no_grad():
        for rows in (8, 1, 8, 16, 1):
            torch.testing.assert_close(loaded(x[:rows]), once(x[:rows]), rtol=0, atol=0)
    assert loaded.shapes == [((8, 1, 8, 8), threads), ((1, 1, 8, 8), threads)]  # 16 rows: over 2 copies, the first's
    assert isinstance(once, torch.jit.ScriptModule)
    assert loaded.state_dict().keys() == {f"module.{key}" for key in once.state_dict()}
    with pytest.raises(ValueError, match=r"copies=0: an artifact is loaded at least once"):
        load_quantized(path, copies=0)
