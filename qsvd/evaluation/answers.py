"""Answer extraction and scoring: option letters (ScienceQA), VQA accuracy (VizWiz), exact words (easy-vqa)."""

from __future__ import annotations

import re

from qsvd.data.records import OPTION_LETTERS, Record

# The official VQA evaluation's normalisation (punctuation, number words, articles, contractions).
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "didnt": "didn't", "wasnt": "wasn't", "werent": "weren't", "hasnt": "hasn't",
                 "havent": "haven't", "im": "i'm", "ive": "i've", "youre": "you're", "thats": "that's",
                 "whats": "what's", "theres": "there's", "its": "it's", "lets": "let's", "shouldnt": "shouldn't",
                 "couldnt": "couldn't", "wouldnt": "wouldn't"}
_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!*#%^&$"
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")


def normalize_vqa_answer(text: str) -> str:
    """Lower-case, strip punctuation (keeping decimal points), number words to digits, drop articles."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    out = text
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_DIGITS, text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = []
    for word in out.split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA accuracy: mean over the leave-one-out subsets of min(1, matches / 3)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(a) for a in answers]
    scores = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1 :] if len(refs) > 1 else refs
        scores.append(min(1.0, sum(r == pred for r in others) / 3))
    return sum(scores) / len(scores)


_LETTER_PATTERNS = [
    r"answer is:?\s*\(?([A-J])\)?(?:[.:)\s]|$)",  # "The answer is A", "answer is (b)"
    r"answer:\s*\(?([A-J])\)?(?:[.:)\s]|$)",  # "Answer: b)"
    r"option\s*\(?([A-J])\)?(?:[.:)\s]|$)",  # "Option C"
]


def extract_choice_letter(text: str, num_choices: int) -> str | None:
    """The option letter a generated answer picks, or None.

    A bare letter at the start counts only when it is upper case or followed by '.', ')' or ':',
    so an article ("a cat is ...") is not read as option A; "The answer is x" phrasings count
    in any case. Letters beyond the number of choices are ignored.
    """
    valid = OPTION_LETTERS[:num_choices]
    stripped = text.strip()
    start = re.match(r"^\(?([A-Ja-j])\)?(?=[.:)]|\s|$)", stripped)
    if start:
        letter = start.group(1)
        lone_article = letter == "a" and re.match(r"^a\s", stripped) is not None
        if letter.upper() in valid and not lone_article:
            return letter.upper()
    for pattern in _LETTER_PATTERNS:
        match = re.search(pattern, stripped, flags=re.IGNORECASE)
        if match and match.group(1).upper() in valid:
            return match.group(1).upper()
    return None


def score_prediction(task: str, prediction: str, record: Record) -> tuple[str, float]:
    """(extracted answer, score in [0, 1]) of one generated text."""
    if task == "easy-vqa":
        words = normalize_vqa_answer(prediction).split()
        extracted = words[0] if words else ""
        return extracted, float(extracted == record.answer)
    if task == "scienceqa-img":
        letter = extract_choice_letter(prediction, len(record.choices or []))
        return letter or "", float(letter == record.answer)
    if task == "vizwiz":
        return prediction.strip(), vqa_accuracy(prediction, record.answers)
    raise ValueError(f"no scorer for task {task!r}; known tasks: easy-vqa, scienceqa-img, vizwiz")
