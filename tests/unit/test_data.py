"""Loading, validation messages, task detection, arith specs and prompt building (spine_ttrl.data).

Every test writes its own small files under ``tmp_path``; nothing reads /work/shared.
"""

import json
import sys

import pytest

from spine_ttrl.data import (
    ARITH_LEVELS,
    CHOICE_INSTRUCTION,
    MATH_INSTRUCTION,
    DataError,
    Example,
    build_messages,
    generate_arith,
    limit_prompt_length,
    load_examples,
    parse_arith_spec,
    resolve_task,
)

ROWS = [
    {"prompt": "What is 1 + 1?", "answer": "2", "id": "q1"},
    {"prompt": "What is 2 * 3?", "answer": "6", "id": "q2"},
]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def load_error(path) -> str:
    """Load ``path`` expecting a DataError; return its message after checking it is one line."""
    with pytest.raises(DataError) as info:
        load_examples(str(path))
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


# ---------------------------------------------------------------- formats
def test_json_array(tmp_path):
    ex = load_examples(write(tmp_path / "d.json", json.dumps(ROWS, indent=2)))
    assert ex == [Example("What is 1 + 1?", "2", None, "q1"), Example("What is 2 * 3?", "6", None, "q2")]


def test_json_object_with_data_list(tmp_path):
    ex = load_examples(write(tmp_path / "d.json", json.dumps({"data": ROWS})))
    assert [e.id for e in ex] == ["q1", "q2"]


def test_jsonl_with_blank_lines_and_bom(tmp_path):
    text = "\ufeff" + json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n"
    ex = load_examples(write(tmp_path / "d.jsonl", text))
    assert [e.answer for e in ex] == ["2", "6"]
    ex = load_examples(write(tmp_path / "d.ndjson", text))
    assert len(ex) == 2


def test_csv_and_tsv(tmp_path):
    text = 'prompt,answer\n"Sum, please: 1 + 1","2"\n\n"Line one\nline two",\n'
    ex = load_examples(write(tmp_path / "d.csv", text))
    assert ex[0] == Example("Sum, please: 1 + 1", "2", None, "d:0")
    assert ex[1].prompt == "Line one\nline two" and ex[1].answer is None  # empty cell = no answer
    ex = load_examples(write(tmp_path / "d.tsv", "question\tanswer\nWhat is 2 + 2?\t4\n"))
    assert ex == [Example("What is 2 + 2?", "4", None, "d:0")]


def test_default_ids_use_stem_and_index(tmp_path):
    ex = load_examples(write(tmp_path / "set.jsonl", '{"prompt": "a"}\n{"prompt": "b", "id": 7}\n'))
    assert [e.id for e in ex] == ["set:0", "7"]


def test_prompt_column_fallbacks(tmp_path):
    rows = [{"question": "Q?"}, {"problem": "P?"}, {"input": "I?", "target": 39}]
    ex = load_examples(write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert [e.prompt for e in ex] == ["Q?", "P?", "I?"]
    assert [e.answer for e in ex] == [None, None, "39"]
    # SVAMP: Body + Question, capitalised Answer and ID.
    svamp = [{"ID": "chal-1", "Body": "Dan had 4 dollars", "Question": "How much is left?", "Answer": 1.0}]
    (e,) = load_examples(write(tmp_path / "s.json", json.dumps(svamp)))
    assert e == Example("Dan had 4 dollars. How much is left?", "1.0", None, "chal-1")


def test_numeric_answers_become_strings(tmp_path):
    rows = [{"prompt": "a", "answer": 5}, {"prompt": "b", "answer": 3.0}, {"prompt": "c", "answer": "142.0"},
            {"prompt": "d", "answer": 14.5}, {"prompt": "e", "answer": "  7 "}, {"prompt": "f", "answer": None}]
    ex = load_examples(write(tmp_path / "d.json", json.dumps(rows)))
    assert [e.answer for e in ex] == ["5", "3.0", "142.0", "14.5", "7", None]


def test_gsm8k_final_answer(tmp_path):
    rows = [
        {"question": "Eggs?", "answer": "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $18.\n#### 18"},
        {"question": "Big?", "answer": "Total is 1,000 + 200.\n#### 1,200"},
        {"question": "Neg?", "answer": "#### -3"},
    ]
    ex = load_examples(write(tmp_path / "test.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert [e.answer for e in ex] == ["18", "1200", "-3"]


def test_choices(tmp_path):
    rows = [
        {"prompt": "Capital of France?", "choices": ["Rome", "Paris", "Oslo"], "answer": "B"},
        {"prompt": "2 + 2?", "choices": ["3", "4"], "answer": 1},  # an index (MMLU style) -> "B"
        {"prompt": "Colour of grass?", "choices": ["red", "green"], "answer": "green"},  # option text -> "B"
    ]
    ex = load_examples(write(tmp_path / "d.json", json.dumps(rows)))
    assert ex[0].choices == ("Rome", "Paris", "Oslo")
    assert [e.answer for e in ex] == ["B", "B", "B"]
    # CSV cells hold the list JSON-encoded.
    ex = load_examples(write(tmp_path / "d.csv", 'prompt,choices,answer\nPick one,"[""x"", ""y""]",A\n'))
    assert ex == [Example("Pick one", "A", ("x", "y"), "d:0")]


def test_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"question": "What is 3 + 4?", "answer": 7}, {"question": "5 - 1?", "answer": 4}])
    ds.save_to_disk(str(tmp_path / "single"))
    ex = load_examples(str(tmp_path / "single"))
    assert [(e.prompt, e.answer, e.id) for e in ex] == [("What is 3 + 4?", "7", "single:0"), ("5 - 1?", "4", "single:1")]

    dd = datasets.DatasetDict({"train": ds.select([0]), "test": ds.select([1])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert [e.prompt for e in load_examples(str(tmp_path / "dict"))] == ["5 - 1?"]  # the test split

    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "nosplit"))
    msg = load_error(tmp_path / "nosplit")
    assert "'train'" in msg and "'validation'" in msg

    datasets.Dataset.from_list([{"text": "hi"}]).save_to_disk(str(tmp_path / "noprompt"))
    assert "no prompt column" in load_error(tmp_path / "noprompt")


