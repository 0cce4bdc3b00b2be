"""Caption and question cleaning, as the original ALBEF (``pre_caption`` / ``pre_question``)."""
from __future__ import annotations

import re

_DROP = re.compile(r"[,.'!?\"()*#:;~]")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Lower-case; delete ``, . ' ! ? " ( ) * # : ; ~``; ``-`` and ``/`` become spaces; ``<person>`` becomes
    ``person``; collapse whitespace; keep the first ``max_words`` words."""
    caption = _DROP.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_question(question: str, max_words: int = 50) -> str:
    """Like :func:`pre_caption` without whitespace collapsing (the original's question cleaning)."""
    question = _DROP.sub("", question.lower()).replace("-", " ").replace("/", " ").rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question
