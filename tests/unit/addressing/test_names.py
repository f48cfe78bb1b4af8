"""Pattern semantics: dot-boundary suffixes, anchored regexes, wrapper segments."""

import pytest
from torch import nn

from deltadist.addressing.names import Pattern, canonical_modules, canonical_name, parse_patterns
from deltadist.errors import AddressingError


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("attention.out_lin", "distilbert.transformer.layer.0.attention.out_lin", True),
        ("0.attention.out_lin", "distilbert.transformer.layer.0.attention.out_lin", True),
        ("0.attention.out_lin", "distilbert.transformer.layer.10.attention.out_lin", False),
        ("q", "block.0.attn.q", True),
        ("q", "block.0.attn.seq", False),  # dot boundary, not substring
        ("output.dense", "roberta.encoder.layer.0.attention.output.dense", True),
        ("[r](\\d)+\\.output.dense", "roberta.encoder.layer.3.output.dense", True),
        ("[r](\\d)+\\.output.dense", "roberta.encoder.layer.3.attention.output.dense", False),
        ("[r][0-5]\\.attention", "roberta.encoder.layer.5.attention", True),
        # OpenDelta's unanchored search selected layer 10 here; dot-anchored suffixes do not.
        ("[r][0-5]\\.attention", "roberta.encoder.layer.10.attention", False),
        ("[r]decoder.*((20)|(21)).*DenseReluDense\\.wi", "decoder.block.21.layer.2.DenseReluDense.wi", True),
        ("[r]decoder.*((20)|(21)).*DenseReluDense\\.wi", "decoder.block.2.layer.2.DenseReluDense.wi", False),
    ],
)
def test_pattern_matches(pattern: str, name: str, expected: bool) -> None:
    assert Pattern(pattern).matches(name) is expected


def test_matches_within_selects_subtree() -> None:
    pattern = Pattern("attention")
    assert pattern.matches_within("layer.0.attention.self.query")
    assert not pattern.matches_within("layer.0.intermediate.dense")


def test_lone_string_is_one_pattern() -> None:
    assert [p.text for p in parse_patterns("query")] == ["query"]


@pytest.mark.parametrize(
    "raw",
    [
        "_orig_mod.encoder.layer.0.query",
        "_fsdp_wrapped_module.encoder.layer.0._fsdp_wrapped_module.query",
        "encoder.layer.0._checkpoint_wrapped_module.query",
    ],
)
def test_canonical_name_drops_wrapper_segments(raw: str) -> None:
    assert canonical_name(raw) == "encoder.layer.0.query"


class _Wrapper(nn.Module):
    """A DDP-like wrapper: one child called ``module``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


def test_single_child_wrapper_prefix_is_dropped() -> None:
    inner = nn.Sequential(nn.Linear(2, 2))
    assert set(canonical_modules(_Wrapper(inner))) == set(canonical_modules(inner))


def test_module_named_module_inside_a_model_is_kept() -> None:
    model = nn.Module()
    model.module = nn.Linear(2, 2)
    model.other = nn.Linear(2, 2)
    assert "module" in canonical_modules(model)


def test_an_invalid_regex_fails_when_parsed_naming_the_pattern_and_the_fix() -> None:
    with pytest.raises(AddressingError, match=r"'\[r\]layer\.\(\['.*unterminated character set.*escape"):
        parse_patterns(["query", "[r]layer.(["])
    assert Pattern("layer.([").regex is None  # without [r] the same text is a plain name
