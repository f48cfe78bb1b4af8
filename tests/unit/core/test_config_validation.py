"""Delta configs are checked field by field, from the dataclass types, before the model is touched.

Every field of every method's config is tried with values of the wrong type, through the three
ways a config arrives: ``AutoDeltaConfig.from_dict``, a method class's keyword arguments, and the
``delta:`` section of a ``deltadist train`` job. Each must be a :class:`ConfigError` naming the
field, the value, its type and what the field takes -- never a raw ``TypeError``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from deltadist import AutoDeltaConfig, AutoDeltaModel, ConfigError, LoraConfig, LoraModel
from deltadist.cli.main import main
from deltadist.core.config import DeltaConfig, checkable, field_types
from deltadist.core.registry import delta_model_class
from deltadist.training.config import load_config
from tests.snapshot import assert_same_snapshot, snapshot
from tests.tiny import METHODS, build_tiny

PATTERNS = "a list of strings (module name patterns)"
BAD: dict[str, tuple[str, list[Any]]] = {
    # the declared type, as text -> (what the message says the field takes, wrong values)
    "int": ("an integer", [True, False, 2.5, "8", None, [4]]),
    "float": ("a number", [True, "1e-3", None, [0.5], {"a": 1}]),
    "bool": ("a bool (true or false)", [1, 0, "yes", None, 1.0]),
    "bool | None": ("a bool (true or false) or None", [1, "no", [True]]),
    "bool | str": ("a bool (true or false) or a string", [1, None, 1.5, ["gaussian"]]),
    "str": ("a string", [5, None, ["gelu"], True]),
    "str | None": ("a string or None", [5, ["x"], True, 1.5]),
    "list[str] | None": (PATTERNS, [7, 3.5, True, {"query": 1}, b"query", ["query", 3], [None]]),
    "dict[str, int]": ("a mapping of strings to integers",
                       [3, "attention_mask", ["attention_mask"], {"attention_mask": True},
                        {"attention_mask": "1"}, {"attention_mask": 1.5}, {1: 1}]),
}
"""Wrong values for each field type a shipped config declares (a new type needs a row here)."""
SAYS = {"delta_name": "a non-empty string without surrounding spaces, or None",
        **dict.fromkeys(("modified_modules", "exclude_modules", "unfrozen_modules"),
                        f"{PATTERNS}, one pattern string, or None")}
"""Fields whose message says more than their type."""
SAYS_FOR = {("parallel_adapter", "modified_modules"):
            "a list of module name patterns and [start, end] pairs of them, one pattern string, or None"}
"""Fields of one method whose message says more again."""


def _type_text(tp: Any) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp)


def _config_class(method: str) -> type[DeltaConfig]:
    return AutoDeltaConfig.from_dict(METHODS[method]).__class__


def _cases(first_only: bool) -> list[Any]:
    cases = []
    for method in METHODS:
        for name, tp in field_types(_config_class(method)).items():
            expected, values = BAD[_type_text(tp)]
            for value in values[:1] if first_only else values:
                cases.append(pytest.param(method, name, value, expected, id=f"{method}-{name}-{value!r}"))
    return cases


def _assert_names_it(err: pytest.ExceptionInfo[ConfigError], method: str, name: str, value: Any,
                     expected: str) -> None:
    message = str(err.value)
    says = SAYS_FOR.get((method, name), SAYS.get(name, expected))
    assert f"{name} must be {says}, got " in message, message
    assert f"{value!r} ({type(value).__name__})" in message, message
    assert not isinstance(err.value.__cause__, TypeError)


def test_every_field_of_every_method_has_a_checked_type() -> None:
    for method in METHODS:
        for name, tp in field_types(_config_class(method)).items():
            assert checkable(tp), f"{method}.{name}: {tp} is not a type the checks know"
            assert _type_text(tp) in BAD, f"{method}.{name}: add wrong values for {tp} to BAD"


@pytest.mark.parametrize(("method", "name", "value", "expected"), _cases(first_only=False))
def test_wrong_types_are_refused_by_from_dict(method: str, name: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        AutoDeltaConfig.from_dict({**METHODS[method], name: value})
    _assert_names_it(err, method, name, value, expected)


@pytest.mark.parametrize(("method", "name", "value", "expected"), _cases(first_only=True))
def test_wrong_types_are_refused_before_the_model_is_touched(method: str, name: str, value: Any,
                                                             expected: str) -> None:
    model = build_tiny("bert", "cls")
    before = snapshot(model)
    settings = {k: v for k, v in METHODS[method].items() if k != "delta_type"}
    with pytest.raises(ConfigError) as err:
        delta_model_class(METHODS[method]["delta_type"])(model, **{**settings, name: value})
    _assert_names_it(err, method, name, value, expected)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize(("method", "name", "value", "expected"), _cases(first_only=True))
def test_wrong_types_in_a_train_jobs_delta_section_are_refused(tmp_path: Path, method: str, name: str,
                                                               value: Any, expected: str) -> None:
    if isinstance(value, bytes):
        pytest.skip("YAML has no bytes")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"delta": {**METHODS[method], name: value}}))
    with pytest.raises(ConfigError, match=f"^delta: {name} must be ") as err:
        load_config(path)
    _assert_names_it(err, method, name, value, expected)


@pytest.mark.parametrize(("config", "message"), [
    ({"delta_type": "lora", "modified_modules": 7},
     "modified_modules must be a list of strings (module name patterns), one pattern string, or None, "
     "got 7 (int)."),
    ({"delta_type": "lora", "unfrozen_modules": 5}, "unfrozen_modules must be a list of strings"),
    ({"delta_type": "adapter", "exclude_modules": 3.5}, "exclude_modules must be a list of strings"),
    ({"delta_type": ["lora"]}, "delta_type must be a string naming the method (e.g. 'lora'), got ['lora'] (list)."),
    ({"delta_type": {"lora": 1}}, "delta_type must be a string"),
    ({"delta_type": "lora", "lora_r": True}, "lora_r must be an integer, got True (bool)."),
    ({"delta_type": "lora", "modified_modules": ["query", 3]}, "got ['query', 3] (list): an item is 3 (int)."),
])
def test_the_issues_examples_name_field_value_and_expectation(config: dict, message: str) -> None:
    """These raised ``TypeError: 'int' object is not iterable`` / ``unhashable type: 'list'``."""
    with pytest.raises(ConfigError) as err:
        AutoDeltaConfig.from_dict(config)
    assert message in str(err.value)


@pytest.mark.parametrize("config", [7, ["lora"], "lora", None])
def test_a_config_that_is_not_a_mapping_is_refused(config: Any) -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        AutoDeltaConfig.from_dict(config)
    with pytest.raises(ConfigError, match="must be a mapping"):
        LoraConfig.from_dict(config)


def test_the_cli_reports_a_bad_delta_value_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--set", "delta.modified_modules=7"]) == 2
    err = capsys.readouterr().err
    assert err == ("deltadist train: error: delta: modified_modules must be a list of strings (module name "
                   "patterns), one pattern string, or None, got 7 (int).\n")


def test_a_config_object_changed_after_it_was_made_is_checked_again() -> None:
    model = build_tiny("bert", "cls")
    before = snapshot(model)
    config = LoraConfig(lora_r=2)
    config.lora_r = "2"
    for attach in (lambda: AutoDeltaModel.from_config(config, model), lambda: LoraModel(model, config=config),
                   lambda: LoraModel.from_config(config, model)):
        with pytest.raises(ConfigError, match=r"lora_r must be an integer, got '2' \(str\)"):
            attach()
    assert_same_snapshot(before, snapshot(model))
    with pytest.raises(ConfigError, match="config must be a DeltaConfig or a dict, got 7"):
        AutoDeltaModel.from_config(7, model)


@pytest.mark.parametrize(("given", "stored"), [
    ({"modified_modules": "query"}, {"modified_modules": ["query"]}),  # one pattern: a one-item list
    ({"modified_modules": ("query", "value")}, {"modified_modules": ["query", "value"]}),
    ({"exclude_modules": "classifier"}, {"exclude_modules": ["classifier"]}),
    ({"lora_alpha": 2}, {"lora_alpha": 2}),  # an int is a number
    ({"lora_dropout": 0}, {"lora_dropout": 0}),
    ({"delta_name": None, "backbone_hash": None}, {"delta_name": None}),
])
def test_valid_values_are_taken_as_before(given: dict, stored: dict) -> None:
    config = AutoDeltaConfig.from_dict({"delta_type": "lora", **given})
    assert {k: getattr(config, k) for k in stored} == stored
    assert AutoDeltaConfig.from_dict(config.to_dict()) == config


def test_other_field_types_of_the_methods_accept_their_values() -> None:
    compacter = AutoDeltaConfig.from_dict({"delta_type": "compacter", "kronecker_prod": None, "learn_phm": False})
    assert compacter.kronecker_prod is None and compacter.learn_phm is False
    soft = AutoDeltaConfig.from_dict({"delta_type": "soft_prompt", "other_expand_ids": {"token_type_ids": 1}})
    assert soft.other_expand_ids == {"token_type_ids": 1}
    spans = AutoDeltaConfig.from_dict({"delta_type": "parallel_adapter", "modified_modules": [["a", "b"], "c"]})
    assert spans.modified_modules == [["a", "b"], "c"]
    for method, config in METHODS.items():
        made = AutoDeltaConfig.from_dict(config)
        assert dataclasses.asdict(made) == dataclasses.asdict(AutoDeltaConfig.from_dict(made.to_dict())), method
