"""The generated ``builtin:topics`` data set: deterministic, disjoint splits, balanced labels."""

import re
from collections import Counter

import pytest

from deltadist.errors import ConfigError
from deltadist.training.data import LABELS, TEMPLATES, TOPICS, load_topics

PHRASES = {p for words in TOPICS.values() for p in words}


def test_generation_is_deterministic() -> None:
    assert load_topics(200, 80, seed=0) == load_topics(200, 80, seed=0)
    assert load_topics(200, 80, seed=0) != load_topics(200, 80, seed=1)


def _parse(text: str) -> tuple[str, tuple[str, ...]]:
    """The template and the topic phrases a sentence was made from."""
    for template in TEMPLATES:
        pattern = re.escape(template).replace(r"\{a\}", "(.+)").replace(r"\{b\}", "(.+)")
        match = re.fullmatch(pattern, text)
        if match and all(p in PHRASES for p in match.groups()):
            return template, match.groups()
    raise AssertionError(f"not generated from a template: {text!r}")


def test_train_and_test_share_no_sentence_template_or_phrase() -> None:
    train, test = load_topics(1000, 300)
    assert not {e.text for e in train} & {e.text for e in test}
    train_parts = [_parse(e.text) for e in train]
    test_parts = [_parse(e.text) for e in test]
    assert not {t for t, _ in train_parts} & {t for t, _ in test_parts}
    assert not {p for _, ps in train_parts for p in ps} & {p for _, ps in test_parts for p in ps}


def test_phrases_belong_to_the_label_topic() -> None:
    train, test = load_topics(200, 80)
    for example in train + test:
        _, phrases = _parse(example.text)
        assert all(p in TOPICS[LABELS[example.label]] for p in phrases)


@pytest.mark.parametrize(("train_size", "test_size"), [(1000, 300), (101, 7)])
def test_labels_are_balanced_and_sentences_distinct(train_size: int, test_size: int) -> None:
    train, test = load_topics(train_size, test_size)
    assert (len(train), len(test)) == (train_size, test_size)
    for split in (train, test):
        counts = Counter(e.label for e in split)
        assert set(counts) == set(range(len(LABELS)))
        assert max(counts.values()) - min(counts.values()) <= 1
        assert len({e.text for e in split}) == len(split)


def test_too_many_examples_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="Lower data.train_size"):
        load_topics(10**6, 10)
