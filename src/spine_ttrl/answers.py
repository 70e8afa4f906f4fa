"""Answers: extraction from completions, equivalence (math-verify), and the majority vote.

The pseudo-label of test-time RL comes from here, so each step is a small pure function with its
rule in the docstring:

    extract_answer(text)        completion -> answer string (or None: no vote)
    is_equivalent(a, b)         do two answers mean the same thing?  (1/2 ≡ \\frac12 ≡ 0.5)
    cluster_answers(answers)    greedy equivalence clusters, in order of first appearance
    majority_vote(answers)      -> Vote(label, count, ratio)

Differences from TTRL's voting, on purpose:

- TTRL counted exact strings, so ``1/2`` and ``\\frac12`` split the vote; here answers are
  clustered by equivalence before counting.
- An unparsed completion (``None``) never votes, so an empty extraction cannot win the vote
  and then pay every empty answer; it still counts in the denominator of the majority ratio.
- TTRL's letter extraction took the last standalone A–D in the upper-cased text, so the
  article "a" voted A; here only upper-case letters stated as an answer count.
- TTRL ran sympy with no time limit. ``is_equivalent`` has a hard wall-clock limit that also
  works off the main thread (see :data:`EQUIVALENCE_TIMEOUT`).

Symbolic comparison (math-verify) runs in one persistent worker process, which lives in
:mod:`spine_ttrl.verify_worker` together with the math-verify call itself (started lazily,
killed and restarted on timeout; its :func:`shutdown_worker` is re-exported here). It is only
reached after two cheap fast paths (exact normalised match, plain numbers) and an LRU cache, so
most comparisons in a vote never leave the calling process. What stays here is the policy:
which function the worker runs (``_SYMBOLIC_TARGET``), the fallback to an in-process comparison
when no worker can start, and the cache.
"""

from __future__ import annotations

import math
import re
import threading
import warnings
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Callable, NamedTuple

from . import verify_worker
from .verify_worker import _verify_pair, shutdown_worker  # shutdown_worker: re-exported (public API)

__all__ = [
    "TASKS",
    "DEFAULT_LABELS",
    "EQUIVALENCE_TIMEOUT",
    "Vote",
    "extract_answer",
    "is_equivalent",
    "cluster_answers",
    "winning_cluster",
    "majority_vote",
    "shutdown_worker",
]

TASKS = ("math", "choice", "label")
"""Answer formats understood here: free-form math, multiple choice with options A–J, and short
label answers such as PubMedQA's yes / no / maybe (see :data:`DEFAULT_LABELS`)."""

DEFAULT_LABELS = ("yes", "no", "maybe")
"""The labels of ``task="label"`` when none are given (PubMedQA's three answers)."""

EQUIVALENCE_TIMEOUT: float | None = 2.0
"""Default hard time limit, in seconds, of one symbolic :func:`is_equivalent` call.

On timeout the answers count as different (False). ``None`` (or ``<= 0``) disables the limit
and runs math-verify in the calling process without any alarm: only for environments that
cannot start a subprocess, since a pathological pair such as ``2^{2^{2^{100}}}`` vs ``3`` then
never returns.
"""

_CHOICE_LETTERS = "ABCDEFGHIJ"


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


# =====================================================================================
# Extraction
# =====================================================================================

_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# `\boxed 5` (TeX's one-token argument without braces): take the token up to space or `$`.
_BOXED_BARE_ARG = re.compile(r"[ \t]+([^\s${}]+)")
_ANSWER_IS = re.compile(r"\banswer\s+is\b\s*:?", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
# A number not glued to a previous digit or decimal point. The sign is taken only when it
# cannot be a binary minus ("n-1" gives "1", "x = -1" gives "-1"). Thousands groups must be
# exactly three digits, so the list "1,2,3" stays three numbers while "1,234" is one.
_NUMBER = re.compile(
    r"(?:(?<![\w.)}\]])[-−])?"
    r"(?<![\d.])"
    r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+|(?=\.\d))"
    r"(?:\.\d+)?"
    r"(?:/\d+)?"
)


