"""Answer extraction and scoring: option letters (ScienceQA, SEED-Bench), VQA accuracy (VizWiz), first word (easy-vqa).

Multiple-choice answers are scored twice. `score_prediction` extracts the letter leniently (`extract_choice_letter`:
"(A)", "b)", "The answer is C" count); `strict_choice_score` applies the rule lmms-eval itself scores the task by, so
that a result can be set beside published lmms-eval numbers. Both read only the generated text and the gold letter,
so the strict score is recomputed from a result's saved predictions (`strict_accuracy`).
"""

from __future__ import annotations

import re
import statistics

from qsvd.data.records import OPTION_LETTERS, Record

MULTIPLE_CHOICE = ("scienceqa-img", "seedbench-img")  # scored by the option letter
TASKS = ("easy-vqa", *MULTIPLE_CHOICE, "vizwiz")

# ---- The official VQA normalisation (VQA API's vqaEval.py: processPunctuation, processDigitArticle) ----
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern; drops every '.' not followed by a digit
_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or _COMMA_DIGITS.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA normalisation: punctuation, lower case, number words to digits, no articles, contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    words = [_NUMBERS.get(w, w) for w in _process_punctuation(text).lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy: mean over leave-one-out subsets of the references of min(1, matches / 3).

    Prediction and references are always normalised (the official script skips this when all
    references agree, which would score "Yes" against ten "yes" as 0). 'unanswerable' is an
    ordinary answer. With a single reference the score is exact match.
    """
    if not answers:
        raise ValueError("VQA accuracy needs at least one reference answer")
    predicted = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == predicted for a in answers]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(matches)


# ---- Option letters ----
_LETTER = r"(?P<open>\()?(?P<letter>[a-j])(?P<close>\))?(?![\w'])"
_LEADING = re.compile(r"^" + _LETTER, re.IGNORECASE)
_PHRASES = [  # in priority order
    re.compile(r"\banswer(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?\s*:?\s*(?:option\s+|choice\s+)?" + _LETTER, re.IGNORECASE),
    re.compile(r"\b(?:option|choice)(?:\s+(?:is|would\s+be|should\s+be))?\s*:?\s*" + _LETTER, re.IGNORECASE),
]
_DASH = re.compile(r"[ \t]+[-–—][ \t]")
_PARENTHESISED = re.compile(r"\((?P<letter>[a-j])\)", re.IGNORECASE)


def _is_option(match: re.Match, text: str, sentence_start: bool) -> bool:
    """Whether a single-letter token is an option letter rather than a word ("a cat", "A cat", "I think")."""
    letter = match["letter"]
    if match["open"] and match["close"]:
        return True
    if match["close"] or text[match.end() : match.end() + 1] not in (" ", "\t"):
        return True  # followed by ')', punctuation, a line break or the end
    if _DASH.match(text, match.end()):
        return True  # "A - the cat"
    return letter.isupper() and not (sentence_start and letter in "AI")


def extract_choice_letter(text: str, num_choices: int) -> str | None:
    """The option letter (upper case) a generated answer picks, or None.

    Rules, first hit wins; markdown '*' and '`' are ignored and only the first `num_choices`
    letters count:
    1. The answer starts with a letter token: "A", "A.", "(A)", "b)", "C: the cat", "A - cat", "D\\n...".
       A letter followed by a space and more text counts only in upper case and not as the
       sentence-opening words "A" and "I": "B the cat" is B, "a cat is ..." and "A cat ..." are None.
    2. A phrase anywhere: "answer is X", "answer: X", "answer would be X", "answer is option X",
       then "option X", "choice X", "correct option is X". A lower-case letter there must be
       followed by punctuation or the end ("the answer is a cat" does not count).
    3. A parenthesised letter anywhere, "(B)", when exactly one distinct letter appears so.
    """
    if not 1 <= num_choices <= len(OPTION_LETTERS):
        raise ValueError(f"num_choices={num_choices} must be between 1 and {len(OPTION_LETTERS)}")
    valid = OPTION_LETTERS[:num_choices]
    text = text.replace("*", "").replace("`", "").strip()
    leading = _LEADING.match(text)
    if leading and leading["letter"].upper() in valid and _is_option(leading, text, sentence_start=True):
        return leading["letter"].upper()
    for phrase in _PHRASES:
        for match in phrase.finditer(text):
            if match["letter"].upper() in valid and _is_option(match, text, sentence_start=False):
                return match["letter"].upper()
    in_parentheses = {m["letter"].upper() for m in _PARENTHESISED.finditer(text)} & set(valid)
    return in_parentheses.pop() if len(in_parentheses) == 1 else None


# ---- lmms-eval's own rules (lmms_eval/tasks/scienceqa/utils.py sqa_process_results as fixed by PR #723, commit
# 8ada805, in 0.7.3; lmms_eval/tasks/seedbench/utils.py seed_process_result) ----
def _scienceqa_strict(generated: str, gold: str) -> float:
    """The stripped text is the letter (any case), or starts with an upper-case letter and "." and that letter is
    the gold one ("A", "a", "A.", "A. cat"); anything else scores 0 ("(A)", "A cat", "The answer is A")."""
    prediction = generated.strip()
    if prediction.lower() == gold.lower():
        return 1.0
    if len(prediction) >= 2 and prediction[0].isupper() and prediction[1] == ".":
        return float(prediction[0].lower() == gold.lower())
    return 0.0


def _seedbench_strict(generated: str, gold: str) -> float:
    """The first character of the stripped text is the gold letter, case-sensitive ("A", "A.", "Apple" for A)."""
    prediction = generated.strip()
    return float(prediction[:1] == gold)


STRICT_RULES = {"scienceqa-img": _scienceqa_strict, "seedbench-img": _seedbench_strict}
STRICT_RULE_SUMMARIES = {
    "scienceqa-img": 'the answer must be the letter, or start with the upper-case letter and "."',
    "seedbench-img": "the first character of the answer must be the upper-case letter",
}


def strict_choice_score(task: str, generated: str, gold: str) -> float:
    """Score of one generated text by lmms-eval's rule for `task` (one of STRICT_RULES)."""
    if task not in STRICT_RULES:
        raise ValueError(f"no lmms-eval rule for task {task!r}; tasks with one: {', '.join(STRICT_RULES)}")
    return STRICT_RULES[task](generated, gold)


def strict_accuracy(task: str, predictions: list[dict]) -> float:
    """Mean `strict_choice_score` over saved predictions (their `generated` and `gold` fields)."""
    if not predictions:
        raise ValueError(f"no predictions to score for task {task!r}")
    return statistics.fmean(strict_choice_score(task, p["generated"], p["gold"]) for p in predictions)


def score_prediction(task: str, prediction: str, record: Record) -> tuple[str, float]:
    """(extracted answer, score in [0, 1]) of one generated text for `task` (one of TASKS).

    easy-vqa: the first word of the normalised prediction must equal the gold answer;
    scienceqa-img, seedbench-img: the extracted option letter ("" when none) must equal the gold letter;
    vizwiz: VQA accuracy of the normalised prediction against the human answers.
    """
    if task == "easy-vqa":
        words = normalize_vqa_answer(prediction).split()
        extracted = words[0] if words else ""
        return extracted, float(extracted == normalize_vqa_answer(record.answer))
    if task in MULTIPLE_CHOICE:
        if not record.choices:
            raise ValueError(f"record {record.id} of task {task} has no choices: re-run the data stage")
        letter = extract_choice_letter(prediction, len(record.choices)) or ""
        return letter, float(letter == record.answer)
    if task == "vizwiz":
        return normalize_vqa_answer(prediction), vqa_accuracy(prediction, record.answers)
    raise ValueError(f"no scorer for task {task!r}; known tasks: {', '.join(TASKS)}")
