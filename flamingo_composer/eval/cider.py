"""CIDEr-D with pycocoevalcap's `Cider` scorer, on PTB-tokenised captions (the scorer behind COCO numbers).

Tokenisation: pycocoevalcap's `PTBTokenizer` (Stanford CoreNLP 3.4.1, shipped in the package) when `java` is on
the PATH, exactly as COCO evaluation does; otherwise `python_ptb_tokenize`, a pure-Python re-implementation of
what that tokenizer does to captions (lower-casing, PTB splitting of punctuation and clitics, bracket and quote
escapes) followed by the same punctuation removal. It is tested against the Java tokenizer's output on a set of
captions written into the tests (tests/test_eval_metrics.py). `cider_score` reports which one it used.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence

JAVA_PTB = "ptb-java"  # pycocoevalcap's Stanford PTBTokenizer (needs java)
PYTHON_PTB = "ptb-python"  # this module's pure-Python re-implementation

# Tokens the Stanford tokenizer keeps a trailing period on (mid-sentence), e.g. "st. and main".
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof mt ft vs etc inc ltd co corp no vol fig jan feb mar apr jun jul aug sep sept oct "
    "nov dec ave blvd rd".split()
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {
    "cannot": "can not",
    "gonna": "gon na",
    "gotta": "got ta",
    "wanna": "wan na",
    "gimme": "gim me",
}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'re|'ve|'ll|'d)$")
# One raw token: numbers with inner , . : ; words with inner hyphens, periods and apostrophes; punctuation runs.
_TOKEN = re.compile(
    r"""\d+(?:[.,:]\d+)+%?        # 3.5  1,000  10:30
      | [a-z](?:\.[a-z])+\.?      # u.s.  e.g.
      | '(?:cause|em|til|n)\b     # 'cause 'em 'til
      | [\w#@&*+=/]+(?:[-'.][\w#@&*+=/]+)*'?  # words: cell-phone, o'clock, everyone's
      | \.\.\.+ | --+ | [?!]+ | ``|''
      | \S""",
    re.VERBOSE,
)


def java_available() -> bool:
    return shutil.which("java") is not None


def _split_word(token: str, is_last: bool) -> list[str]:
    """PTB treatment of one raw token: trailing periods, clitics, the few words PTB splits, escapes."""
    if token in _BRACKETS:
        return [_BRACKETS[token]]
    if token == '"':
        return ['"']  # resolved to `` or '' by the caller (needs the context)
    out: list[str] = []
    if token.endswith(".") and len(token) > 1 and not re.fullmatch(r"[a-z](?:\.[a-z])+\.", token):
        stem = token[:-1]
        if is_last or stem not in _ABBREVIATIONS:
            return _split_word(stem, False) + ["."]
    if token.startswith("$") and len(token) > 1:
        return ["$", *_split_word(token[1:], is_last)]
    if token.endswith("%") and len(token) > 1:
        return [*_split_word(token[:-1], False), "%"]
    if token in _SPLIT_WORDS:
        return _SPLIT_WORDS[token].split()
    match = _CLITIC.match(token)
    if match and match.group(1) not in ("'", "o"):
        stem, clitic = match.groups()
        if clitic == "n't" or stem[-1:].isalpha():
            return [*_split_word(stem, False), clitic]
    if token.endswith("'") and len(token) > 1 and token[-2].isalpha() and not token.endswith("s'"):
        return [token[:-1], "'"]
    out.append(token)
    return out


def python_ptb_tokenize(caption: str) -> str:
    """One caption -> lower-cased PTB tokens joined by spaces, PTB punctuation tokens removed."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    text = caption.replace("\n", " ").lower()
    raw = _TOKEN.findall(text)
    for i in range(len(raw) - 2, 0, -1):  # "st" "." mid-sentence -> "st." (PTB keeps abbreviation periods)
        if raw[i] == "." and raw[i - 1] in _ABBREVIATIONS:
            raw[i - 1 : i + 1] = [raw[i - 1] + "."]
    tokens: list[str] = []
    for i, token in enumerate(raw):
        for piece in _split_word(token, is_last=i == len(raw) - 1):
            if piece == '"':  # opening quote at the start or after an opening bracket/space-separated token
                opening = not tokens or tokens[-1] in ("-lrb-", "-lsb-", "-lcb-", "``", "`") or _opens(raw, i)
                piece = "``" if opening else "''"
            elif piece == "'" and (not tokens or _opens(raw, i)):
                piece = "`"
            tokens.append(piece)
    kept = [t for t in tokens if t not in PUNCTUATIONS]
    return " ".join(kept)


def _opens(raw: list[str], i: int) -> bool:
    """A quote opens when the text after it is a word and the count of equal quotes before it is even."""
    quote = raw[i]
    return sum(1 for t in raw[:i] if t == quote) % 2 == 0


def tokenize_captions(
    captions: Mapping[object, Sequence[str]], tokenizer: str | None = None
) -> tuple[dict, str]:
    """{id: [caption, ...]} -> ({id: [tokenised, ...]}, tokenizer name). `tokenizer`: None = java when present."""
    name = tokenizer or (JAVA_PTB if java_available() else PYTHON_PTB)
    if name == JAVA_PTB:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        wrapped = {key: [{"caption": c} for c in caps] for key, caps in captions.items()}
        return PTBTokenizer().tokenize(wrapped), name
    if name != PYTHON_PTB:
        raise ValueError(f"unknown caption tokenizer {name!r}; use {JAVA_PTB!r} or {PYTHON_PTB!r}")
    return {key: [python_ptb_tokenize(c) for c in caps] for key, caps in captions.items()}, name


def cider_score(
    predictions: Mapping[object, str],
    references: Mapping[object, Sequence[str]],
    tokenizer: str | None = None,
) -> tuple[float, str]:
    """Corpus CIDEr-D x 100 (as the reference reports it) of {id: caption} against {id: [reference captions]}.

    The IDF statistics come from the references of the scored ids, as in COCO evaluation. Returns the score and
    the name of the tokenizer used.
    """
    from pycocoevalcap.cider.cider import Cider

    if not predictions:
        raise ValueError("cider_score: no predictions to score")
    missing = [key for key in predictions if not references.get(key)]
    if missing:
        raise KeyError(f"cider_score: no reference captions for id(s) {missing[:5]}")
    keys = list(predictions)
    # One tokenizer call for candidates and references together (one java start), split apart afterwards.
    joined = {("ref", k): list(references[k]) for k in keys}
    joined.update({("res", k): [predictions[k]] for k in keys})
    tokens, name = tokenize_captions(joined, tokenizer)
    gts = {k: tokens[("ref", k)] for k in keys}
    res = {k: tokens[("res", k)] for k in keys}
    score, _ = Cider().compute_score(gts, res)
    return float(score) * 100.0, name
