"""Questions in, chat messages out: loading, validation, task detection, prompt building.

A run starts from ``load_examples(spec)``. ``spec`` is a file (JSON array, JSONL, CSV/TSV), a directory
written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``), or ``arith:<level>[:<count>[:<seed>]]``
for the built-in integer-arithmetic generator (:mod:`spine_ttrl.arith`; its ``generate_arith``,
``parse_arith_spec``, ``ARITH_LEVELS`` and ``ARITH_USAGE`` are re-exported here, as are
:class:`Example` and :class:`DataError` from :mod:`spine_ttrl.example`). Everything is read
and validated eagerly, before any model loads, and every problem raises :class:`DataError` whose message
is one line naming the file, the line (or record) and the field -- the CLI prints ``error: <message>``
and exits 2, no traceback.

What a record may hold (first name present wins; other fields are ignored):

=========  ==========================================================  =================================
Example    record fields                                               notes
=========  ==========================================================  =================================
prompt     ``prompt``, ``question``, ``problem``, ``input`` (MAWPS),    non-empty string; SVAMP's
           ``Question``                                                 ``Body`` is prefixed to ``Question``
answer     ``answer``, ``target``, ``Answer``                           string or number, optional
choices    ``choices``                                                  list of strings (a JSON-encoded
                                                                        list in CSV cells), optional
labels     ``labels``                                                   list of strings (JSON-encoded in
                                                                        CSV cells), optional: the label
                                                                        set of ``task=label``
id         ``id``, ``ID``                                               string or int; default
                                                                        ``<file-stem>:<index>``
source     ``source``                                                   string or int, optional: the set
                                                                        a question comes from; with two
                                                                        or more, evaluation metrics are
                                                                        also given per source
=========  ==========================================================  =================================

Answers are used only for evaluation and diagnostics, never in the training reward (TTRL protocol,
paper.md section 1). They are normalised so that they compare as written:

- numbers become strings the way Python prints them: ``5 -> "5"``, ``3.0 -> "3.0"``,
  ``14.5 -> "14.5"``; strings are kept as written apart from surrounding whitespace (``"142.0"`` stays
  ``"142.0"``). Equivalence (3.0 == 3) is the answer checker's job (:mod:`spine_ttrl.answers`), not ours;
  a float NaN means "no answer" (pandas-made datasets use it for missing cells);
- a GSM8K-style solution whose last line is ``#### N`` becomes ``N`` (thousands commas removed);
- with ``choices``: an integer answer in ``range(len(choices))`` is an index (MMLU style) and becomes its
  letter, and an answer equal to exactly one option's text becomes that option's letter.

Simplifications, on purpose: one record schema for every format (no per-dataset adapters beyond the
SVAMP ``Body``); no streaming (files here are at most a few MB); a DatasetDict uses its ``test`` split,
else its only split. Prompt length is measured in tokens, so it is checked by the loop after
tokenising; :func:`limit_prompt_length` is the pure decision it calls.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
from pathlib import Path
from typing import Any, NamedTuple, Sequence

# The generator and the shared types live in their own modules; their names stay importable from here.
from .arith import ARITH_LEVELS, ARITH_USAGE, Made, generate_arith, parse_arith_spec  # noqa: F401
from .answers import DEFAULT_LABELS
from .example import DataError, Example
from .images import parse_image_field
from .shapes import SHAPES_USAGE, generate_shapes, parse_shapes_spec  # noqa: F401

# ------------------------------------------------------------------------------------------ constants
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Appended to every math question (the Qwen2.5-Math / TTRL wording)."""

CHOICE_INSTRUCTION = "Please reason step by step, and put the letter of your final answer within \\boxed{}."
"""Appended to every multiple-choice question, after the lettered options."""

LABEL_INSTRUCTION = "Please reason step by step, and put your final answer, one of: {labels}, within \\boxed{{}}."
"""Appended to every label question (``task=label``), naming its labels (yes, no, maybe by default)."""