# ---------------------------------------------------------------- task detection
def test_resolve_task_auto():
    letters = [Example("q1", "A"), Example("q2", "D"), Example("q3")]
    numbers = [Example("q1", "12"), Example("q2", "A")]
    with_choices = [Example("q1", None, ("x", "y"))]
    unlabelled = [Example("q1"), Example("q2")]
    assert resolve_task(letters) == "choice"
    assert resolve_task(with_choices) == "choice"
    assert resolve_task(numbers) == "math"
    assert resolve_task(unlabelled) == "math"
    assert resolve_task([Example("q", "K")]) == "math"  # only A-J are option letters
    assert resolve_task(letters, "math") == "math" and resolve_task(numbers, "choice") == "choice"
    with pytest.raises(ValueError):
        resolve_task(numbers, "mcq")


def test_resolve_task_from_gpqa_style_file(tmp_path):
    rows = [{"prompt": "Which?\n\nA. 1.5\nB. 2\nC. 3\nD. 4", "answer": "C", "id": "0"},
            {"prompt": "Which?\n\nA. 7\nB. 8\nC. 9\nD. 10", "answer": "A", "id": "1"}]
    assert resolve_task(load_examples(write(tmp_path / "gpqa.json", json.dumps(rows)))) == "choice"


# ---------------------------------------------------------------- bad input: one line naming file, line, field
def test_malformed_json_array(tmp_path):
    path = write(tmp_path / "bad.json", '[\n  {"prompt": "a"},\n  {"prompt": "b"\n   "answer": 1}\n]')
    msg = load_error(path)
    assert msg == f"{path}: malformed JSON at line 4 column 4: Expecting ',' delimiter"


