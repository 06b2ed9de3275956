"""OK-VQA's answer post-processing: the VQA cut, then the stemming of the OK-VQA v1.1 evaluation, as the reference
applies it to generations (its ok_vqa_utils.py; the annotations' answers are stemmed the same way upstream).

Stemming, word by word after NLTK's tokenizer and part-of-speech tagger: a fixed table of manual matches first,
then words ending in "ing" lemmatised as verbs (WordNet), then plural nouns (NNS / NNPS) singularised
(`inflection`). NLTK needs three data packages (`NLTK_DATA_PACKAGES`); `check_nltk_data` names the missing ones so
an OK-VQA evaluator stops before a model is built, with the command that fetches them.
"""

from __future__ import annotations

import functools

from flamingo_composer.eval.postprocess import postprocess_vqa

# (nltk.data resource path, package to download): word_tokenize, pos_tag and the WordNet lemmatiser.
NLTK_DATA_PACKAGES = (
    ("tokenizers/punkt_tab/english/", "punkt_tab"),
    ("taggers/averaged_perceptron_tagger_eng/", "averaged_perceptron_tagger_eng"),
    ("corpora/wordnet", "wordnet"),
)

# Words the automatic rules miss or get wrong, with the form OK-VQA's evaluation expects (the reference's table).
MANUAL_MATCHES = {
    "police": "police", "las": "las", "vegas": "vegas", "yes": "yes", "jeans": "jean", "hell's": "hell",
    "domino's": "domino", "morning": "morn", "clothes": "cloth", "are": "are", "riding": "ride", "leaves": "leaf",
    "dangerous": "danger", "clothing": "cloth", "texting": "text", "kiting": "kite", "firefighters": "firefight",
    "ties": "tie", "married": "married", "teething": "teeth", "gloves": "glove", "tennis": "tennis",
    "dining": "dine", "directions": "direct", "waves": "wave", "illness": "ill", "crepte": "crept",
    "adhesives": "adhesive", "regent's": "regent", "decorations": "decor", "rabbies": "rabbi",
    "overseas": "oversea", "travellers": "travel", "casings": "case", "smugness": "smug", "doves": "dove",
    "nationals": "nation", "mustange": "mustang", "ringe": "ring", "gondoliere": "gondolier",
    "vacationing": "vacate", "reminders": "remind", "baldness": "bald", "settings": "set", "glaced": "glace",
    "coniferous": "conifer", "revelations": "revel", "personals": "person", "daughter's": "daughter",
    "badness": "bad", "projections": "project", "polarizing": "polar", "vandalizers": "vandal",
    "minerals": "miner", "protesters": "protest", "controllers": "control", "weddings": "wed",
    "sometimes": "sometime", "earing": "ear",
}  # fmt: skip


def missing_nltk_data() -> list[str]:
    """The NLTK data packages OK-VQA's stemming needs that nltk.data cannot find."""
    import nltk

    missing = []
    for resource, package in NLTK_DATA_PACKAGES:
        try:
            nltk.data.find(resource)
        except LookupError:
            missing.append(package)
    return missing


def check_nltk_data() -> None:
    """ValueError naming the missing NLTK data and how to fetch it (run before any model is built)."""
    missing = missing_nltk_data()
    if missing:
        raise ValueError(
            f"OK-VQA's answer stemming needs the NLTK data {missing}: run "
            f"`python -m nltk.downloader {' '.join(missing)}` (or set NLTK_DATA to a folder holding them)"
        )


@functools.lru_cache(maxsize=1)
def _lemmatizer():
    import nltk

    return nltk.stem.WordNetLemmatizer()


def stem(text: str) -> str:
    """OK-VQA v1.1 stemming of one answer (see the module docstring)."""
    import inflection
    import nltk
    from nltk.corpus.reader import VERB

    words = []
    for word, tag in nltk.pos_tag(nltk.tokenize.word_tokenize(text)):
        if word in MANUAL_MATCHES:
            word = MANUAL_MATCHES[word]
        elif word.endswith("ing"):
            word = _lemmatizer().lemmatize(word, VERB)
        elif tag.startswith("NNS") or tag.startswith("NNPS"):
            word = inflection.singularize(word)
        words.append(word)
    return " ".join(words)


def postprocess_ok_vqa(text: str) -> str:
    """A generation -> OK-VQA answer: cut as for VQA (at "Question" / "Answer" / "Short", then ", "), stemmed."""
    return stem(postprocess_vqa(text))