OPTION_LETTERS = "ABCDEFGHIJ"
"""Letters for at most ten options; a ``choices`` list longer than this is rejected."""

PROMPT_FIELDS = ("prompt", "question", "problem", "input", "Question")
ANSWER_FIELDS = ("answer", "target", "Answer")
CHOICES_FIELD = "choices"
LABELS_FIELD = "labels"
ID_FIELDS = ("id", "ID")
SOURCE_FIELD = "source"

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv")
SUPPORTED_INPUTS = (
    ".json (array of objects, or an object with a 'data' array), .jsonl/.ndjson, .csv/.tsv, "
    "a directory saved with datasets' save_to_disk, arith:<level>[:<count>[:<seed>]] or shapes:<count>[:<seed>]"
)


# ------------------------------------------------------------------------------------------ loading
def load_examples(spec: str) -> list[Example]:
    """Load and validate every example of ``spec`` (a path or ``arith:<level>[:<count>[:<seed>]]``).

    Raises :class:`DataError` (one line, naming file, line and field) on any problem, including an
    input that holds no records. Blank JSONL/CSV lines are skipped; a UTF-8 byte-order mark is fine.
    """
    spec = str(spec)
    if spec == "arith" or spec.startswith("arith:"):
        level, count, seed = parse_arith_spec(spec)
        return generate_arith(level, count, seed)
    if spec.startswith("shapes:"):
        return generate_shapes(*parse_shapes_spec(spec))

    path = Path(spec)
    if not path.exists():
        raise DataError(f"{spec}: no such file or directory")
    if path.is_dir():
        records, columns = _read_saved_dataset(path, spec)
        stem = path.name or spec
    else:
        suffix = path.suffix.lower()
        if suffix not in SUPPORTED_SUFFIXES:
            raise DataError(f"{spec}: unsupported file type '{path.suffix or '(none)'}'; supported: {SUPPORTED_INPUTS}")
        text = _read_text(path, spec)
        columns = None
        if suffix == ".json":
            records = _read_json(text, spec)
        elif suffix in (".jsonl", ".ndjson"):
            records = _read_jsonl(text, spec)
        else:
            records, columns = _read_csv(text, spec, delimiter="\t" if suffix == ".tsv" else ",")
        stem = path.stem
    if not records:
        raise DataError(f"{spec}: no records")
    if columns is not None and not any(f in columns for f in PROMPT_FIELDS):
        where = f"{spec}:1" if not path.is_dir() else spec
        raise DataError(f"{where}: no prompt column (looked for {_names(PROMPT_FIELDS)}; found {_names(columns)})")

    examples: list[Example] = []
    first_seen: dict[str, str] = {}
    for index, (where, record) in enumerate(records):
        example = _example_from_record(record, where, default_id=f"{stem}:{index}")
        if isinstance(record, dict):  # images are checked here, before any model loads
            images = parse_image_field(record, where, path if path.is_dir() else path.parent)
            example = dataclasses.replace(example, images=images) if images else example
        if example.id in first_seen:
            raise DataError(f"{where}: field 'id': duplicate id {example.id!r} (first at {first_seen[example.id]})")
        first_seen[example.id] = where
        examples.append(example)
    return examples