def test_malformed_jsonl_line_3(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",}\n')
    msg = load_error(path)
    assert msg.startswith(f"{path}:3: malformed JSON"), msg


def test_missing_prompt(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"prompt": "a"}\n\n{"q": "b", "answer": 2}\n')
    msg = load_error(path)
    assert msg.startswith(f"{path}:3: no prompt field"), msg
    assert "'prompt'" in msg and "'q'" in msg
    path = write(tmp_path / "d.csv", "q,answer\nhello,1\n")
    assert load_error(path).startswith(f"{path}:1: no prompt column")


def test_empty_inputs(tmp_path):
    for name, text in [("e.jsonl", ""), ("e.json", "  \n"), ("e.csv", ""), ("b.jsonl", "\n\n")]:
        path = write(tmp_path / name, text)
        assert load_error(path).startswith(f"{path}: no records")
    for name, text in [("a.json", "[]"), ("h.csv", "prompt,answer\n"), ("o.json", '{"data": []}')]:
        path = write(tmp_path / name, text)
        assert load_error(path) == f"{path}: no records"


def test_empty_prompt(tmp_path):
    path = write(tmp_path / "d.json", json.dumps([{"prompt": "ok"}, {"prompt": "   "}], indent=1))
    # A JSON array names the line where the record's "{" stands (line 5 with indent=1).
    assert load_error(path) == f"{path}:5: field 'prompt': empty string"


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"prompt": 7}, "field 'prompt': expected a string, got int"),
        ({"question": None}, "field 'question': expected a string, got null"),
        ({"prompt": "a", "answer": {"x": 1}}, "field 'answer': expected a string or number, got object"),
        ({"prompt": "a", "answer": [1, 2]}, "field 'answer': expected a string or number, got list"),
        ({"prompt": "a", "answer": True}, "field 'answer': expected a string or number, got bool"),
        ({"prompt": "a", "choices": "x"}, "field 'choices': expected a JSON list of strings, got 'x'"),
        ({"prompt": "a", "choices": 3}, "field 'choices': expected a list of strings, got int"),
        ({"prompt": "a", "choices": []}, "field 'choices': empty list"),
        ({"prompt": "a", "choices": ["x", {"y": 1}]}, "field 'choices': item 1: expected a string, got object"),
        ({"prompt": "a", "id": [1]}, "field 'id': expected a string or integer, got list"),
        ("just a string", "expected an object with a prompt field, got str"),
    ],
)
def test_wrong_types(tmp_path, record, expected):
    path = write(tmp_path / "d.jsonl", '{"prompt": "fine"}\n' + json.dumps(record) + "\n")
    assert load_error(path) == f"{path}:2: {expected}"


