"""Cheap checks that a Hugging Face checkpoint directory is whole, before any work reads it.

`damage(path)` reads what a truncated or damaged checkpoint gets wrong without loading a tensor:
config.json (and the tokenizer's JSON files) must parse, and every `*.safetensors` file must be
as long as its header says (8 bytes of header length, the JSON header, then the tensors' bytes up
to the largest end offset). It returns one line naming the damaged file, or None.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "model.safetensors.index.json")


def _json_problem(f: Path) -> Optional[str]:
    try:
        data = f.read_bytes()
    except OSError as e:
        return f"{f}: cannot read ({e.strerror or e})"
    try:
        json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        return f"{f}: damaged (not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start})"
    except ValueError as e:
        return f"{f}: damaged or truncated (not valid JSON: {getattr(e, 'msg', e)} at offset {getattr(e, 'pos', '?')} of {len(data)} bytes)"
    return None


def safetensors_problem(f: Path) -> Optional[str]:
    """What is wrong with the safetensors file `f` (size against its header), or None."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{f}: damaged or truncated ({size} bytes, not a safetensors file)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                return f"{f}: damaged or truncated ({size} bytes; its header alone claims {n})"
            header = json.loads(fh.read(n).decode("utf-8"))
    except OSError as e:
        return f"{f}: cannot read ({e.strerror or e})"
    except ValueError:  # JSON or UTF-8
        return f"{f}: damaged (unreadable safetensors header)"
    if not isinstance(header, dict):
        return f"{f}: damaged (unreadable safetensors header)"
    try:
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"], default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return f"{f}: damaged (unreadable safetensors header)"
    if size != 8 + n + end:
        what = "truncated" if size < 8 + n + end else "damaged"
        return f"{f}: {what} ({size} bytes, its header describes {8 + n + end})"
    return None


def damage(path: str | Path, tokenizer: bool = True) -> Optional[str]:
    """One line naming the first damaged file of checkpoint directory `path`, or None (also None
    for what this cannot judge: a missing directory, a hub id)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    for name in JSON_FILES:
        if not tokenizer and name.startswith(("tokenizer", "special_tokens")):
            continue
        if (p / name).is_file():
            problem = _json_problem(p / name)
            if problem:
                return problem
    for f in sorted(p.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            return problem
    return None
