"""The simulator's deterministic text: what it holds, and that relay bugs always change it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from streamgate.simulator.script import MAX_TOKENS, expected_text, expected_tokens

DEFAULT_TOKENS = 50


def test_expected_text_is_the_join_of_expected_tokens():
    assert expected_text(DEFAULT_TOKENS) == "".join(expected_tokens(DEFAULT_TOKENS))


@pytest.mark.parametrize("n", [0, 1, 7, 50, 51, 1000, MAX_TOKENS])
def test_a_response_of_n_tokens_is_the_first_n_of_one_sequence(n):
    tokens = expected_tokens(n)
    assert len(tokens) == n
    assert tokens == expected_tokens(MAX_TOKENS)[:n]


@pytest.mark.parametrize("n", [-1, MAX_TOKENS + 1])
def test_token_counts_outside_the_bound_are_refused(n):
    with pytest.raises(ValueError):
        expected_tokens(n)


@pytest.mark.parametrize(
    ("what", "found"),
    [
        ("a sub-word piece", lambda tokens: any(t[-1].isalpha() for t in tokens)),
        ("a line break", lambda tokens: "\n" in "".join(tokens)),
        ("a blank line", lambda tokens: "\n\n" in "".join(tokens)),
        ("a CRLF", lambda tokens: "\r\n" in "".join(tokens)),
        ("a line starting with data:", lambda tokens: "\ndata:" in "".join(tokens)),
        ("a line starting with a colon", lambda tokens: "\n:" in "".join(tokens)),
        (
            "non-Latin script",
            lambda tokens: any("\u3040" <= c <= "\u9fff" for c in "".join(tokens)),
        ),
        (
            "Cyrillic",
            lambda tokens: any("\u0400" <= c <= "\u04ff" for c in "".join(tokens)),
        ),
        ("an emoji", lambda tokens: any(ord(c) >= 0x1F300 for c in "".join(tokens))),
    ],
)
def test_the_default_answer_holds_every_awkward_case(what, found):
    assert found(expected_tokens(DEFAULT_TOKENS)), what


def test_the_continuation_keeps_sub_words_and_line_breaks():
    tail = expected_tokens(2000)[DEFAULT_TOKENS:]
    assert sum(1 for t in tail if not t.endswith((" ", "\n"))) > 100
    assert tail.count("\n") > 10


def test_no_token_is_empty_and_no_neighbours_commute():
    tokens = expected_tokens(MAX_TOKENS)
    assert all(tokens)
    commuting = [
        i for i in range(len(tokens) - 1) if tokens[i] + tokens[i + 1] == tokens[i + 1] + tokens[i]
    ]
    assert commuting == []


def test_the_vocabulary_is_large():
    assert len(set(expected_tokens(MAX_TOKENS))) > 1000


@given(n=st.integers(2, 400), data=st.data())
def test_a_lost_doubled_or_swapped_token_changes_the_text(n, data):
    tokens = expected_tokens(n)
    i = data.draw(st.integers(0, n - 2))
    lost = tokens[:i] + tokens[i + 1 :]
    doubled = tokens[: i + 1] + tokens[i:]
    swapped = [*tokens[:i], tokens[i + 1], tokens[i], *tokens[i + 2 :]]
    expected = expected_text(n)
    assert "".join(lost) != expected
    assert "".join(doubled) != expected
    assert "".join(swapped) != expected