def _matching_braces(text: str) -> dict[int, int]:
    """Map the index of each balanced ``{`` to its ``}`` (escaped ``\\{``/``\\}`` skipped).

    One linear pass, so a completion full of unclosed ``\\boxed{`` stays cheap.
    """
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # `\{` and `\}` are literal braces, not groups
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def _boxed_contents(text: str) -> list[str]:
    """Contents of every complete ``\\boxed{...}`` / ``\\fbox{...}`` (and ``\\boxed x``), in order.

    Ordered by the position of the command, so for ``\\boxed{\\boxed{5}}`` the inner box comes
    last. Unbalanced boxes (a truncated generation) and empty boxes are left out.
    """
    if "\\boxed" not in text and "\\fbox" not in text:
        return []
    braces = _matching_braces(text)
    out = []
    for m in _BOXED.finditer(text):
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            close = braces.get(j)
            content = text[j + 1 : close].strip() if close is not None else ""
        else:
            bare = _BOXED_BARE_ARG.match(text, m.end())
            content = bare.group(1).strip() if bare else ""
        if content:
            out.append(content)
    return out


def _strip_math_delimiters(s: str) -> str:
    """Remove surrounding ``$``/``$$``/``\\(..\\)``/``\\[..\\]`` pairs and whitespace."""
    s = s.strip()
    changed = True
    while changed and s:
        changed = False
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
                changed = True
                break
    return s


def _after_answer_is(text: str) -> str | None:
    """The expression after the last "the answer is", up to the end of its sentence or line.

    A math-delimited expression (``$...$``, ``\\(...\\)``) is taken whole, so the period of
    ``$3.5$.`` or a decimal point never cuts it. Trailing ``.``, ``$`` and markdown ``*`` are
    stripped. Empty -> None.
    """
    last = None
    for last in _ANSWER_IS.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end() :].lstrip().lstrip("*").lstrip()
    expr = None
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if rest.startswith(left):
            close = rest.find(right, len(left))
            if close != -1:
                expr = rest[len(left) : close]
            break
    if expr is None:
        expr = rest.split("\n", 1)[0]
        end = _SENTENCE_END.search(expr)
        if end:
            expr = expr[: end.start()]
    expr = expr.strip().strip("*").strip().rstrip(".$").strip()
    return expr or None


def _last_number(text: str) -> str | None:
    """The last number in the text: ``-3``, ``2.5``, ``.5``, ``3/4``; ``1,234`` -> ``1234``."""
    last = None
    for last in _NUMBER.finditer(text):
        pass
    if last is None or not last.group(0):
        return None
    return last.group(0).replace(",", "").replace("−", "-")


# --- multiple choice --------------------------------------------------------------------

_LATEX_WRAPPER = re.compile(r"^\\(?:text|textbf|mathrm|mathbf|mathit|textit)\s*\{(.*)\}$", re.DOTALL)
_BOXED_LETTER = re.compile(r"^[(\[]?([A-Ja-j])[)\]]?(?:$|[\s.:)])")
# "the answer is (B)", "Answer: D", "**Answer:** C", "the correct option is C".
# The letter must be upper case, or lower case inside brackets: "the answer is a prime" is prose.
_CHOICE_ANCHOR = re.compile(
    r"(?:\b(?i:answer)\b|\b(?i:correct|right|best|final)\s+(?i:option|choice)\b)"
    r"(?:\s+(?i:is)\b)?[\s*]*[:：]?[\s*]*"
    r"(?:(?i:option|choice)\s+)?\$?(?:\\(?:text|textbf|mathrm)\{)?"
    r"(?:[(\[]([A-Ja-j])[)\]]|([A-J])(?![\w'’]))"
)
_CHOICE_BOLD = re.compile(r"\*\*[(\[]?([A-J])(?:[)\].:]|\*\*)")
_CHOICE_STANDALONE = re.compile(r"(?<![\w'’\\])([A-J])(?![\w'’])")
# "A" and "I" are English words. Followed by a lower-case word they are prose ("A train
# leaves", "I think"), unless that word is a verb that only fits an option ("A is correct").
_PROSE_AFTER = re.compile(r"\s+([a-z][a-z'’]*)")
_OPTION_VERBS = frozenset({"is", "was", "seems", "appears"})


