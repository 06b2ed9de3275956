"""Post-processing of generated text, as the reference evaluation does before scoring."""

from __future__ import annotations

import re

_VQA_STOP = re.compile("Question|Answer|Short")


def postprocess_caption(text: str) -> str:
    """Cut at the first "Output" (the model starting another demo), drop double quotes (reference evaluate.py)."""
    return text.split("Output", 1)[0].replace('"', "")


def postprocess_vqa(text: str) -> str:
    """Cut at the first "Question", "Answer" or "Short", then at the first ", " (reference vqa_metric.py)."""
    answer = _VQA_STOP.split(text, maxsplit=1)[0]
    return answer.split(", ", 1)[0]


def postprocess(kind: str, text: str) -> str:
    """The post-processing of a task kind ('captioning' | 'vqa'), or 'ok_vqa' (VQA's, then stemmed: ok_vqa.py)."""
    if kind == "captioning":
        return postprocess_caption(text)
    if kind == "vqa":
        return postprocess_vqa(text)
    if kind == "ok_vqa":
        from flamingo_composer.eval.ok_vqa import postprocess_ok_vqa

        return postprocess_ok_vqa(text)
    raise ValueError(f"unknown post-processing {kind!r}")
