"""Chance level of each downstream task's primary metric (acc / acc_norm): the score of guessing.

One table for the report's tables and figures. Multiple-choice tasks: 1 / number of choices;
open-vocabulary last-word tasks (LAMBADA-style): 0. A task missing here has no known chance level
(NaN), and an average over tasks has one only when every task has.
"""

from __future__ import annotations

import math
from typing import Iterable

CHANCE: dict[str, float] = {
    # pcbench's local suite (pcbench/tasks/templates)
    "pcb_cloze": 0.0,                 # the passage's last word, open vocabulary
    "pcb_continuation": 0.25,         # 4 continuations (HellaSwag-style)
    # the paper's lm-eval hub suite
    "arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25, "sciq": 0.25, "openbookqa": 0.25,
    "piqa": 0.5, "winogrande": 0.5,
    "social_iqa": 1 / 3,
    "lambada": 0.0, "lambada_openai": 0.0, "lambada_standard": 0.0,
}


def chance(task: str) -> float:
    """Chance level of `task`'s accuracy, NaN when unknown."""
    return CHANCE.get(task, math.nan)


def average_chance(tasks: Iterable[str]) -> float:
    """Chance level of the unweighted mean over `tasks` (NaN when any task's is unknown or none given)."""
    levels = [chance(t) for t in tasks]
    return sum(levels) / len(levels) if levels and not any(math.isnan(c) for c in levels) else math.nan