def _letter_of(content: str) -> str | None:
    """The option letter of a boxed content: ``C``, ``(c)``, ``\\text{C}``, ``C. 42``."""
    s = _strip_math_delimiters(content)
    while True:
        m = _LATEX_WRAPPER.match(s)
        if not m:
            break
        s = m.group(1).strip()
    m = _BOXED_LETTER.match(s)
    return m.group(1).upper() if m else None


def _extract_choice(text: str) -> str | None:
    for content in reversed(_boxed_contents(text)):
        letter = _letter_of(content)
        if letter:
            return letter
    last = None
    for last in _CHOICE_ANCHOR.finditer(text):
        pass
    if last is not None:
        return (last.group(1) or last.group(2)).upper()
    last = None
    for last in _CHOICE_BOLD.finditer(text):
        pass
    if last is not None:
        return last.group(1)
    for m in reversed(list(_CHOICE_STANDALONE.finditer(text))):
        letter = m.group(1)
        bracketed = m.start() > 0 and text[m.start() - 1] in "(["
        if letter in "AI" and not bracketed:
            word = _PROSE_AFTER.match(text, m.end())
            if word and word.group(1) not in _OPTION_VERBS:
                continue
        return letter
    return None


# --- short labels (yes / no / maybe) ----------------------------------------------------

# Whole word: the label is not glued to a letter, digit or underscore on either side ("no" in
# "note" or "know" is not a label). Lookarounds rather than \b, so a label may itself begin or
# end with a non-word character.
_LABEL_WORD = r"(?<![\w])({alts})(?![\w])"
# "the answer is yes", "Answer: **No**", "final answer: $\text{maybe}$", "answer is (yes)".
_LABEL_ANCHOR = (r"\banswer\b(?:\s+is\b)?[\s*_:：\"'“‘(\[$]*"
                 r"(?:\\(?:text|textbf|mathrm)\s*\{{\s*)?" + _LABEL_WORD)


def _label_tuple(labels: Sequence[str]) -> tuple[str, ...]:
    """``labels`` as a tuple of stripped lower-case labels; ValueError if empty or not strings."""
    if isinstance(labels, str) or not labels:
        raise ValueError(f"labels must be a non-empty sequence of strings, got {labels!r}")
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"labels must be non-empty strings, got {label!r}")
    return tuple(dict.fromkeys(label.strip().lower() for label in labels))


