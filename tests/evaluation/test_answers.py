import pytest

from qsvd.data.records import Record
from qsvd.evaluation.answers import (
    extract_choice_letter,
    normalize_vqa_answer,
    score_prediction,
    strict_accuracy,
    strict_choice_score,
    vqa_accuracy,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "text, letter",
    [
        # rule 1: a leading letter token
        ("A", "A"), ("A.", "A"), ("(A)", "A"), ("a", "A"), (" d.", "D"), ("b)", "B"), ("(c)", "C"),
        ("B) the cat", "B"), ("C: a dog", "C"), ("A: the cat", "A"), ("B the cat", "B"), ("B, because", "B"),
        ("A\nBecause cats have fur.", "A"), ("**C**", "C"), ("`D`", "D"), ("C.\n", "C"), ("A - the cat", "A"),
        # rule 2: answer / option phrases
        ("The answer is A", "A"), ("The answer is (b).", "B"), ("Answer: c)", "C"), ("answer: b)", "B"),
        ("Answer: b", "B"), ("Option D", "D"), ("The correct option is C.", "C"), ("My answer is option B", "B"),
        ("The answer is: (C) owl", "C"), ("The answer would be D, the owl.", "D"), ("Answer:A", "A"),
        ("The answer is A because it is red.", "A"), ("E. coli is small; the answer is B", "B"),
        ("Option A is wrong, so the answer is B.", "B"),  # an answer phrase outranks an option phrase
        # rule 3: one parenthesised letter
        ("I would pick (b) here", "B"), ("Between (A) and (B) I am unsure", None),
        # articles, pronouns and words are not options
        ("a cat is on the mat", None), ("A cat is on the mat", None), ("I do not know", None),
        ("The answer is a cat", None), ("an apple", None), ("Apple", None), ("Cat", None),
        # out of range, empty
        ("E", None), ("(F)", None), ("The answer is E", None), ("", None), ("   ", None),
    ],
)
def test_extract_choice_letter(text, letter):
    assert extract_choice_letter(text, 4) == letter


def test_extract_choice_letter_respects_the_number_of_choices():
    assert extract_choice_letter("C", 2) is None
    assert extract_choice_letter("C", 3) == "C"
    assert extract_choice_letter("J.", 10) == "J"
    with pytest.raises(ValueError, match="num_choices=0"):
        extract_choice_letter("A", 0)
    with pytest.raises(ValueError, match="num_choices=11"):
        extract_choice_letter("A", 11)


@pytest.mark.parametrize(
    "text, normal",
    [
        ("Two dogs.", "2 dogs"), ("The Red Car!", "red car"), ("An apple", "apple"), ("\tYes\n", "yes"),
        ("unanswerable", "unanswerable"), ("Unanswerable.", "unanswerable"), ("dont know", "don't know"),
        ("3.5", "3.5"), ("1,000", "1000"), ("black-and-white", "black and white"), ("black - white", "black white"),
        ("what's up?", "what's up"), ("none", "0"), ("ten", "10"), ("youre right", "you're right"), ("", ""),
    ],
)
def test_normalize_vqa_answer(text, normal):
    assert normalize_vqa_answer(text) == normal


