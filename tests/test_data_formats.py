"""Config validation, readers and record formats."""

import json

import pytest
from tests.data_testing import write_jsonl

from megatron_ec.data import DataConfig, DataError
from megatron_ec.data.formats import to_conversation, with_answer
from megatron_ec.data.readers import Record, read_records

RECORDS = [
    {"instruction": "Add 1 and 2.", "input": "", "output": "1 + 2 = 3", "answer": "3"},
    {"prompt": "Say hi.", "completion": "hi"},
    {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
]


def _conversation(fields, data_format="auto", ignore_keys=()):
    return to_conversation(Record("data.jsonl:1", fields), data_format, ignore_keys)


def test_config_normalises_paths_and_rejects_bad_choices(tmp_path):
    assert DataConfig(train=tmp_path / "a.jsonl").train == (str(tmp_path / "a.jsonl"),)
    assert DataConfig(train=["a.jsonl", "b.json"]).train == ("a.jsonl", "b.json")
    with pytest.raises(ValueError, match="truncation='left'.*right, drop"):
        DataConfig(train="a.jsonl", truncation="left")
    with pytest.raises(ValueError, match="seq_length"):
        DataConfig(train="a.jsonl", seq_length=1)
    with pytest.raises(ValueError, match="non-empty list"):
        DataConfig(train=[])


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + '{"instruction": "x",\n')
    with pytest.raises(DataError) as error:
        list(read_records(str(path)))
    message = str(error.value)
    assert message.startswith(f"{path}:3: invalid JSON")
    assert message.endswith("fix or remove the line") and "\n" not in message


_GOOD = json.dumps(RECORDS[0]).encode()

# (file name, bytes, the start of the one-line message; {path} is the file)
BAD_FILES = {
    "non_utf8_jsonl_first_byte": ("train.jsonl", b"\xff" + _GOOD + b"\n",
                                  "{path}:1: not UTF-8 text (byte 0xff at column 1)"),
    "non_utf8_jsonl_line_3": ("train.jsonl", _GOOD + b"\n" + _GOOD + b'\n{"output": "caf\xe9"}\n',
                              "{path}:3: not UTF-8 text (byte 0xe9 at column 16)"),
    "non_utf8_json_array": ("train.json", b"[\n" + _GOOD + b",\n\x80]\n",
                            "{path}:3: not UTF-8 text (byte 0x80 at column 1)"),
    "invalid_json_array": ("train.json", b"[\n" + _GOOD + b"\n" + _GOOD + b"]\n",
                           "{path}:3: invalid JSON (Expecting ',' delimiter)"),
    "corrupt_parquet": ("train.parquet", b"PAR1 not really parquet",
                        "{path}: unreadable Parquet file (Parquet magic bytes not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_undecodable_or_corrupt_data_files_name_file_and_line(case, tmp_path):
    name, content, expected = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        list(read_records(str(path)))
    message = str(error.value)
    assert message.startswith(expected.format(path=path)), message
    assert "\n" not in message and "; " in message  # one line, with the fix


def test_byte_order_mark_is_tolerated(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _GOOD + b"\n")
    assert [r.fields for r in read_records(str(path))] == [RECORDS[0]]


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"train.jsonl:1: expected a JSON object, found list"):
        list(read_records(str(path)))


def test_json_array_parquet_and_save_to_disk_read_the_same_records(tmp_path):
    import datasets

    records = [RECORDS[0], {**RECORDS[0], "instruction": "Add 3 and 4."}]
    jsonl = write_jsonl(str(tmp_path / "a.jsonl"), records)
    (tmp_path / "a.json").write_text(json.dumps(records))
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "a.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    sources = [jsonl] + [str(tmp_path / name) for name in ("a.json", "a.parquet", "saved")]
    for source in sources:
        assert [record.fields for record in read_records(source)] == records, source
    assert next(iter(read_records(str(tmp_path / "a.json")))).location.endswith("a.json record 0")


def test_json_that_is_not_an_array_and_unknown_file_types(tmp_path):
    (tmp_path / "a.json").write_text('{"instruction": "x"}')
    with pytest.raises(DataError, match="expected a JSON array"):
        list(read_records(str(tmp_path / "a.json")))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match="unknown file type '.csv'"):
        read_records(str(tmp_path / "a.csv"))
    with pytest.raises(DataError, match="no such file"):
        read_records(str(tmp_path / "missing.jsonl"))


def test_save_to_disk_folder_with_several_splits_is_rejected(tmp_path):
    import datasets

    table = datasets.Dataset.from_list([RECORDS[1]])
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="several splits.*point at one of them"):
        list(read_records(str(tmp_path / "dd")))


def test_formats_are_detected_by_keys():
    assert _conversation(RECORDS[0]) == [
        {"role": "user", "content": "Add 1 and 2."},
        {"role": "assistant", "content": "1 + 2 = 3"},
    ]
    assert _conversation(RECORDS[1])[1] == {"role": "assistant", "content": "hi"}
    assert _conversation(RECORDS[2]) == RECORDS[2]["messages"]


def test_unknown_keys_name_the_record_unless_ignored():
    fields = {**RECORDS[1], "id": 7}
    with pytest.raises(DataError, match=r"data.jsonl:1: unknown key\(s\) \['id'\].*ignore_keys"):
        _conversation(fields)
    assert _conversation(fields, ignore_keys=("id",))[0]["content"] == "Say hi."
    with pytest.raises(DataError, match="cannot tell the format"):
        _conversation({"question": "q", "response": "r"})
    with pytest.raises(DataError, match=r"alpaca record lacks \['output'\]"):
        _conversation({"instruction": "x", "outputs": "y"})


def test_explicit_format_must_match_the_record():
    with pytest.raises(DataError, match="prompt_completion record lacks"):
        _conversation(RECORDS[0], data_format="prompt_completion")


def test_alpaca_input_joins_the_instruction():
    fields = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}
    assert _conversation(fields)[0]["content"] == "Translate.\n\nBonjour"


def test_answer_is_appended_only_when_the_output_does_not_end_with_it():
    assert with_answer("5 + 3 = 8", "8") == "5 + 3 = 8"
    assert with_answer("so it is 18.0.", "18") == "so it is 18.0."
    assert with_answer("the total is 118", "18") == "the total is 118\nThe answer is 18."
    assert with_answer("the correct answer is true", "true") == "the correct answer is true"
    assert with_answer("it is untrue", "true") == "it is untrue\nThe answer is true."
    assert with_answer("Adding gives 12", "1,200") == "Adding gives 12\nThe answer is 1,200."


def test_messages_are_validated():
    with pytest.raises(DataError, match="no assistant message"):
        _conversation({"messages": [{"role": "user", "content": "Q"}]})
    with pytest.raises(DataError, match="message 1 has role 'bot'"):
        _conversation({"messages": [{"role": "user", "content": "Q"},
                                    {"role": "bot", "content": "A"}]})
    with pytest.raises(DataError, match="system message after the first"):
        _conversation({"messages": [{"role": "user", "content": "Q"},
                                    {"role": "system", "content": "S"},
                                    {"role": "assistant", "content": "A"}]})
