import pytest

from megatron_rl.rewards import get_reward, normalize_answer, qa_exact_match
from megatron_rl.rewards.format import format_score
from megatron_rl.rewards.gsm8k import extract_solution, gsm8k_score
from megatron_rl.rewards.math_boxed import boxed_score, last_boxed


# --- gsm8k ---------------------------------------------------------------
def test_gsm8k_strict_correct_answer_scores_one():
    assert gsm8k_score("3 + 4 = 7\n#### 7", "7") == 1.0


def test_gsm8k_strict_uses_last_marker_and_strips_commas():
    assert gsm8k_score("#### 5 then #### 1,000", "1000") == 1.0


def test_gsm8k_wrong_answer_scores_format_score():
    assert gsm8k_score("#### 8", "7") == 0.0
    assert gsm8k_score("#### 8", "7", format_score=0.1) == 0.1


def test_gsm8k_strict_without_marker_scores_zero_but_flexible_finds_last_number():
    assert gsm8k_score("the answer is 7", "7") == 0.0
    assert gsm8k_score("the answer is 7.", "7", method="flexible") == 0.0   # "7." != "7", as in verl
    assert gsm8k_score("it is 3 then 7", "7", method="flexible") == 1.0


def test_gsm8k_ground_truth_may_be_int_or_full_solution():
    assert gsm8k_score("#### 72", 72) == 1.0
    assert gsm8k_score("#### 72", "48 + 24 = 72\n#### 72") == 1.0


def test_gsm8k_only_reads_last_300_characters():
    assert extract_solution("#### 7" + " x" * 200) is None


def test_quickstart_reward_gives_partial_credit_for_format():
    r = get_reward("quickstart")
    assert r("#### 7", {"ground_truth": "7"}) == 1.0
    assert r("#### 6", {"ground_truth": "7"}) == 0.2
    assert r("#### 7.", {"ground_truth": "7"}) == 1.0
    assert r("7", {"ground_truth": "7"}) == 0.0


# --- boxed math ----------------------------------------------------------
def test_last_boxed_handles_nested_braces():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{a^{2}}{b}} end") == r"\frac{a^{2}}{b}"


def test_last_boxed_missing_or_unbalanced_is_none():
    assert last_boxed("no box here") is None
    assert last_boxed(r"\boxed{\frac{1}{2}") is None


def test_boxed_normalises_spaces_dfrac_text_and_trailing_dot():
    assert boxed_score(r"so \boxed{\dfrac{1}{ 2 }.}", r"\frac{1}{2}") == 1.0
    assert boxed_score(r"\boxed{5\text{ cm}}", "5cm") == 1.0
    assert boxed_score(r"\boxed{90^\circ}", "90") == 1.0


def test_boxed_compares_numbers_numerically():
    assert boxed_score(r"\boxed{0.50}", "0.5") == 1.0
    assert boxed_score(r"\boxed{1,000}", "1000") == 1.0
    assert boxed_score(r"\boxed{3}", "4") == 0.0


def test_boxed_ground_truth_may_itself_be_boxed():
    assert boxed_score(r"\boxed{x+1}", r"\boxed{x + 1}") == 1.0


def test_boxed_without_box_scores_zero():
    assert boxed_score("the answer is 3", "3") == 0.0


# --- QA exact match ------------------------------------------------------
def test_normalize_answer_is_squad_style():
    assert normalize_answer("  The  Eiffel-Tower!  ") == "eiffeltower"
    assert normalize_answer("An apple, a pear") == "apple pear"


def test_qa_exact_match_uses_last_answer_tag():
    r = "<think>x</think><answer>Paris</answer> wait <answer>The Paris.</answer>"
    assert qa_exact_match(r, "paris") == 1.0
    assert qa_exact_match("<answer>London</answer>", "Paris") == 0.0


def test_qa_exact_match_accepts_any_of_several_ground_truths():
    assert qa_exact_match("<answer>NYC</answer>", ["New York City", "nyc"]) == 1.0
    assert qa_exact_match("<answer>NYC</answer>", {"target": ["nyc"]}) == 1.0


def test_qa_exact_match_without_tag_scores_zero():
    assert qa_exact_match("Paris", "Paris") == 0.0


# --- format --------------------------------------------------------------
PATTERN = r"^<think>.*</think>\s*<answer>.*</answer>$"


def test_format_reward_matches_multiline_response():
    assert format_score("<think>a\nb</think>\n<answer>3</answer>\n", PATTERN) == 1.0


def test_format_reward_rejects_missing_parts_and_trailing_text():
    assert format_score("<answer>3</answer>", PATTERN) == 0.0
    assert format_score("<think>a</think><answer>3</answer> extra", PATTERN) == 0.0


def test_unknown_reward_name_suggests_closest():
    with pytest.raises(ValueError, match="did you mean 'gsm8k'"):
        get_reward("gsm8kk")