def resolve_task(examples: Sequence[Example], task: str = "auto") -> str:
    """Return ``"math"``, ``"choice"`` or ``"label"``.

    ``math``/``choice``/``label`` pass through. ``auto`` picks ``choice`` when any example has ``choices``;
    ``label`` when any has ``labels``; ``choice`` when at least one example is labelled and every answer
    is a single letter A-J (GPQA-style files list the options inside the prompt and must vote on letters,
    not on the numbers in the options); ``label`` when every answer is yes, no or maybe (any case);
    else ``math``. For ``label``, an answer outside its question's labels (yes / no / maybe without a
    ``labels`` column) raises DataError: it could never be matched.
    """
    if task in ("math", "choice"):
        return task
    if task not in ("label", "auto"):
        raise ValueError(f"task must be 'math', 'choice', 'label' or 'auto', got {task!r}")
    answers = [ex.answer for ex in examples if ex.answer is not None]
    if task == "auto":
        if any(ex.choices for ex in examples):
            return "choice"
        if not any(ex.labels for ex in examples):
            if answers and all(len(a) == 1 and a in OPTION_LETTERS for a in answers):
                return "choice"
            if not answers or not all(a.strip().lower() in DEFAULT_LABELS for a in answers):
                return "math"
    for ex in examples:
        labels = ex.labels or DEFAULT_LABELS
        if ex.answer is not None and ex.answer.strip().lower() not in {x.strip().lower() for x in labels}:
            raise DataError(f"example {ex.id!r}: answer {ex.answer!r} is not one of its labels ({', '.join(labels)}); "
                            f"task=label needs the answers among the labels (a 'labels' column sets them)")
    return "label"