@lru_cache(maxsize=64)
def _label_patterns(keys: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """(whole-word pattern, "answer is" pattern) of the canonical labels ``keys``."""
    # Longest first, so "no" never pre-empts "no change" inside the alternation.
    alts = "|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))
    return (re.compile(_LABEL_WORD.format(alts=alts), re.IGNORECASE),
            re.compile(_LABEL_ANCHOR.format(alts=alts), re.IGNORECASE))


def _canonical_label(found: str, keys: tuple[str, ...]) -> str:
    low = found.lower()
    if low in keys:
        return low
    # A case-insensitive regex match whose .lower() differs (rare Unicode case folds).
    return next(k for k in keys if re.fullmatch(re.escape(k), found, re.IGNORECASE))


def _extract_label(text: str, keys: tuple[str, ...]) -> str | None:
    word, anchor = _label_patterns(keys)
    for content in reversed(_boxed_contents(text)):
        found = word.findall(content)
        if found:
            return _canonical_label(found[-1], keys)
    for pattern in (anchor, word):
        found = pattern.findall(text)
        if found:
            return _canonical_label(found[-1], keys)
    return None


def extract_answer(
    text: str | None, task: str = "math", labels: Sequence[str] = DEFAULT_LABELS
) -> str | None:
    """Extract the final answer of one completion; ``None`` when nothing parses (no vote).

    ``task="math"``, first rule that yields a non-empty string wins:

    1. the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (brace-balanced, nesting allowed;
       ``\\boxed 5`` without braces too; unbalanced or empty boxes are skipped);
    2. the expression after the last "answer is" (case-insensitive), up to the end of its
       sentence or line, trailing ``.``/``$`` stripped;
    3. the last number: ``-3``, ``2.5``, ``3/4``; thousands commas removed (``1,234`` -> ``1234``).

    ``task="choice"`` (options A–J), returns the upper-case letter:

    1. a letter in the last box holding one (``\\boxed{C}``, ``\\boxed{(c)}``, ``\\boxed{\\text{C}}``);
    2. the last "answer is X" / "Answer: X" / "correct option is X" (letter upper case, or any
       case in brackets: "(b)");
    3. the last bold letter ``**C**``;
    4. the last standalone upper-case letter, e.g. ``(C)``; a bare "A" or "I" followed by a
       lower-case word is prose ("A train leaves", "I think") and does not vote.

    ``task="label"`` (PubMedQA-style short answers, ``labels`` default yes / no / maybe),
    case-insensitive, whole words only ("no" in "know" or "note" is not a label); returns the
    matching ``labels`` entry stripped and lower-cased:

    1. the last label in the last box holding one (``\\boxed{Yes}``, ``\\boxed{\\text{no}}``);
    2. the label right after the last "answer is" / "Answer:" followed by one
       ("The answer is: **Yes**", "final answer: $\\text{maybe}$");
    3. the last standalone label word anywhere in the text.

    ``labels`` is ignored for the other tasks (math and choice are unchanged by it).

    Returns a stripped, non-empty string or None (empty/whitespace text gives None).
    Raises ValueError for an unknown task, or for empty ``labels`` with ``task="label"``.
    """
    _check_task(task)
    keys = _label_tuple(labels) if task == "label" else ()  # validated even for empty text
    if text is None or not text.strip():
        return None
    if task == "choice":
        return _extract_choice(text)
    if task == "label":
        return _extract_label(text, keys)
    boxes = _boxed_contents(text)
    if boxes:
        return boxes[-1]
    return _after_answer_is(text) or _last_number(text)


# =====================================================================================
# Equivalence
# =====================================================================================

_SPACING = re.compile(r"\\(?:[,;:!]|\s)")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])\.?")
_DISPLAY = re.compile(r"\\displaystyle(?![A-Za-z])")
_FRAC_VARIANT = re.compile(r"\\[dt]frac(?![A-Za-z])")
_SPACE_NOT_BEFORE_LETTER = re.compile(r"\s+(?![A-Za-z])")
# Whitespace before a letter is dropped unless it ends a command: `\pi r` must not become `\pir`.
_SPACE_BEFORE_LETTER = re.compile(r"(\\[A-Za-z]+)?\s+(?=[A-Za-z])")


def _normalise(s: str) -> str:
    """Light, meaning-preserving normalisation used for the exact-match key and for math-verify.

    Strips surrounding math delimiters and whitespace, a trailing period, ``\\left``/``\\right``,
    LaTeX spacing (``\\!``, ``\\,``, ``\\;``, ``\\ ``), ``\\displaystyle``; ``\\dfrac``/``\\tfrac``
    become ``\\frac``; ``−`` becomes ``-``; whitespace is removed except after a command name.
    """
    s = _strip_math_delimiters(s)
    s = s.replace("−", "-")
    s = _SPACING.sub("", s)
    s = _LEFT_RIGHT.sub("", s)
    s = _DISPLAY.sub("", s)
    s = _FRAC_VARIANT.sub(r"\\frac", s)
    s = _SPACE_NOT_BEFORE_LETTER.sub("", s)
    s = _SPACE_BEFORE_LETTER.sub(lambda m: m.group(1) + " " if m.group(1) else "", s)
    s = s.strip()
    while s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    return _strip_math_delimiters(s)


_PLAIN_INT = re.compile(r"[-+]?(?:\d+|\d{1,3}(?:,\d{3})+)")
_PLAIN_DECIMAL = re.compile(r"[-+]?(?:\d+|\d{1,3}(?:,\d{3})+)?\.\d*")
_PLAIN_FRACTION = re.compile(r"([-+]?\d+)/(\d+)")
_LATEX_FRACTION = re.compile(r"([-+]?)\\frac(?:\{(\d+)\}|(\d))(?:\{(\d+)\}|(\d))")


