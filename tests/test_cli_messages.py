"""What the CLI tells a user: a bad setting's message alone, exit code 1 (the traceback with SAELAB_DEBUG=1); an
unknown config option with the group's real choices; fetch-assets' sizes on disk and what was already there."""

from __future__ import annotations

from pathlib import Path

import pytest

from saelab.app.cli import CONFIG_DIR, main

SMALL = ["source.d_in=16", "source.n_features=48", "sae.d_sae=64", "trainer.total_tokens=2048",
         "trainer.batch_size=256", "trainer.device=cpu", "logging.progress=false"]  # fmt: skip


def test_a_bad_setting_prints_its_message_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SAELAB_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *SMALL, "sae.k=5000", f"hydra.run.dir={tmp_path / 'run'}"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error: sae.k=5000 must be in [1, sae.d_sae=64]; lower k or widen the SAE." in err
    assert "Traceback" not in err and 'File "' not in err and "SAELAB_DEBUG=1" in err
    assert (tmp_path / "run" / ".hydra").is_dir() and not (
        tmp_path / "run" / "cli.log"
    ).exists()  # no empty log
    monkeypatch.setenv("SAELAB_DEBUG", "1")  # the traceback: the error itself propagates
    with pytest.raises(ValueError, match=r"sae\.k=5000 must be in"):
        main(["train", *SMALL, "sae.k=5000", f"hydra.run.dir={tmp_path / 'run'}"])


def test_an_unknown_option_lists_the_real_choices(capsys, monkeypatch):
    monkeypatch.delenv("SAELAB_DEBUG", raising=False)
    with pytest.raises(SystemExit):
        main(["train", "sae=topkk"])
    err = capsys.readouterr().err
    variants = sorted(p.stem for p in (Path(CONFIG_DIR) / "sae").glob("*.yaml"))
    assert f"Could not find 'sae/topkk'; choose one of: {', '.join(variants)}" in err
    assert "_schema" not in err


def test_fetch_assets_says_what_is_already_there_and_its_size_on_disk(capsys):
    from harvest_helpers import fetch_or_skip

    from saelab.data.assets import ASSETS
    from saelab.data.assets import main as fetch_main

    root = fetch_or_skip()  # fetched once for the real-model tests; present from here on
    fetch_main(["--dest", str(root)])
    out = capsys.readouterr().out
    for name in ASSETS:
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert "already present" in line and line.endswith("MB on disk)"), out
    total = int(out.splitlines()[-1].split(": ")[1].split(" MB")[0].replace(",", ""))
    assert 400 < total < 900  # the GGUF, its float32 conversion and the corpus (measured: 654 MB)