# ------------------------------------------------------------------------------------------ prompts
def build_messages(example: Example, task: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """Chat messages for one example: an optional system message, then one user message.

    math:   ``<question>\\n<MATH_INSTRUCTION>``
    label:  ``<question>\\n<LABEL_INSTRUCTION>`` naming the example's labels (yes, no, maybe by default)
    choice: ``<question>\\n\\nA) ...\\nB) ...\\n\\n<CHOICE_INSTRUCTION>``; the options are added only when
            the example has ``choices`` and the prompt does not already list them as lines starting
            ``A)``, ``A.``, ``A:`` or ``(A)`` for every option letter.
    """
    if task == "math":
        content = f"{example.prompt}\n{MATH_INSTRUCTION}"
    elif task == "choice":
        parts = [example.prompt]
        if example.choices and not _lists_options(example.prompt, len(example.choices)):
            parts.append("\n".join(f"{OPTION_LETTERS[i]}) {c}" for i, c in enumerate(example.choices)))
        parts.append(CHOICE_INSTRUCTION)
        content = "\n\n".join(parts)
    elif task == "label":
        content = f"{example.prompt}\n{LABEL_INSTRUCTION.format(labels=', '.join(example.labels or DEFAULT_LABELS))}"
    else:
        raise ValueError(f"task must be 'math', 'choice' or 'label' (resolve 'auto' first), got {task!r}")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": content})
    return messages


def _lists_options(prompt: str, n: int) -> bool:
    return all(re.search(rf"(?m)^[ \t]*(?:\({L}\)|{L}[).:])", prompt) for L in OPTION_LETTERS[:n])


class PromptLimit(NamedTuple):
    """Decision of :func:`limit_prompt_length`. Indices refer to the input ``examples``."""

    examples: list[Example]  # the examples to use, in input order
    kept: list[int]  # their indices
    truncated: list[int]  # indices (a subset of ``kept``) whose prompt tokens must be cut to the limit
    report: str  # one line for the log


PROMPT_LENGTH_POLICIES = ("skip", "truncate", "error")


def limit_prompt_length(
    examples: Sequence[Example],
    lengths: Sequence[int],
    max_prompt_tokens: int | None,
    policy: str = "skip",
) -> PromptLimit:
    """Decide what to do with prompts longer than ``max_prompt_tokens`` (``lengths[i]`` = tokens of example i).

    - ``skip``: drop them (a DataError if that leaves nothing);
    - ``truncate``: keep them and list them in ``truncated``; the caller keeps the LAST
      ``max_prompt_tokens`` tokens, so the end of the question and the instruction survive;
    - ``error``: raise DataError naming the first offending example id and its length.

    ``max_prompt_tokens=None`` means no limit. Pure: the caller tokenises and truncates.
    """
    if policy not in PROMPT_LENGTH_POLICIES:
        raise ValueError(f"policy must be one of {PROMPT_LENGTH_POLICIES}, got {policy!r}")
    if len(lengths) != len(examples):
        raise ValueError(f"got {len(lengths)} lengths for {len(examples)} examples")
    n = len(examples)
    if max_prompt_tokens is None:
        return PromptLimit(list(examples), list(range(n)), [], f"prompt length: {n} prompts, no limit")
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {max_prompt_tokens}")

    over = [i for i in range(n) if lengths[i] > max_prompt_tokens]
    longest = max(lengths, default=0)
    if not over:
        report = f"prompt length: all {n} prompts within {max_prompt_tokens} tokens (longest {longest})"
        return PromptLimit(list(examples), list(range(n)), [], report)
    first = over[0]
    if policy == "error":
        raise DataError(
            f"example {examples[first].id!r}: prompt is {lengths[first]} tokens, over max_prompt_tokens="
            f"{max_prompt_tokens} ({len(over)} of {n} prompts are; choose the skip or truncate policy)"
        )
    head = f"prompt length: {len(over)} of {n} prompts exceed {max_prompt_tokens} tokens (longest {longest})"
    if policy == "truncate":
        return PromptLimit(list(examples), list(range(n)), over, f"{head}; truncated to their last {max_prompt_tokens} tokens")
    kept = [i for i in range(n) if lengths[i] <= max_prompt_tokens]
    if not kept:
        raise DataError(f"all {n} prompts exceed max_prompt_tokens={max_prompt_tokens} (shortest {min(lengths)} tokens)")
    return PromptLimit([examples[i] for i in kept], kept, [], f"{head}; skipped, {len(kept)} kept")


# ------------------------------------------------------------------------------------------ readers
# Each reader returns [(where, record)], ``where`` being "file:line" or "file: record i" for messages.
Records = list[tuple[str, dict]]


def _read_text(path: Path, name: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        hint = ""
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            hint = "; the file starts with a UTF-16 byte-order mark, re-save it as UTF-8"
        raise DataError(f"{name}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}){hint}") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise DataError(f"{name}: no records (the file is empty)")
    return text


_JSON_WS = re.compile(r"[ \t\n\r]*")


def _read_json(text: str, name: str) -> Records:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one object per line? name the file .jsonl)" if e.msg == "Extra data" else ""
        raise DataError(f"{name}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}{hint}") from None
    except ValueError as e:  # e.g. an integer too long to convert
        raise DataError(f"{name}: malformed JSON: {_first_line(e)}") from None
    if isinstance(data, list):
        return list(zip((f"{name}:{line}" for line in _array_element_lines(text)), data))
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        return [(f"{name}: record {i}", r) for i, r in enumerate(data["data"])]
    if isinstance(data, dict):
        raise DataError(f"{name}: expected a JSON array of objects (or an object with a 'data' array), got an object with keys {_names(data)}")
    raise DataError(f"{name}: expected a JSON array of objects, got {_type_name(data)}")


def _array_element_lines(text: str) -> list[int]:
    """1-based line on which each element of a top-level JSON array starts (``text`` is valid JSON)."""
    decoder = json.JSONDecoder()
    i = _JSON_WS.match(text, 0).end() + 1  # past "["
    lines, line, pos = [], 1, 0
    while True:
        i = _JSON_WS.match(text, i).end()
        if text[i] == "]":
            return lines
        line += text.count("\n", pos, i)
        pos = i
        lines.append(line)
        _, i = decoder.raw_decode(text, i)
        i = _JSON_WS.match(text, i).end()
        if text[i] == ",":
            i += 1


def _read_jsonl(text: str, name: str) -> Records:
    records = []
    # split("\n"), not splitlines(): U+2028 and friends may sit unescaped inside JSON strings.
    for lineno, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            hint = " (a JSON array? name the file .json)" if lineno == 1 and raw.strip() == "[" else ""
            raise DataError(f"{where}: malformed JSON at column {e.colno}: {e.msg}{hint}") from None
        except ValueError as e:
            raise DataError(f"{where}: malformed JSON: {_first_line(e)}") from None
        records.append((where, record))
    return records


def _read_csv(text: str, name: str, delimiter: str) -> tuple[Records, list[str]]:
    # strict: an unterminated quote is an error, not a field that swallows the rest of the file.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    records: Records = []
    while True:
        start = reader.line_num + 1  # a quoted field may span lines; report where the row starts
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{name}:{start}: malformed CSV: {_first_line(e)}") from None
        if not row or all(not cell.strip() for cell in row):
            continue
        if header is None:
            header = [h.strip() for h in row]
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise DataError(f"{name}:{start}: duplicate column {_names(dupes)} in the header")
            continue
        if len(row) != len(header):
            raise DataError(f"{name}:{start}: {len(row)} fields, but the header has {len(header)}")
        records.append((f"{name}:{start}", dict(zip(header, row))))
    return records, header or []


def _read_saved_dataset(path: Path, name: str) -> tuple[Records, list[str]]:
    if not ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        raise DataError(
            f"{name}: a directory, but not one saved with datasets' save_to_disk "
            f"(no dataset_dict.json or state.json); supported: {SUPPORTED_INPUTS}"
        )
    try:
        import datasets  # optional: only saved HF datasets need it
    except ImportError:
        raise DataError(f"{name}: reading a saved Hugging Face dataset needs the optional 'datasets' package (pip install datasets)") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # a corrupt directory can fail in many ways; report one line
        raise DataError(f"{name}: cannot load the saved dataset: {type(e).__name__}: {_first_line(e)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "test" in loaded:
            split = "test"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise DataError(f"{name}: a DatasetDict with splits {_names(splits)} and no 'test' split; save the split to use on its own")
        loaded, name = loaded[split], f"{name}[{split}]"
    columns = list(loaded.column_names)
    return [(f"{name}: record {i}", r) for i, r in enumerate(loaded)], columns


# ------------------------------------------------------------------------------------------ records
def _example_from_record(record: Any, where: str, default_id: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with a prompt field, got {_type_name(record)}")

    prompt_field = next((f for f in PROMPT_FIELDS if f in record), None)
    if prompt_field is None:
        raise DataError(f"{where}: no prompt field (looked for {_names(PROMPT_FIELDS)}; found {_names(record)})")
    prompt = _expect_str(record[prompt_field], where, prompt_field)
    if prompt_field == "Question" and isinstance(record.get("Body"), str) and record["Body"].strip():
        body = record["Body"].strip()  # SVAMP: the body holds the facts, "Question" only the question
        prompt = f"{body}{'' if body[-1] in '.?!' else '.'} {prompt.strip()}"

    choices = None
    raw_choices = record.get(CHOICES_FIELD)
    if raw_choices is not None and not (isinstance(raw_choices, str) and not raw_choices.strip()):
        choices = _parse_choices(raw_choices, where)
    labels = None
    raw_labels = record.get(LABELS_FIELD)
    if raw_labels is not None and not (isinstance(raw_labels, str) and not raw_labels.strip()):
        if choices:
            raise DataError(f"{where}: fields 'choices' and 'labels': a question has options or labels, not both")
        labels = _parse_labels(raw_labels, where)

    answer = None
    answer_field = next((f for f in ANSWER_FIELDS if f in record), None)
    if answer_field is not None:
        raw = record[answer_field]
        if choices and type(raw) is int and 0 <= raw < len(choices):
            answer = OPTION_LETTERS[raw]  # an option index (MMLU style)
        else:
            answer = _format_answer(raw, where, answer_field)
            if choices and answer is not None and answer not in OPTION_LETTERS[: len(choices)]:
                matches = [i for i, c in enumerate(choices) if c.strip() == answer]
                if len(matches) == 1:
                    answer = OPTION_LETTERS[matches[0]]

    example_id = default_id
    id_field = next((f for f in ID_FIELDS if f in record), None)
    if id_field is not None and record[id_field] is not None:
        example_id = _str_or_int(record[id_field], where, id_field) or example_id
    source = ""
    raw_source = record.get(SOURCE_FIELD)
    if raw_source is not None and not (isinstance(raw_source, float) and math.isnan(raw_source)):
        source = _str_or_int(raw_source, where, SOURCE_FIELD)
    if labels and answer is not None and answer.strip().lower() not in {x.lower() for x in labels}:
        raise DataError(f"{where}: field '{answer_field}': answer {answer!r} is not one of the labels "
                        f"({', '.join(labels)})")
    return Example(prompt=prompt, answer=answer, choices=choices, id=example_id, labels=labels, source=source)


def _str_or_int(value: Any, where: str, field: str) -> str:
    """A string or integer field (``id``, ``source``) as stripped text; anything else is a DataError."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: field '{field}': expected a string or integer, got {_type_name(value)}")
    return str(value).strip()


def _expect_str(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}': expected a string, got {_type_name(value)}")
    if not value.strip():
        raise DataError(f"{where}: field '{field}': empty string")
    return value


_GSM8K_FINAL = re.compile(r"(?:^|\n)[ \t]*####[ \t]*([^\n]*?)\s*$")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _format_answer(value: Any, where: str, field: str) -> str | None:
    """Answer as a string (see the module docstring), or None when missing."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field '{field}': expected a string or number, got {_type_name(value)}")
    if isinstance(value, float):
        return None if math.isnan(value) else str(value)  # str(float) is repr: 3.0 -> "3.0"
    if isinstance(value, int):
        return str(value)
    text = value.strip()
    m = _GSM8K_FINAL.search(text)
    if m and m.group(1):
        text = m.group(1)
        if _THOUSANDS.fullmatch(text):
            text = text.replace(",", "")
    return text or None


def _list_field(value: Any, where: str, name: str) -> list | tuple:
    """A non-empty list field (``choices``, ``labels``), JSON-decoded first when given as a string."""
    if isinstance(value, str):  # CSV cells (and some JSON files) carry the list JSON-encoded
        try:
            value = json.loads(value)
        except ValueError:
            raise DataError(f"{where}: field '{name}': expected a JSON list of strings, got {_short(value)}") from None
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: field '{name}': expected a list of strings, got {_type_name(value)}")
    if not value:
        raise DataError(f"{where}: field '{name}': empty list")
    return value


def _parse_choices(value: Any, where: str) -> tuple[str, ...]:
    value = _list_field(value, where, "choices")
    if len(value) > len(OPTION_LETTERS):
        raise DataError(f"{where}: field 'choices': {len(value)} options, at most {len(OPTION_LETTERS)} (A-J) are supported")
    out = []
    for i, c in enumerate(value):
        if isinstance(c, bool) or not isinstance(c, (str, int, float)):
            raise DataError(f"{where}: field 'choices': item {i}: expected a string, got {_type_name(c)}")
        out.append(c if isinstance(c, str) else str(c))
    return tuple(out)


def _parse_labels(value: Any, where: str) -> tuple[str, ...]:
    """A ``labels`` field: a non-empty list of distinct (case-insensitively) non-empty strings,
    JSON-encoded in CSV cells; returned stripped, as written."""
    value = _list_field(value, where, "labels")
    seen: dict[str, int] = {}
    for i, label in enumerate(value):
        if not isinstance(label, str) or not label.strip():
            raise DataError(f"{where}: field 'labels': item {i}: expected a non-empty string, got {_short(label)}")
        if label.strip().lower() in seen:
            raise DataError(f"{where}: field 'labels': item {i}: {label!r} repeats item {seen[label.strip().lower()]}")
        seen[label.strip().lower()] = i
    return tuple(label.strip() for label in value)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _names(items: Any, limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(repr(str(x)) for x in items[:limit])
    return (shown + f", ... ({len(items)} in all)") if len(items) > limit else (shown or "none")


def _short(value: Any, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
