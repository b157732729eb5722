"""The simulator's deterministic answer: the same tokens, in the same order, for every request.

A response of ``n`` tokens streams exactly ``expected_tokens(n)``, and ``expected_tokens(n)`` is
the first ``n`` tokens of one fixed sequence, so a test can rebuild what it should have seen from
the token count alone: ``"".join(expected_tokens(n))``.

The sequence is made to expose relay bugs:

- the opening 50 tokens (the default response length) hold every awkward case a framing layer
  can break: sub-word pieces (tokens without a trailing space, for word coalescing), a newline,
  a blank line (``"\\n\\n"``), ``"\\r\\n"``, a line starting with ``data:`` and one starting with
  ``:`` (an SSE field and an SSE comment if written raw), non-Latin scripts and an emoji;
- after that, words from a syllable vocabulary, most split into sub-word pieces, with a line
  break now and then;
- no token is empty and no two neighbours are equal or commute (``a + b != b + a``), so a lost,
  doubled or swapped token always changes the joined text.
"""

from __future__ import annotations

from functools import lru_cache

# Upper bound on tokens per response: a request's max_tokens above it is clamped to it.
MAX_TOKENS = 16384

_OPENING: tuple[str, ...] = (
    "Stream",
    "ing ",
    "word ",
    "by ",
    "word",
    ": ",
    "the ",
    "gate",
    "way ",
    "re",
    "lays ",
    "each ",
    "to",
    "ken ",
    "at ",
    "once",
    ".\n",
    "data:",
    " this ",
    "line ",
    "is ",
    "not ",
    "an ",
    "event",
    "\n",
    ": ",
    "nor ",
    "this ",
    "one ",
    "a ",
    "comment",
    ".\n\n",
    "Grüße, ",
    "日本",
    "語の",
    "テキスト",
    "、",
    "Привет ",
    "мир ",
    "🙂",
    " ",
    "sub",
    "word ",
    "pie",
    "ces",
    "\r\n",
    "Then ",
    "the ",
    "words ",
    "flow: ",
)

# Sixteen syllables: continuation words are bijective base-16 numerals spelled with them.
_SYLLABLES: tuple[str, ...] = (
    "ka",
    "lo",
    "mi",
    "ren",
    "tu",
    "sa",
    "vel",
    "do",
    "pri",
    "ny",
    "zo",
    "fe",
    "ga",
    "hu",
    "jin",
    "qua",
)
_WORDS_PER_LINE = 12


def _word(index: int) -> str:
    """Spell ``index`` as a word of at least two syllables (distinct index, distinct word)."""
    syllables = []
    value = index + len(_SYLLABLES) + 1  # skip the one-syllable words
    while value:
        value, digit = divmod(value - 1, len(_SYLLABLES))
        syllables.append(_SYLLABLES[digit])
    return "".join(reversed(syllables))


def _continuation_pieces(word_index: int) -> list[str]:
    """The tokens for one continuation word: mostly split in two, sometimes whole."""
    word = _word(word_index)
    first_syllable_end = 3 if word[:3] in _SYLLABLES else 2
    pieces = [word[:first_syllable_end], word[first_syllable_end:] + " "]
    if word_index % 5 == 4:  # a whole-word token now and then
        pieces = [word + " "]
    if word_index % _WORDS_PER_LINE == _WORDS_PER_LINE - 1:
        pieces.append("\n")
    return pieces


@lru_cache(maxsize=1)
def _sequence() -> tuple[str, ...]:
    tokens = list(_OPENING)
    word_index = 0
    while len(tokens) < MAX_TOKENS:
        tokens.extend(_continuation_pieces(word_index))
        word_index += 1
    return tuple(tokens[:MAX_TOKENS])


def expected_tokens(n: int) -> list[str]:
    """The first ``n`` tokens (0 <= n <= MAX_TOKENS) of the simulator's fixed answer."""
    if not 0 <= n <= MAX_TOKENS:
        raise ValueError(f"token count {n} outside 0..{MAX_TOKENS}")
    return list(_sequence()[:n])


def expected_text(n: int) -> str:
    """What a response of ``n`` tokens says: ``"".join(expected_tokens(n))``."""
    return "".join(_sequence()[:n])
