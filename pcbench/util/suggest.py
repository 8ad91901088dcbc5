"""The "did you mean" hint of every error about an unknown name (a leaf: imports only difflib).

`did_you_mean(word, choices)` is "" or " (did you mean 'x'?)", appended to a one-line error;
`unknown_tasks(names, pool)` is the message for lm-eval task names found nowhere.
"""

from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(word: str, choices: Iterable[str], n: int = 1) -> str:
    """"" if nothing in `choices` is close to `word`; else " (did you mean 'x'?)", or with
    `n` > 1 up to `n` names unquoted: " (did you mean x, y?)"."""
    close = difflib.get_close_matches(str(word), list(choices), n=n)
    if not close:
        return ""
    return f" (did you mean {close[0]!r}?)" if n == 1 else f" (did you mean {', '.join(close)}?)"


def unknown_tasks(names: Iterable[str], pool: Iterable[str]) -> str:
    """"unknown lm-eval task(s): 'a' (did you mean x, y?); 'b'", naming up to 3 close tasks each."""
    pool = list(pool)
    return "unknown lm-eval task(s): " + "; ".join(f"{t!r}" + did_you_mean(t, pool, n=3) for t in names)
