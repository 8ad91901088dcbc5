"""Benchmark JSONs are committed: what they record of the machine names no path of it."""

import re
from pathlib import Path

from pcbench.bench.machine import short_command

ROOT = Path(__file__).resolve().parents[1]


def test_command_lines_keep_what_ran_without_the_paths():
    argv = ["/work/x/.venv/bin/python", "-u", "-m", "pcbench.cli", "train", "/tmp/a/two.yaml", "--out",
            "/tmp/a/run001/", "rel/dir", "/"]
    assert short_command(argv) == "python -u -m pcbench.cli train two.yaml --out run001 rel/dir /"


def test_committed_bench_results_name_no_path_of_the_machine():
    found = {}
    for f in sorted((ROOT / "results" / "bench").glob("*.json")):
        hits = re.findall(r'"[^"]*?(/(?:work|tmp|root|home|Users)/[^" ]*)', f.read_text())
        if hits:
            found[f.name] = hits[:2]
    assert not found, found