def test_duplicate_ids(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n')
    assert load_error(path) == f"{path}:2: field 'id': duplicate id 'x' (first at {path}:1)"


def test_undecodable_bytes(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xff"}\n')
    assert load_error(path) == f"{path}:2: not UTF-8 (byte 0xff at offset 31)"
    path = tmp_path / "utf16.json"
    path.write_bytes(b"\xff\xfe[\x00{\x00\xff\xfe garbage")
    msg = load_error(path)
    assert msg.startswith(f"{path}:1: not UTF-8 (byte 0xff at offset 0)") and "UTF-16" in msg


def test_csv_problems(tmp_path):
    path = write(tmp_path / "d.csv", "prompt,answer\na,1\nb,2,extra\n")
    assert load_error(path) == f"{path}:3: 3 fields, but the header has 2"
    path = write(tmp_path / "d2.csv", 'prompt,choices\na,"not json"\n')
    assert load_error(path) == f"{path}:2: field 'choices': expected a JSON list of strings, got 'not json'"
    path = write(tmp_path / "d3.csv", 'prompt\nfine\n"never closed\nmore\n')
    assert load_error(path) == f"{path}:3: malformed CSV: unexpected end of data"


def test_json_top_level_not_an_array(tmp_path):
    path = write(tmp_path / "n.json", "42")
    assert load_error(path) == f"{path}: expected a JSON array of objects, got int"
    path = write(tmp_path / "o.json", '{"rows": []}')
    assert "got an object with keys 'rows'" in load_error(path)
    path = write(tmp_path / "lines.json", '{"prompt": "a"}\n{"prompt": "b"}\n')
    assert load_error(path).startswith(f"{path}: malformed JSON at line 2 column 1: Extra data")


def test_saved_dataset_without_datasets_package(tmp_path, monkeypatch):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes "import datasets" fail
    assert "needs the optional 'datasets' package" in load_error(tmp_path / "saved")


def test_unknown_extension_and_missing_file(tmp_path):
    path = write(tmp_path / "d.txt", "What is 1 + 1?\n")
    msg = load_error(path)
    assert msg.startswith(f"{path}: unsupported file type '.txt'; supported:") and ".jsonl" in msg and "arith:" in msg
    missing = tmp_path / "nope.jsonl"
    assert load_error(missing) == f"{missing}: no such file or directory"
    (tmp_path / "plain_dir").mkdir()
    assert "save_to_disk" in load_error(tmp_path / "plain_dir")


@pytest.mark.parametrize("spec", ["arith", "arith:", "arith:x", "arith:9", "arith:0", "arith:2:0",
                                  "arith:2:-5", "arith:2:ten", "arith:1:2:3:4", "arith:2:10:s"])
def test_bad_arith_spec(spec):
    msg = load_error(spec)
    assert msg.startswith(f"bad arith spec {spec!r}"), msg
    if spec in ("arith:9", "arith:0"):
        assert "levels: 1 = " in msg and "5 = " in msg


# ---------------------------------------------------------------- arithmetic specs (generator: test_arith.py)
def test_arith_spec_loads_generated_questions():
    ex = load_examples("arith:2:300:7")
    assert len(ex) == 300 and ex[3].id == "arith2-7-0003"
    assert ex == generate_arith(2, 300, seed=7)


def test_moved_names_still_importable_from_data():
    from spine_ttrl import arith, data, example

    for name in ("generate_arith", "parse_arith_spec", "ARITH_LEVELS", "ARITH_USAGE"):
        assert getattr(data, name) is getattr(arith, name)
    assert data.Example is example.Example and data.DataError is example.DataError
    assert all(isinstance(e, Example) for e in generate_arith(1, 3))
    assert parse_arith_spec is arith.parse_arith_spec and ARITH_LEVELS is arith.ARITH_LEVELS


# ---------------------------------------------------------------- prompts
def test_build_messages_math():
    msgs = build_messages(Example("What is 2 + 2?", "4"), "math")
    assert msgs == [{"role": "user", "content": "What is 2 + 2?\n" + MATH_INSTRUCTION}]
    assert "\\boxed{}" in MATH_INSTRUCTION
    msgs = build_messages(Example("Q"), "math", system_prompt="Be brief.")
    assert msgs[0] == {"role": "system", "content": "Be brief."} and msgs[1]["role"] == "user"


def test_build_messages_choice():
    (msg,) = build_messages(Example("Capital of France?", "B", ("Rome", "Paris")), "choice")
    assert msg["content"] == f"Capital of France?\n\nA) Rome\nB) Paris\n\n{CHOICE_INSTRUCTION}"
    assert "letter" in CHOICE_INSTRUCTION and "\\boxed{}" in CHOICE_INSTRUCTION
    # The prompt already lists the options (GPQA style): they are not repeated.
    listed = "Which?\n\nA. Rome\nB. Paris"
    (msg,) = build_messages(Example(listed, "B", ("Rome", "Paris")), "choice")
    assert msg["content"] == f"{listed}\n\n{CHOICE_INSTRUCTION}"
    (msg,) = build_messages(Example(listed, "B"), "choice")
    assert msg["content"] == f"{listed}\n\n{CHOICE_INSTRUCTION}"
    with pytest.raises(ValueError):
        build_messages(Example("Q"), "auto")


# ---------------------------------------------------------------- prompt length
EXS = [Example(f"q{i}", id=f"id{i}") for i in range(4)]
LENS = [10, 50, 20, 80]


def test_limit_prompt_length_skip():
    out = limit_prompt_length(EXS, LENS, 40, "skip")
    assert out.kept == [0, 2] and out.examples == [EXS[0], EXS[2]] and out.truncated == []
    assert "2 of 4 prompts exceed 40 tokens" in out.report and "skipped" in out.report
    with pytest.raises(DataError, match="all 4 prompts exceed"):
        limit_prompt_length(EXS, LENS, 5, "skip")


def test_limit_prompt_length_truncate():
    out = limit_prompt_length(EXS, LENS, 40, "truncate")
    assert out.kept == [0, 1, 2, 3] and out.examples == EXS and out.truncated == [1, 3]
    assert "truncated to their last 40 tokens" in out.report


def test_limit_prompt_length_error_and_no_limit():
    with pytest.raises(DataError) as info:
        limit_prompt_length(EXS, LENS, 40, "error")
    assert "'id1'" in str(info.value) and "50 tokens" in str(info.value)
    out = limit_prompt_length(EXS, LENS, 100, "error")
    assert out.kept == [0, 1, 2, 3] and "all 4 prompts within 100 tokens" in out.report
    assert limit_prompt_length(EXS, LENS, None).kept == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        limit_prompt_length(EXS, LENS, 40, "drop")
    with pytest.raises(ValueError):
        limit_prompt_length(EXS, LENS[:2], 40)


def test_source_column(tmp_path):
    rows = [{"prompt": "a", "answer": "1", "source": " gsm8k "}, {"prompt": "b", "source": 3},
            {"prompt": "c"}, {"prompt": "d", "source": None}]
    p = write(tmp_path / "s.jsonl", "\n".join(json.dumps(r) for r in rows))
    assert [ex.source for ex in load_examples(p)] == ["gsm8k", "3", "", ""]
    csv_path = write(tmp_path / "s.csv", "prompt,answer,source\nq1,1,svamp\nq2,2,\n")
    assert [ex.source for ex in load_examples(csv_path)] == ["svamp", ""]


def test_bad_source_is_one_line(tmp_path):
    p = write(tmp_path / "s.jsonl", json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "source": ["x"]}))
    msg = load_error(p)
    assert "s.jsonl:2" in msg and "field 'source'" in msg and "list" in msg
