"""The local lm-eval task suite: cloze and continuation tasks built from held-out speeches.

Source: `corpora.iter_documents("sotu", "test")`, the 233 State of the Union addresses (1790-2021),
a domain no model here trains on (the training corpus is books). Every build writes the same bytes:
the only randomness is `random.Random` with fixed seeds over a fixed document order.

1. Cleaning: stage directions such as "(Applause.)" and "(Laughter.)" are dropped; whitespace is
   collapsed.
2. Sentences: a rule-based splitter cuts after . ! ? (and closing quotes/brackets) followed by a
   space and an upper-case letter, digit or opening quote, except after abbreviations (Mr., St.,
   Gen., Jan., ...), initials (J.) and dotted acronyms (U.S.). A sentence is *clean* with 4-60 words,
   balanced quotes and parentheses, no editorial brackets or odd symbols, >= 70% letters, and
   fewer than two all-capital words (which mark section headings glued to the text).
   Passages are runs of consecutive clean sentences of one address; passages never overlap.
3. `pcb_cloze` (LAMBADA-style, scored like lambada_openai): a passage of whole sentences, 50-120
   words, whose final sentence (>= 6 words) ends in a purely alphabetic word of >= 3 letters directly
   before its . ! or ?. That word is the target; the context is the passage before it (the final
   punctuation is dropped). Passages whose target occurs in the context (as a word, any case) are
   rejected, so copying from the context cannot solve an item. lm-eval scores the loglikelihood of
   " " + target: `acc` (greedy decoding reproduces the whole word) and `perplexity`.
4. `pcb_continuation` (HellaSwag-style): the context is >= 2 sentences (30-90 words); the choices are
   the real next sentence and three distractor sentences from OTHER addresses among the 8 nearest in
   time on each side (same era and register). All four are "endings": 5-14 words, <= 75 characters
   (so a choice fits the 64-token window of the smallest models), starting with a capital and ending
   in . ! or ?. Distractors have a character length in the same geometric bin (width x1.25) as the
   answer, so length tells nothing (a length-only picker scores ~25%); they differ from the answer
   and from each other (case-insensitively) and do not occur in the context. The answer's position
   is uniform. Metrics `acc` and `acc_norm` (loglikelihood per byte).
5. Sampling: each address's candidates are shuffled, then drawn round-robin over the addresses (in a
   shuffled order) until the task has its examples, so every era is represented; the final list is
   shuffled, so lm-eval's `--limit N` (the first N) is an unbiased subset.

Records: pcb_cloze {id, address, text, context, target}; pcb_continuation {id, address, context,
choices, label, distractor_addresses} (`address`: index into the sotu documents, 0 = 1790).
`build_tasks(out)` writes `<task>.jsonl` (one `test` split) and the task YAMLs (from `templates/`,
with `dataset_path: json` and ABSOLUTE `data_files`, as lm-eval resolves relative ones against the
cwd) plus the group `pcbench_local`, into `out` or `cache_dir()/lm_eval_tasks/<key>/`; the key hashes
the source asset, this module and the templates. Files are written atomically under a lock, and
`suite.json` (last) records what was built; a complete, matching suite is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from pcbench.data import corpora
from pcbench.util import outputs
from pcbench.util.atomic import file_lock, write_bytes, write_json
from pcbench.util.paths import cache_dir
from pcbench.util.verify import Damaged, verify_files, warn

FORMAT = 1  # the tasks' lm-eval metadata version; bump when examples change meaning
TASKS = ("pcb_cloze", "pcb_continuation")
GROUP = "pcbench_local"
EXAMPLES = {"pcb_cloze": 1000, "pcb_continuation": 1000}
SEEDS = {"pcb_cloze": 1, "pcb_continuation": 2}
CLOZE_WORDS = (50, 120)
CONTEXT_WORDS = (30, 90)
ENDING_WORDS, ENDING_CHARS = (5, 14), 75
NEIGHBOURS = 8  # distractor addresses on each side
LENGTH_BIN = 1.25
TEMPLATES = Path(__file__).with_name("templates")

_STAGE = re.compile(r"\s*\((?:applause|laughter|cheers|booing)[^()]{0,20}\)", re.IGNORECASE)
_BOUNDARY = re.compile(r"([.!?])([\"'”’)\]]*)\s+(?=[\"'“‘(\[]*[A-Z0-9$])")
_ABBREV = frozenset(
    "mr mrs ms messrs dr st hon gen gens col capt lt maj sgt adm gov sen rep rev prof jr sr esq no nos "
    "vol art sec secs ft mt vs viz etc cf co corp inc ltd bros dept pres jan feb mar apr jun jul aug "
    "sep sept oct nov dec i.e e.g".split())
_ODD = re.compile(r"[\[\]{}_*•@#|<>\\~^+=%\x00-\x1f]")
_CAPS = re.compile(r"\b[A-Z]{3,}\b")  # section headings ("WAR LIQUIDATION AND ...") glued to text
_CLOZE_END = re.compile(r"(?<=\s)([A-Za-z]{3,})[.!?]$")


@dataclass(frozen=True)
class Sentence:
    text: str
    words: int
    clean: bool
    ending: bool


def clean_text(text: str) -> str:
    """Drop stage directions and collapse whitespace."""
    text = _STAGE.sub("", text)
    text = re.sub(r"([—–])\s*\1", r"\1", text)  # "President—(applause)—no" -> "President—no"
    return re.sub(r"\s+", " ", text).strip()


def _abbreviation(token: str) -> bool:
    token = token.lstrip("\"'“‘([")
    return (token.lower() in _ABBREV or re.fullmatch(r"[A-HJ-Za-z]", token) is not None
            or re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", token) is not None)


def split_sentences(text: str) -> list[str]:
    """Sentences of cleaned `text` (rule-based; see the module docstring)."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        if m.group(1) == "." and not m.group(2):
            token = text[text.rfind(" ", 0, m.start()) + 1: m.start()]
            if _abbreviation(token):
                continue
        out.append(text[start: m.end(2)])
        start = m.end()
    if start < len(text):
        out.append(text[start:])
    return [s for s in out if s]


