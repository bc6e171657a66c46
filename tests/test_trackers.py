"""run.report_to: every tracker accelerate supports, each checked before the run starts."""

from __future__ import annotations

import importlib.util

import pytest

from finetune.errors import RecipeError
from finetune.recipe.checks import check_recipe
from finetune.recipe.schema import TRACKERS, recipe_from_dict
from tests.conftest import tiny_pretrain_recipe


def test_our_tracker_names_are_accelerates():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    assert set(TRACKERS) == set(LOGGER_TYPE_TO_CLASS)


@pytest.mark.parametrize("tracker", sorted(TRACKERS))
def test_each_tracker_is_accepted_when_installed_and_named_when_not(in_tmp, tracker):
    recipe = recipe_from_dict(tiny_pretrain_recipe(in_tmp, report_to=[tracker]))
    if importlib.util.find_spec(TRACKERS[tracker]) is not None:
        check_recipe(recipe)
    else:
        with pytest.raises(RecipeError, match=rf"^run\.report_to: {tracker} is not installed \(pip install "):
            check_recipe(recipe)


def test_an_unknown_tracker_lists_the_known_ones(in_tmp):
    with pytest.raises(RecipeError, match=r"run\.report_to\.0: Input should be 'tensorboard', 'wandb', 'mlflow'"):
        recipe_from_dict(tiny_pretrain_recipe(in_tmp, report_to=["neptune"]))


def test_tensorboard_receives_the_metrics(in_tmp):
    from finetune.run.launch import run_recipe

    run_recipe(recipe_from_dict(tiny_pretrain_recipe(in_tmp, max_steps=2, report_to=["tensorboard"])))
    events = list((in_tmp / "out" / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
