"""Files saelab writes: ordinary permissions under the umask, and no temporaries left by crashed processes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest
import torch

from saelab.buffer.cache import CacheWriter
from saelab.core.atomic import host_tag, is_stale_temporary, temporary_name
from saelab.sae.topk import TopKConfig, TopKSAE
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def wrong_modes(root) -> dict[str, str]:
    """Paths under root (root included) whose permissions are not 0755 (directories) / 0644 (files)."""
    return {
        str(path): oct(stat.S_IMODE(path.stat().st_mode))
        for path in [root, *root.rglob("*")]
        if stat.S_IMODE(path.stat().st_mode) != (0o755 if path.is_dir() else 0o644)
    }


def test_written_files_follow_the_umask(tmp_path, umask_022):
    """What a plain open / mkdir would give under umask 022: directories 0755, files 0644."""
    source = SyntheticSource(SyntheticConfig(d_in=8, n_features=16, seed=1))
    sae = TopKSAE(TopKConfig(d_in=8, d_sae=16, k=2))
    cfg = TrainerConfig(total_tokens=4 * 32, batch_size=32, checkpoint_every=2, device="cpu")
    Trainer(sae, cfg, output_dir=tmp_path / "run").fit(source)
    writer = CacheWriter(tmp_path / "cache", {"h": 3}, "float32", 4, {"test": 1})
    writer.add({"h": torch.ones(5, 3)}, torch.arange(5), contexts=1)
    writer.finish({}, wall_seconds=0.0)
    for written in (
        "run/sae/sae_weights.safetensors",
        "run/checkpoints/step_000000002",
        "cache/manifest.json",
    ):
        assert (tmp_path / written).exists()
    assert wrong_modes(tmp_path / "run") == {} and wrong_modes(tmp_path / "cache") == {}


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_only_temporaries_of_dead_processes_count_as_stale(tmp_path):
    final = tmp_path / "sae"
    mine = temporary_name(final)
    dead = tmp_path / f".sae.tmp-{host_tag()}-{dead_pid()}-0123abcd"
    other_host = tmp_path / f".sae.tmp-not-{host_tag()}-{dead_pid()}-0123abcd"
    legacy_old, legacy_new = tmp_path / ".sae.tmp-a1b2_c3d", tmp_path / ".step_000000004.tmp-zz9y8x7w"
    for path in (mine, dead, other_host, legacy_old, legacy_new):
        path.mkdir()
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(legacy_old, (day_ago, day_ago))
    assert not is_stale_temporary(mine)  # this process is alive
    assert is_stale_temporary(dead)
    assert not is_stale_temporary(other_host)  # a pid on another machine (shared filesystem) is unknown here
    assert is_stale_temporary(legacy_old) and not is_stale_temporary(legacy_new)  # untagged: by age
    assert not is_stale_temporary(tmp_path / "sae")


def test_checkpoint_saves_remove_crash_leftovers(tmp_path):
    """A run killed while writing step 2 leaves `.step_000000002.tmp-...`; the next save removes it."""
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    leftover = ckpts / f".step_000000002.tmp-{host_tag()}-{dead_pid()}-0123abcd"
    (leftover / "half").mkdir(parents=True)
    live = temporary_name(ckpts / "step_000000009")  # another live writer's (this process')
    live.mkdir()
    source = SyntheticSource(SyntheticConfig(d_in=8, n_features=16, seed=1))
    cfg = TrainerConfig(total_tokens=4 * 32, batch_size=32, checkpoint_every=2, device="cpu")
    Trainer(TopKSAE(TopKConfig(d_in=8, d_sae=16, k=2)), cfg, output_dir=tmp_path / "run").fit(source)
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(["step_000000002", live.name])


# ------------------------------------------------------------------ writing over an existing folder or file
def test_saving_over_a_folder_never_deletes_files_saelab_did_not_write(tmp_path):
    """A folder holding other files is refused, untouched; a previous save of the same SAE is replaced."""
    from saelab.io.saelens import export_saelens
    from saelab.io.sparsify import export_sparsify

    sae = TopKSAE(TopKConfig(d_in=8, d_sae=32, k=4))
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "notes.txt").write_text("important")
    (project / "data" / "a.csv").write_text("1,2")
    for save in (sae.save, lambda path: export_saelens(sae, path), lambda path: export_sparsify(sae, path)):
        with pytest.raises(FileExistsError, match=r"project already holds data, notes.txt, which this write"):
            save(project)
    assert sorted(p.name for p in project.iterdir()) == ["data", "notes.txt"]  # untouched, no temporaries
    assert (project / "notes.txt").read_text() == "important"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]

    saved = tmp_path / "sae"
    sae.save(saved)
    with torch.no_grad():
        sae.W_dec.mul_(2)
    sae.save(saved)  # its own earlier files: replaced
    assert sorted(p.name for p in saved.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    with pytest.raises(FileExistsError, match=r"holds sae_weights.safetensors"):
        export_sparsify(sae, saved)  # sparsify's layout would silently mix with saelab's weights file


def test_saving_onto_a_file_or_a_home_path(tmp_path, monkeypatch):
    sae = TopKSAE(TopKConfig(d_in=8, d_sae=32, k=4))
    afile = tmp_path / "afile"
    afile.write_text("keep")
    with pytest.raises(FileExistsError, match="afile exists and is not a directory"):
        sae.save(afile)
    assert afile.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sae.save("~/x") == tmp_path / "home" / "x"
    import saelab

    torch.testing.assert_close(saelab.load_sae("~/x").W_dec, sae.W_dec)
    monkeypatch.chdir(tmp_path / "home" / "x")
    with pytest.raises(ValueError, match=r"'\.' names the current, a parent or the root folder.*'my_sae'"):
        sae.save(".")  # replacing the working folder itself would pull it from under the process
