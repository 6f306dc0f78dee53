"""Data loading for `spp train` / `spp eval`: formats, templates, errors, order, padding."""

import json

import pytest
import torch

from spp_kernels.training.data import (
    IGNORE_INDEX,
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    DataError,
    Example,
    alpaca_prompt,
    batch_order,
    check_vocab,
    collate,
    load_dataset,
    load_token_stream,
)
from tests.helpers import ALPACA, tiny_tokenizer, write_jsonl


def test_alpaca_prompt_matches_the_standard_template():
    assert alpaca_prompt(ALPACA[0]) == PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert alpaca_prompt(ALPACA[1]) == PROMPT_WITH_INPUT.format(instruction="Add.", input="2 and 3")
    assert "### Response:\n" in alpaca_prompt(ALPACA[2])


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_alpaca_jsonl_tokenizes_prompt_and_response(tmp_path, mask_prompt):
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    examples = load_dataset(path, tok, max_len=512, mask_prompt=mask_prompt)
    assert len(examples) == 3
    ex = examples[1]
    prompt_ids = tok(alpaca_prompt(ALPACA[1]))["input_ids"]
    full = tok(alpaca_prompt(ALPACA[1]) + "5.")["input_ids"] + [tok.eos_token_id]
    assert list(ex.input_ids) == full
    if mask_prompt:
        assert list(ex.labels[: len(prompt_ids)]) == [IGNORE_INDEX] * len(prompt_ids)
        assert list(ex.labels[len(prompt_ids) :]) == full[len(prompt_ids) :]
    else:
        assert ex.labels == ex.input_ids


def test_json_list_and_truncation(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "a.json"
    path.write_text(json.dumps(ALPACA))
    examples = load_dataset(path, tok, max_len=20)
    assert len(examples) == 3 and all(len(e.input_ids) == 20 for e in examples)


def test_plain_text_is_cut_into_blocks(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "t.txt"
    path.write_text("hello world. " * 30)
    ids = tok(path.read_text())["input_ids"]
    examples = load_dataset(path, tok, max_len=64)
    assert [t for e in examples for t in e.input_ids] == ids[
        : sum(len(e.input_ids) for e in examples)
    ]
    assert all(len(e.input_ids) <= 64 for e in examples)
    assert sum(len(e.input_ids) for e in examples) >= len(ids) - 1


def test_input_ids_records_need_no_tokenizer(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    examples = load_dataset(path, None, max_len=8)
    assert examples == [Example((1, 2, 3), (1, 2, 3)), Example((4, 5), (4, 5))]
    assert load_token_stream(path).tolist() == [1, 2, 3, 4, 5]


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n\n" + '{"instruction": "x", "output": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        load_dataset(path, tiny_tokenizer())


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("empty.jsonl", "\n\n", "empty dataset"),
        ("empty.txt", "  \n", "empty dataset"),
        ("empty.json", "[]", "empty dataset"),
        ("dict.json", '{"a": 1}', "expected a JSON list"),
        ("keys.jsonl", '{"question": "q"}\n', r"keys\.jsonl:1: record needs 'instruction'"),
        ("ids.jsonl", '{"input_ids": [1, -2]}\n', "token ids >= 0"),
        ("type.jsonl", '{"instruction": 3, "output": "x"}\n', "'instruction' must be a string"),
        ("broken.json", '[{"instruction": "x",', r"broken\.json:1: invalid JSON"),
    ],
)
def test_malformed_files_raise_data_error(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_dataset(path, tiny_tokenizer())


def test_missing_file_directory_and_binary(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        load_dataset(tmp_path)
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match="not UTF-8"):
        load_dataset(binary, tiny_tokenizer())


def test_text_without_tokenizer_is_a_clear_error(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("some text")
    with pytest.raises(DataError, match="needs a tokenizer"):
        load_dataset(path, None)


def test_check_vocab(tmp_path):
    check_vocab([Example((1, 2), (1, 2))], 3, "x")
    with pytest.raises(DataError, match="token id 5 is outside"):
        check_vocab(torch.tensor([1, 5]), 4, "x")


def test_batch_order_is_a_seeded_permutation():
    a = batch_order(10, 3, seed=1, epoch=0)
    assert [len(b) for b in a] == [3, 3, 3, 1]
    assert sorted(i for b in a for i in b) == list(range(10))
    assert a == batch_order(10, 3, seed=1, epoch=0)
    assert a != batch_order(10, 3, seed=1, epoch=1)
    assert a != batch_order(10, 3, seed=2, epoch=0)


def test_collate_pads_right_with_ignored_labels():
    batch = collate([Example((5, 6, 7), (-100, 6, 7)), Example((8,), (8,))], pad_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