def _as_number(s: str) -> tuple[Fraction, bool] | None:
    """Parse a plain number -> (exact value, is_decimal); None if ``s`` is anything else.

    Accepts ``12``, ``-1,234``, ``0.5``, ``.5``, ``3/4``, ``\\frac{3}{4}``, ``\\frac34``.
    """
    try:
        if _PLAIN_INT.fullmatch(s):
            return Fraction(s.replace(",", "")), False
        if _PLAIN_DECIMAL.fullmatch(s) and any(c.isdigit() for c in s):
            return Fraction(s.replace(",", "")), True
        m = _PLAIN_FRACTION.fullmatch(s)
        if m:
            return Fraction(int(m.group(1)), int(m.group(2))), False
        m = _LATEX_FRACTION.fullmatch(s)
        if m:
            num = int(m.group(2) or m.group(3))
            den = int(m.group(4) or m.group(5))
            value = Fraction(num, den)
            return (-value if m.group(1) == "-" else value), False
    except (ValueError, ZeroDivisionError):  # 1/0, or more digits than int() accepts
        return None
    return None


def _numeric_equal(x: str, y: str) -> bool | None:
    """Compare two plain numbers the way math-verify does; None if either is not one.

    Exact values compare exactly (1/2 == \\frac12); when either is a decimal both are rounded
    to 6 decimal places first, as math-verify's default ``float_rounding=6`` does
    (so 0.333333 == 1/3 and 142.0 == 142).
    """
    a, b = _as_number(x), _as_number(y)
    if a is None or b is None:
        return None
    (va, dec_a), (vb, dec_b) = a, b
    if dec_a or dec_b:
        return round(va, 6) == round(vb, 6)
    return va == vb


# The function the worker runs for a symbolic comparison. It is sent (pickled by reference)
# with each request, so pointing this name at another importable function -- a test's slow
# one -- changes what the worker runs; a monkeypatch of math-verify here never would.
_SYMBOLIC_TARGET: Callable[[str, str], bool] = _verify_pair
_worker_unavailable: str | None = None  # why the worker could not start; then compare inline


def _symbolic_equal(x: str, y: str, timeout: float | None) -> bool:
    """Symbolic comparison of two normalised answers under a hard time limit (False on timeout)."""
    global _worker_unavailable
    if timeout is None or timeout <= 0:
        return bool(_SYMBOLIC_TARGET(x, y))
    if _worker_unavailable is None:
        try:
            status, result = verify_worker._call_in_worker(_SYMBOLIC_TARGET, (x, y), timeout)
            return status == "ok" and bool(result)
        except Exception as exc:  # noqa: BLE001 -- e.g. inside a daemonic process: no children
            _worker_unavailable = repr(exc)
            warnings.warn(
                f"spine_ttrl: equivalence worker unavailable ({exc!r}); comparing in-process, "
                "where the time limit holds only on the main thread",
                RuntimeWarning,
                stacklevel=3,
            )
    return _verify_inline_with_alarm(x, y, timeout)


def _verify_inline_with_alarm(x: str, y: str, timeout: float) -> bool:
    """Fallback without a worker: math-verify's SIGALRM limits on the main thread, none elsewhere."""
    seconds = max(1, math.ceil(timeout)) if threading.current_thread() is threading.main_thread() else None
    return _verify_pair(x, y, seconds)


@lru_cache(maxsize=1 << 16)
def _equivalent_normalised(x: str, y: str, timeout: float | None) -> bool:
    # Callers pass (x, y) sorted, so (a, b) and (b, a) share one cache entry. A timeout is
    # cached as False too: a pathological pair recurs every step of the same question.
    numeric = _numeric_equal(x, y)
    if numeric is not None:
        return numeric
    return _symbolic_equal(x, y, timeout)


def _choice_key(s: str) -> str:
    return _strip_math_delimiters(s).strip("()[]. ").upper()


