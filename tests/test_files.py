import os
import subprocess
import sys
import zipfile
from pathlib import Path

from lightning_qat import files
from lightning_qat.files import next_version_dir, write_text_atomic

TESTS = Path(__file__).parent

WRITER = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import TinyNet
from lightning_qat.export.torchscript import save_torchscript
from lightning_qat.quantization.convert import to_int8
from lightning_qat.quantization.prepare import prepare_model
x = torch.randn(4, 1, 8, 8)
prepared = prepare_model(TinyNet(), "x86", "fx", [], (x,))
prepared.module(x)
int8 = to_int8(prepared.module, "fx", "x86", (x,))
for _ in range(int(sys.argv[2])):
    save_torchscript(int8, sys.argv[1], "x86", (x,))
"""

READER = """
import sys, time, zipfile
from lightning_qat import load_quantized
end, seen = time.time() + 600, 0
while seen < int(sys.argv[2]) and time.time() < end:
    try:
        load_quantized(sys.argv[1])
        seen += 1
    except FileNotFoundError:
        pass
print(seen)
"""


def test_concurrent_writers_never_expose_a_partial_artifact(tmp_path):
    target = tmp_path / "model_int8.pt"
    code = WRITER.format(tests=str(TESTS))
    writers = [subprocess.Popen([sys.executable, "-c", code, str(target), "25"]) for _ in range(2)]
    reader = subprocess.run(
        [sys.executable, "-c", READER, str(target), "40"], capture_output=True, text=True, timeout=600
    )
    assert [w.wait(timeout=600) for w in writers] == [0, 0]
    assert reader.returncode == 0, reader.stderr[-2000:]  # every load saw a whole, verified artifact
    assert int(reader.stdout) == 40
    assert zipfile.is_zipfile(target)
    assert [p.name for p in tmp_path.iterdir()] == ["model_int8.pt"]  # no temporary file left behind


def test_write_text_atomic_replaces_whole_files(tmp_path):
    path = write_text_atomic(tmp_path / "a" / "report.json", "first")
    write_text_atomic(path, "second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_next_version_dir_takes_the_first_free_number(tmp_path):
    assert next_version_dir(tmp_path) == tmp_path / "version_0"
    (tmp_path / "version_2").mkdir()
    assert next_version_dir(tmp_path) == tmp_path / "version_1"
    assert next_version_dir(tmp_path) == tmp_path / "version_3"


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_killed_writer_s_temporary_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "model_int8.pt"
    host = files._HOST
    killed = tmp_path / f".model_int8.pt.{host}.{_dead_pid()}.{'a' * 32}.tmp"
    running = tmp_path / f".model_int8.pt.{host}.{os.getpid()}.{'b' * 32}.tmp"
    elsewhere = tmp_path / f".model_int8.pt.another-host.{_dead_pid()}.{'c' * 32}.tmp"
    for folder in (killed, running, elsewhere):
        folder.mkdir()
        (folder / "model_int8.pt").write_bytes(b"half an artifact")
    write_text_atomic(target, "whole")
    assert target.read_text() == "whole"
    assert not killed.exists()  # its writer is gone
    assert running.exists()  # a live writer on this host
    assert elsewhere.exists()  # another host's writer cannot be checked from here
