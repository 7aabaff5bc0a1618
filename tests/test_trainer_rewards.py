"""grpo_trainer rewards: built-ins, lookup, TRL's None convention, and errors that name the function and sample."""
import math

import pytest
import torch

from grpo_trainer.config import ConfigError
from grpo_trainer.rewards import (REGISTRY, RewardFunctionError, RewardSet, arithmetic_reward, call_reward,
                                  format_reward, last_boxed, math_reward, resolve)


def test_arithmetic_exact_match():
    got = arithmetic_reward(prompts=["1+2="] * 5, completions=["3", " 3 ", "03", "3.0", "4"], answer=["3"] * 5)
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_math_reward_boxed_with_math_verify():
    comps = ["so the answer is \\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{3}", "one half", "\\boxed{x^2+1}"]
    got = math_reward(prompts=[""] * 5, completions=comps, answer=["\\frac{1}{2}", "1/2", "1/2", "1/2", "1+x^2"])
    assert got == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert math_reward(prompts=[""], completions=["\\boxed{1}"], answer=["\\boxed{1}"]) == [1.0]


def test_last_boxed_and_format():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{unclosed") is None
    assert format_reward(prompts=[""] * 4, completions=["42", "-7", "x \\boxed{3}", "42 apples"]) == [1, 1, 1, 0]


def test_lookup_by_name_and_dotted_path():
    assert resolve("arithmetic") is arithmetic_reward
    assert resolve("grpo_trainer.rewards:format_reward") is format_reward
    assert resolve("grpo_trainer.rewards.math_reward") is math_reward
    with pytest.raises(ConfigError, match="must be one of"):
        resolve("nope")


def test_none_rewards_are_skipped_like_trl(monkeypatch):
    monkeypatch.setitem(REGISTRY, "half", lambda prompts, completions, **kw: [None, 1.0, None, 0.0])
    monkeypatch.setitem(REGISTRY, "none", lambda prompts, completions, **kw: [None] * 4)
    rs = RewardSet(["arithmetic", "half", "none"], [1.0, 2.0, 5.0])
    rows = [{"prompt": "1+1=", "answer": "2"}] * 4
    total, table = rs(["1+1="] * 4, ["2", "2", "3", "3"], rows)
    assert torch.equal(total, torch.tensor([1.0, 3.0, 0.0, 0.0]))  # NaN-aware weighted sum
    assert math.isnan(table[0, 1]) and torch.isnan(table[:, 2]).all()
    assert torch.nanmean(table[:, 1]).item() == 0.5


def boom_on_seven(prompts, completions, answer, **kwargs):
    return [1.0 / (int(c) - 7) for c in completions]


def test_raising_reward_names_function_and_sample():
    with pytest.raises(RewardFunctionError, match=r"reward function 'boom' raised ZeroDivisionError: .* on sample 2 "
                                                  r"\(prompt='3\+4=', completion='7'\)"):
        call_reward("boom", boom_on_seven, ["1+1=", "1+2=", "3+4="], ["2", "3", "7"], {"answer": ["2", "3", "7"]})


@pytest.mark.parametrize("values, message", [
    ([1.0], r"reward function 'bad' must return one value per completion \(2\); got 1"),
    ([1.0, "high"], r"reward function 'bad' returned 'high' \(must be a float or None\) on sample 1"),
    ([float("nan"), 1.0], r"reward function 'bad' returned non-finite nan on sample 0.*return None to skip"),
])
def test_invalid_reward_values_name_function_and_sample(values, message):
    with pytest.raises(RewardFunctionError, match=message):
        call_reward("bad", lambda prompts, completions, **kw: values, ["a", "b"], ["x", "y"], {})