def is_equivalent(a: str | None, b: str | None, task: str = "math", *, timeout: float | None = None) -> bool:
    """True if two extracted answers mean the same thing. Symmetric; never raises on content.

    ``task="choice"``: the letters compared case-insensitively (``"b" ≡ "(B)"``).

    ``task="label"``: case-insensitive string equality after stripping surrounding whitespace
    (``"Yes" ≡ "yes"``, ``"yes" !≡ "no"``).

    ``task="math"``, cheapest test first:

    1. exact match after light normalisation (math delimiters, spaces, trailing period,
       ``\\left``/``\\right``, ``\\!``, ``\\,``, ``\\dfrac`` -> ``\\frac``);
    2. both plain numbers (``12``, ``1,234``, ``0.5``, ``3/4``, ``\\frac34``): exact comparison,
       or after rounding to 6 decimals when either is a decimal — math-verify's rule;
    3. otherwise math-verify: ``verify(parse($a$), parse($b$))`` or the same with a and b
       swapped, run in a worker process under a hard limit of ``timeout`` seconds
       (default :data:`EQUIVALENCE_TIMEOUT`); a timeout or any error gives False.

    Results of 2 and 3 are cached (LRU) on the unordered normalised pair. Empty or None
    answers are never equivalent to anything. Raises ValueError for an unknown task.
    """
    _check_task(task)
    if a is None or b is None:
        return False
    if task == "choice":
        ka, kb = _choice_key(a), _choice_key(b)
        return bool(ka) and ka == kb
    if task == "label":
        ka, kb = a.strip().lower(), b.strip().lower()
        return bool(ka) and ka == kb
    x, y = _normalise(a), _normalise(b)
    if not x or not y:
        return False
    if x == y:
        return True
    if timeout is None:
        timeout = EQUIVALENCE_TIMEOUT
    if x > y:
        x, y = y, x
    return _equivalent_normalised(x, y, timeout)


# =====================================================================================
# Voting
# =====================================================================================


class Vote(NamedTuple):
    """Outcome of a majority vote over one question's answers.

    label: first member of the largest equivalence cluster (None if nothing parsed).
    count: size of that cluster.
    ratio: count / number of answers, unparsed ones included (0.0 for no answers).
    """

    label: str | None
    count: int
    ratio: float


def cluster_answers(answers: Sequence[str | None], task: str = "math") -> list[int | None]:
    """Cluster index of each answer (None for unparsed), clusters numbered by first appearance.

    Greedy: each distinct answer string joins the first existing cluster whose *first member*
    it is equivalent to (:func:`is_equivalent`), else opens a new cluster. Only distinct
    strings are compared, so d distinct answers cost at most d(d−1)/2 comparisons however
    many times each repeats (64 votes with 8 distinct answers: ≤ 28, not 2,016).
    Equivalence need not be transitive; comparing only with representatives keeps the result
    well defined. ``None`` and empty/whitespace strings are unparsed and join no cluster.
    """
    _check_task(task)
    representatives: list[str] = []
    cluster_of: dict[str, int] = {}
    out: list[int | None] = []
    for answer in answers:
        if answer is None or not answer.strip():
            out.append(None)
            continue
        if answer not in cluster_of:
            for k, rep in enumerate(representatives):
                if is_equivalent(rep, answer, task=task):
                    cluster_of[answer] = k
                    break
            else:
                cluster_of[answer] = len(representatives)
                representatives.append(answer)
        out.append(cluster_of[answer])
    return out


def winning_cluster(clusters: Sequence[int | None]) -> int | None:
    """Index of the largest cluster; ties go to the smallest index (the one seen first).

    ``clusters`` as returned by :func:`cluster_answers`. None if no answer is in a cluster.
    """
    counts: dict[int, int] = {}
    for c in clusters:
        if c is not None:
            counts[c] = counts.get(c, 0) + 1
    if not counts:
        return None
    return min(counts, key=lambda c: (-counts[c], c))


def majority_vote(answers: Sequence[str | None], task: str = "math") -> Vote:
    """Majority vote over equivalence clusters: the pseudo-label of test-time RL.

    label = first member of the largest cluster of :func:`cluster_answers` (ties: the cluster
    that appeared first), count = its size, ratio = count / len(answers), where unparsed
    answers (None) count in the denominator. No parsed answer -> ``Vote(None, 0, 0.0)``.

    >>> majority_vote(["1/2", "0.5", "3", "3", "\\\\frac{1}{2}"])
    Vote(label='1/2', count=3, ratio=0.6)
    """
    clusters = cluster_answers(answers, task=task)
    winner = winning_cluster(clusters)
    if winner is None:
        return Vote(None, 0, 0.0)
    count = sum(1 for c in clusters if c == winner)
    label = answers[clusters.index(winner)]
    return Vote(label, count, count / len(answers))
