"""A damaged record pcbench reads back is named in pcbench's own warning line
(`pcbench: warning: ...`, `verify.warn`), never through a logging `WARNING pcbench.store:` line."""

from __future__ import annotations

import logging

from pcbench.store import RunPaths, claim_work


def test_empty_owner_json_is_named_in_one_pcbench_warning_line(tmp_path, capsys, caplog):
    paths = RunPaths(record=tmp_path / "rec", work=tmp_path / "work")
    paths.ckpt.mkdir(parents=True)
    paths.owner.write_text("")  # empty: a dead writer's, or a full disk's
    with caplog.at_level(logging.DEBUG):
        moved = claim_work(paths, {"lineage": "a", "spec": "s", "data": "d"}, say=lambda line: None)
    assert moved is not None  # not its owner's state: set aside
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "damaged record" in ln]
    assert lines == [f"pcbench: warning: damaged record {paths.owner}: empty"], err
    assert not [r for r in caplog.records if r.name.startswith("pcbench")]  # nothing through logging
