"""Bad inputs to the export: clear refusals, atomic writes, strict loading; the two binaries."""

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest
import safetensors.numpy
import torch

from yocou_jax.export import exporter, verify
from yocou_jax.export.hf import ExportError
from tests.export.test_export import save_random_checkpoint
from tests.export.test_import import save_tiny_llama

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("run")
  save_random_checkpoint(directory, step=3, arch="yocou")
  return directory


def test_missing_step(workdir, tmp_path):
  with pytest.raises(ExportError, match=r"step 7 is not in .*checkpoints; saved steps: \[3\]"):
    exporter.export_checkpoint(str(workdir), str(tmp_path / "out"), step=7)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make", ["nothing", "empty_checkpoints"])
def test_workdir_without_checkpoint(tmp_path, make):
  if make == "empty_checkpoints":
    (tmp_path / "checkpoints").mkdir()
  with pytest.raises(ExportError, match=f"no checkpoint in {tmp_path}"):
    exporter.export_checkpoint(str(tmp_path), str(tmp_path / "out"))


def test_non_empty_destination_needs_overwrite(workdir, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  with pytest.raises(ExportError, match="exists and is not empty; pass --overwrite"):
    exporter.export_checkpoint(str(workdir), str(out))
  assert os.listdir(out) == ["notes.txt"]
  (out / "notes.txt").unlink()
  exporter.export_checkpoint(str(workdir), str(out))  # An empty directory is fine.
  (out / "notes.txt").write_text("stale")
  exporter.export_checkpoint(str(workdir), str(out), overwrite=True)
  assert "notes.txt" not in os.listdir(out) and (out / "model.safetensors").is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # No temporary siblings left.


def test_crash_mid_export_leaves_nothing_or_the_old_export(workdir, tmp_path, monkeypatch):
  def crash(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(exporter, "write_tokenizer", crash)
  with pytest.raises(KeyboardInterrupt):
    exporter.export_checkpoint(str(workdir), str(tmp_path / "new"))
  assert list(tmp_path.iterdir()) == []
  monkeypatch.undo()
  exporter.export_checkpoint(str(workdir), str(tmp_path / "old"))
  before = (tmp_path / "old" / "model.safetensors").read_bytes()
  monkeypatch.setattr(exporter, "write_tokenizer", crash)
  with pytest.raises(KeyboardInterrupt):
    exporter.export_checkpoint(str(workdir), str(tmp_path / "old"), overwrite=True)
  assert [p.name for p in tmp_path.iterdir()] == ["old"]
  assert (tmp_path / "old" / "model.safetensors").read_bytes() == before


def _exported_copy(workdir, tmp_path):
  exporter.export_checkpoint(str(workdir), str(tmp_path / "out"))
  return tmp_path / "out", str(tmp_path / "out" / "model.safetensors")


def test_loading_refuses_corrupted_safetensors(workdir, tmp_path):
  out, path = _exported_copy(workdir, tmp_path)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(ExportError, match="model.safetensors is not a readable safetensors file"):
    exporter.read_safetensors(out)
  with pytest.raises(Exception, match="incomplete metadata, file not fully covered"):
    verify.load_torch_model(out)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.global_kv.norm.weight"), "missing tensor model.global_kv.norm.weight"),
    (lambda t: t.update({"model.layers.9.mlp.up_proj.weight": np.zeros((64, 32), np.float32)}),
     "unexpected tensor model.layers.9.mlp.up_proj.weight"),
], ids=["missing", "unexpected"])
def test_pytorch_loading_refuses_tensors_that_do_not_match(workdir, tmp_path, edit, message):
  out, path = _exported_copy(workdir, tmp_path)
  tensors = safetensors.numpy.load_file(path)
  edit(tensors)
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=f"from_pretrained: {message}"):
    verify.load_torch_model(out)


def _run(module, *args):
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_binaries_import_export_verify(tmp_path):
  save_tiny_llama(tmp_path / "llama")
  imported = _run("experiments.import_hf", f"--hf_dir={tmp_path / 'llama'}",
                  f"--workdir={tmp_path / 'run'}")
  assert imported.returncode == 0, imported.stderr[-2000:]
  assert "imported" in imported.stdout and "2 layers, d_model 32" in imported.stdout
  exported = _run("experiments.export", f"--workdir={tmp_path / 'run'}",
                  f"--out={tmp_path / 'out'}", "--dtype=bfloat16")
  assert exported.returncode == 0, exported.stderr[-2000:]
  assert "exported transformer step 0" in exported.stdout
  diff = float(exported.stdout.split("| = ")[1].split()[0])
  assert diff < 1e-4