def _balanced(s: str) -> bool:
    return (s.count("(") == s.count(")") and s.count('"') % 2 == 0
            and s.count("“") == s.count("”"))


def _mostly_letters(text: str) -> bool:
    chars = "".join(text.split())  # the characters that are not whitespace (str.isspace's)
    return sum(map(str.isalpha, chars)) >= 0.7 * len(chars)


def _sentence(text: str) -> Sentence:
    words = len(text.split())
    clean = (4 <= words <= 60 and _balanced(text) and not _ODD.search(text) and len(_CAPS.findall(text)) < 2
             and _mostly_letters(text))
    ending = (clean and ENDING_WORDS[0] <= words <= ENDING_WORDS[1] and len(text) <= ENDING_CHARS
              and text[0].isupper() and text[-1] in ".!?")
    return Sentence(text, words, clean, ending)


def _documents() -> list[list[Sentence]]:
    return [[_sentence(s) for s in split_sentences(clean_text(d))]
            for d in corpora.iter_documents("sotu", "test")]


def _in_context(word: str, context: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", context, re.IGNORECASE) is not None


def _cloze(sents: list[Sentence]) -> Optional[dict]:
    if sents[-1].words < 6:
        return None
    text = " ".join(s.text for s in sents)
    m = _CLOZE_END.search(text)
    if m is None:
        return None
    context, target = text[: m.start(1)].rstrip(), m.group(1)
    if _in_context(target, context):
        return None
    return {"text": text[: m.end(1)], "context": context, "target": target}


def _cloze_candidates(doc: list[Sentence]) -> list[dict]:
    """Non-overlapping passages of 50-120 words ending in a good target."""
    out, i, lo, hi = [], 0, *CLOZE_WORDS
    while i < len(doc):
        words, j, found = 0, i, None
        while j < len(doc) and doc[j].clean:
            words += doc[j].words
            if words > hi:
                break
            if words >= lo and (ex := _cloze(doc[i: j + 1])) is not None:
                found = ex
                break
            j += 1
        if found:
            out.append(found)
            i = j + 1
        else:
            i += 1
    return out


def _continuation_candidates(doc: list[Sentence]) -> list[tuple[str, str]]:
    """Non-overlapping (context, real next sentence) pairs."""
    out, i, lo, hi = [], 0, *CONTEXT_WORDS
    while i < len(doc):
        words, j, found = 0, i, None
        while j < len(doc) and doc[j].clean:
            words += doc[j].words
            if words > hi:
                break
            k = j + 1
            if k - i >= 2 and words >= lo and k < len(doc) and doc[k].ending:
                found = k
                break
            j += 1
        if found is not None:
            out.append((" ".join(s.text for s in doc[i:found]), doc[found].text))
            i = found + 1
        else:
            i += 1
    return out


def _length_bin(s: str) -> int:
    return int(math.log(len(s)) / math.log(LENGTH_BIN))


def _round_robin(per_doc: list[list], n: int, rng: random.Random) -> list[tuple[int, object]]:
    """Up to `n` (doc index, candidate) pairs, drawn evenly over the documents."""
    pools = [list(c) for c in per_doc]
    for p in pools:
        rng.shuffle(p)
    order = list(range(len(pools)))
    rng.shuffle(order)
    picked: list[tuple[int, object]] = []
    depth = 0
    while len(picked) < n and any(depth < len(p) for p in pools):
        for d in order:
            if depth < len(pools[d]) and len(picked) < n:
                picked.append((d, pools[d][depth]))
        depth += 1
    return picked


def cloze_examples(docs: list[list[Sentence]]) -> list[dict]:
    rng = random.Random(SEEDS["pcb_cloze"])
    picked = _round_robin([_cloze_candidates(d) for d in docs], EXAMPLES["pcb_cloze"], rng)
    rng.shuffle(picked)
    return [{"id": i, "address": d, **ex} for i, (d, ex) in enumerate(picked)]


def continuation_examples(docs: list[list[Sentence]]) -> list[dict]:
    rng = random.Random(SEEDS["pcb_continuation"])
    # endings of each address by length bin, in document order
    bins: list[dict[int, list[str]]] = []
    for doc in docs:
        table: dict[int, list[str]] = {}
        for s in doc:
            if s.ending:
                table.setdefault(_length_bin(s.text), []).append(s.text)
        bins.append(table)
    cands = [_continuation_candidates(d) for d in docs]
    out: list[dict] = []
    for d, (context, answer) in _round_robin(cands, sum(map(len, cands)), rng):
        if len(out) == EXAMPLES["pcb_continuation"]:
            break
        lo, hi = max(0, d - NEIGHBOURS), min(len(docs), d + NEIGHBOURS + 1)
        b = _length_bin(answer)
        pool = [(o, s) for o in range(lo, hi) if o != d for s in bins[o].get(b, [])]
        seen, distractors = {answer.lower()}, []
        for o, s in rng.sample(pool, len(pool)):
            if s.lower() not in seen and s.lower() not in context.lower():
                seen.add(s.lower())
                distractors.append((o, s))
                if len(distractors) == 3:
                    break
        if len(distractors) < 3:
            continue
        label = rng.randrange(4)
        choices = [s for _, s in distractors]
        choices.insert(label, answer)
        out.append({"address": d, "context": context, "choices": choices, "label": label,
                    "distractor_addresses": [o for o, _ in distractors]})
    rng.shuffle(out)
    return [{"id": i, **ex} for i, ex in enumerate(out)]


# ---------------------------------------------------------------------------------------------
# Building the suite


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _templates() -> dict[str, str]:
    names = (*TASKS, GROUP)
    missing = [n for n in names if not (TEMPLATES / f"{n}.yaml").is_file()]
    if missing:
        raise FileNotFoundError(f"task templates {missing} are missing from {TEMPLATES}")
    return {n: (TEMPLATES / f"{n}.yaml").read_text(encoding="utf-8") for n in names}


def suite_key() -> str:
    """Hash of what decides the suite's content: source asset, this module, the templates."""
    desc = {"format": FORMAT, "source": corpora.fingerprint("sotu", "test"),
            "code": _sha(Path(__file__).read_bytes()), "templates": _templates()}
    return _sha(json.dumps(desc, sort_keys=True).encode("utf-8"))[:16]


def _complete(out: Path, key: str, say: bool = False) -> bool:
    """Is `out` a complete suite of `key`, every file with the sha256 `suite.json` recorded
    (`pcbench.util.verify`: hashed once per version of a file)? `say`: name a damaged file in one
    warning line (the suite is then rebuilt)."""
    manifest = out / "suite.json"
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
        if info.get("key") != key:
            return False
        verify_files(out, info["files"], what="task suite")
        return True
    except Damaged as e:
        if say:
            warn(f"{e}; rebuilding it")
        return False
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return False


def _render(out: Path) -> dict[str, bytes]:
    docs = _documents()
    data = {"pcb_cloze": cloze_examples(docs), "pcb_continuation": continuation_examples(docs)}
    files: dict[str, bytes] = {}
    for name, text in _templates().items():
        if name in data:
            files[f"{name}.jsonl"] = _jsonl(data[name])
            text = text.replace("@DATA_FILE@", json.dumps(str(out / f"{name}.jsonl")))
        files[f"{name}.yaml"] = text.replace("@VERSION@", f"{FORMAT}.0").encode("utf-8")
    return files


def build_tasks(out: Optional[Path] = None) -> Path:
    """Build the local suite (or reuse a complete one); returns the directory for `include_path`."""
    key = suite_key()
    out = Path(out if out is not None else cache_dir() / "lm_eval_tasks" / key).resolve()
    if _complete(out, key, say=True):
        return out
    locks = cache_dir() / "lm_eval_tasks"  # not inside `out` (a writer killed would leave it there)
    locks.mkdir(parents=True, exist_ok=True)
    with file_lock(locks / f".{_sha(str(out).encode('utf-8'))[:16]}.lock"):
        if _complete(out, key):
            return out
        files = _render(out)
        counts = {t: files[f"{t}.jsonl"].count(b"\n") for t in TASKS}
        for t, n in counts.items():
            if n != EXAMPLES[t]:
                raise RuntimeError(f"task {t}: the sotu corpus gave {n} examples, want {EXAMPLES[t]}")
        with outputs.staging(out) as tmp:  # built beside and swapped in whole (`util.outputs`)
            for name, data in files.items():
                write_bytes(tmp / name, data)
            write_json(tmp / "suite.json", {"format": FORMAT, "key": key, "source": "sotu/test",
                                            "examples": counts, "files": {n: _sha(d) for n, d in files.items()}})
            outputs.install(tmp, out, "tasks", "task suite")
    return out


def iter_examples(suite: Path, task: str) -> Iterator[dict]:
    """The examples of `task` in a built suite, in file order."""
    if task not in TASKS:
        raise ValueError(f"unknown local task {task!r}; valid: {', '.join(TASKS)}")
    with open(Path(suite) / f"{task}.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