def test_vqa_accuracy_matches_hand_computed_values():
    blue_red = ["red"] * 2 + ["blue"] * 8
    # 8 subsets of 9 keep both "red" (2/3), 2 keep one (1/3): (8·2/3 + 2·1/3) / 10 = 0.6
    assert vqa_accuracy("Red", blue_red) == pytest.approx(0.6)
    assert vqa_accuracy("blue", blue_red) == pytest.approx(1.0)
    assert vqa_accuracy("green", blue_red) == 0.0
    three = ["cat"] * 3 + [f"other{i}" for i in range(7)]
    assert vqa_accuracy("cat", three) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    assert vqa_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("Unanswerable", ["unanswerable"] * 10) == 1.0  # normalised even when all agree
    assert vqa_accuracy("the two cats", ["2 cats"] * 3 + ["cats"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("x", ["x"]) == 1.0 and vqa_accuracy("y", ["x"]) == 0.0  # one reference: exact match
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_accuracy("x", [])


def test_score_prediction_per_task():
    easy = Record(id="0", task="easy-vqa", question="q", answer="circle", answers=["circle"])
    assert score_prediction("easy-vqa", "Circle", easy) == ("circle", 1.0)
    assert score_prediction("easy-vqa", "A circle.", easy) == ("circle", 1.0)
    assert score_prediction("easy-vqa", "circle shape", easy) == ("circle", 1.0)
    assert score_prediction("easy-vqa", "yes", easy) == ("yes", 0.0)
    assert score_prediction("easy-vqa", "", easy) == ("", 0.0)

    sqa = Record(id="1", task="scienceqa-img", question="q", answer="B", answers=["B"], choices=["x", "y", "z"])
    assert score_prediction("scienceqa-img", "The answer is B.", sqa) == ("B", 1.0)
    assert score_prediction("scienceqa-img", "C", sqa) == ("C", 0.0)
    assert score_prediction("scienceqa-img", "D", sqa) == ("", 0.0)  # only 3 choices
    assert score_prediction("scienceqa-img", "a bird", sqa) == ("", 0.0)
    with pytest.raises(ValueError, match="record 2 .*no choices"):
        score_prediction("scienceqa-img", "A", Record(id="2", task="scienceqa-img", question="q", answer="A"))

    viz = Record(id="3", task="vizwiz", question="q", answer="soup", answers=["soup"] * 2 + ["unanswerable"] * 8)
    assert score_prediction("vizwiz", "Soup.", viz) == ("soup", pytest.approx(0.6))
    assert score_prediction("vizwiz", "Unanswerable", viz) == ("unanswerable", 1.0)

    seed = Record(id="4", task="seedbench-img", question="q", answer="D", answers=["D"], choices=["w", "x", "y", "z"])
    assert score_prediction("seedbench-img", "(D) the bird", seed) == ("D", 1.0)
    assert score_prediction("seedbench-img", "The answer is C.", seed) == ("C", 0.0)
    with pytest.raises(ValueError, match="record 5 of task seedbench-img has no choices"):
        score_prediction("seedbench-img", "A", Record(id="5", task="seedbench-img", question="q", answer="A"))

    with pytest.raises(ValueError, match="no scorer for task 'mmlu'.*easy-vqa, scienceqa-img, seedbench-img, vizwiz"):
        score_prediction("mmlu", "x", easy)


@pytest.mark.parametrize(
    "text, scienceqa, seedbench",
    [
        # lmms-eval's ScienceQA rule: the letter in any case, or an upper-case letter and "."; SEED-Bench's: the first
        # character, case-sensitive
        ("A", 1.0, 1.0), (" A\n", 1.0, 1.0), ("a", 1.0, 0.0), ("A.", 1.0, 1.0), ("A. the cat", 1.0, 1.0),
        ("A cat", 0.0, 1.0), ("Apple", 0.0, 1.0), ("A)", 0.0, 1.0), ("(A)", 0.0, 0.0), ("The answer is A", 0.0, 0.0),
        ("a.", 0.0, 0.0), ("B.", 0.0, 0.0), ("B", 0.0, 0.0), ("", 0.0, 0.0),
    ],
)
def test_strict_scores_are_lmms_evals_rules(text, scienceqa, seedbench):
    assert strict_choice_score("scienceqa-img", text, "A") == scienceqa
    assert strict_choice_score("seedbench-img", text, "A") == seedbench


def test_strict_accuracy_of_saved_predictions():
    predictions = [{"generated": "A", "gold": "A"}, {"generated": "(B)", "gold": "B"}, {"generated": "C.", "gold": "C"}]
    assert strict_accuracy("scienceqa-img", predictions) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no lmms-eval rule for task 'vizwiz'"):
        strict_accuracy("vizwiz", predictions)
    with pytest.raises(ValueError, match="no predictions"):
        strict_accuracy("scienceqa-img", [])
