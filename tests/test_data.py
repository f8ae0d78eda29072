"""Tests for trustrl.data: every format loads the same rows, bad rows are named, prompts format.

Expected values are written out by hand; no expected value is computed with trustrl.data.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest

from trustrl.data import (DataError, LoadedRows, encode_prompt, encode_rendered_text, format_prompt, load_rows,
                          write_jsonl)

ROWS: list[dict[str, Any]] = [
    {"prompt": "What is 2+3?", "answer": "5"},
    {"prompt": "Héllo ✓ — what is 10/4?", "answer": "2.5"},
    {"prompt": "Say hi", "answer": "hi"},
]


# ---------------------------------------------------------------------------- file writers


def _write_jsonl_bytes(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _jsonl(tmp: Path) -> Path:
    return _write_jsonl_bytes(tmp / "d.jsonl", [json.dumps(r).encode() for r in ROWS])


def _json_lines(tmp: Path) -> Path:
    return _write_jsonl_bytes(tmp / "d.json", [json.dumps(r, ensure_ascii=False).encode() for r in ROWS])


def _json_array(tmp: Path) -> Path:
    p = tmp / "arr.json"
    p.write_text(json.dumps(ROWS, indent=2, ensure_ascii=False), encoding="utf-8")
    return p


def _csv(tmp: Path) -> Path:
    p = tmp / "d.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "answer"])
        w.writeheader()
        w.writerows(ROWS)
    return p


def _parquet(tmp: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    return p


def _hf_dir(tmp: Path) -> Path:
    import datasets

    p = tmp / "hf_ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(p))
    return p


def _hf_dict_dir(tmp: Path) -> Path:
    import datasets

    p = tmp / "hf_dict"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS),
            "test": datasets.Dataset.from_list([{"prompt": "only test", "answer": "0"}]),
        }
    ).save_to_disk(str(p))
    return p


@pytest.mark.parametrize(
    "writer", [_jsonl, _json_lines, _json_array, _csv, _parquet, _hf_dir, _hf_dict_dir]
)
def test_every_format_loads_the_same_rows(tmp_path: Path, writer: Any) -> None:
    path = writer(tmp_path)
    loaded = load_rows(path, required=("prompt", "answer"))
    assert isinstance(loaded, LoadedRows)
    assert loaded.rows == ROWS
    assert loaded.skipped == 0
    assert loaded.path == path


def test_dataset_dict_split_and_missing_split(tmp_path: Path) -> None:
    path = _hf_dict_dir(tmp_path)
    assert load_rows(path, split="test").rows == [{"prompt": "only test", "answer": "0"}]
    with pytest.raises(DataError, match=r"split 'validation' not found.*\['test', 'train'\]"):
        load_rows(path, split="validation")


def test_limit_stops_after_n_valid_rows(tmp_path: Path) -> None:
    loaded = load_rows(_jsonl(tmp_path), limit=2)
    assert loaded.rows == ROWS[:2]


def test_bom_and_blank_lines_are_tolerated_and_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "b.jsonl"
    # line 1: BOM + row, line 2: blank, line 3: row with empty prompt
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n\n{"prompt": "  "}\n')
    with pytest.raises(DataError) as ei:
        load_rows(p)
    assert ei.value.row == 3 and ei.value.row_label == "line 3"


# ---------------------------------------------------------------------------- bad rows


def _bad_jsonl(tmp: Path) -> Path:
    # line numbers:            1 ok, 2 missing prompt, 3 empty prompt, 4 wrong type,
    #                          5 invalid UTF-8, 6 invalid JSON, 7 ok
    return _write_jsonl_bytes(
        tmp / "bad.jsonl",
        [
            b'{"prompt": "good one", "answer": 1}',
            b'{"question": "no prompt", "answer": 2}',
            b'{"prompt": "   ", "answer": 3}',
            b'{"prompt": "fine", "answer": "four"}',
            b'{"prompt": "bad \xff\xfe bytes", "answer": 5}',
            b'{"prompt": "broken", "answer": 6',
            b'{"prompt": "good two", "answer": 7}',
        ],
    )


@pytest.mark.parametrize(
    ("keep_lines", "line", "column", "message"),
    [
        ([2], 2, "prompt", r"required field missing"),
        ([3], 3, "prompt", r"empty or whitespace-only"),
        ([4], 4, "answer", r"expected int, got str 'four'"),
        # '{"prompt": "bad ' is 16 bytes, so the first bad byte is at offset 16
        ([5], 5, None, r"invalid UTF-8 bytes b'\\xff' at byte 16"),
        ([6], 6, None, r"invalid JSON"),
    ],
)
def test_each_bad_row_kind_names_file_line_and_column(
    tmp_path: Path, keep_lines: list[int], line: int, column: str | None, message: str
) -> None:
    src = _bad_jsonl(tmp_path).read_bytes().split(b"\n")
    # Keep line 1 (good) and the one bad line, preserving its line number by blanking others.
    kept = [src[i - 1] if i == 1 or i in keep_lines else b"" for i in range(1, 8)]
    p = _write_jsonl_bytes(tmp_path / "one_bad.jsonl", kept)
    with pytest.raises(DataError, match=message) as ei:
        load_rows(p, types={"answer": int})
    err = ei.value
    assert err.path == p and err.row == line and err.column == column
    text = str(err)
    assert str(p) in text and f"line {line}" in text
    if column is not None:
        assert f"column '{column}'" in text


def test_skip_bad_counts_the_five_bad_rows(tmp_path: Path) -> None:
    loaded = load_rows(_bad_jsonl(tmp_path), types={"answer": int}, skip_bad=True)
    # Lines 2..6 are bad, lines 1 and 7 are good.
    assert loaded.rows == [{"prompt": "good one", "answer": 1}, {"prompt": "good two", "answer": 7}]
    assert loaded.skipped == 5


def test_skip_bad_still_raises_when_every_row_is_bad(tmp_path: Path) -> None:
    p = _write_jsonl_bytes(tmp_path / "all_bad.jsonl", [b'{"prompt": ""}', b'{"x": 1}'])
    with pytest.raises(DataError, match=r"all 2 rows are invalid") as ei:
        load_rows(p, skip_bad=True)
    assert ei.value.row == 1  # the first bad row is reported


def test_first_bad_row_raises_without_skip_bad(tmp_path: Path) -> None:
    with pytest.raises(DataError) as ei:
        load_rows(_bad_jsonl(tmp_path), types={"answer": int})
    assert ei.value.row == 2 and ei.value.column == "prompt"


def test_csv_bad_rows_name_the_physical_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    # line 1 header, line 2 ok, line 3 empty prompt cell (= null), line 4 invalid UTF-8,
    # line 5 ok
    p.write_bytes(b'prompt,answer\n"ok",1\n,2\n"bad \xff",3\n"fine",4\n')
    with pytest.raises(DataError, match=r"required field is null") as ei:
        load_rows(p)
    assert ei.value.row_label == "line 3" and ei.value.column == "prompt" and str(p) in str(ei.value)
    loaded = load_rows(p, skip_bad=True, types={"answer": int})
    # CSV cells are strings; types={"answer": int} converts them.
    assert loaded.rows == [{"prompt": "ok", "answer": 1}, {"prompt": "fine", "answer": 4}]
    assert loaded.skipped == 2


def test_csv_invalid_utf8_names_line(tmp_path: Path) -> None:
    p = tmp_path / "u.csv"
    p.write_bytes(b'prompt\n"ok"\n"multi\nline \xff"\n')  # the bad record spans lines 3-4
    with pytest.raises(DataError, match=r"invalid UTF-8") as ei:
        load_rows(p)
    assert ei.value.row == 4 and str(p) in str(ei.value)


def test_csv_type_conversion_failure_is_a_data_error(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("prompt,answer\nq,12\nq2,twelve\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3: column 'answer': expected int or float, got str"):
        load_rows(p, types={"answer": (int, float)})


def test_json_array_bad_item_and_bad_syntax(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_text('[{"prompt": "x"}, {"prompt": 3}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"item 2: column 'prompt': expected a string or a list of chat"):
        load_rows(p)
    p.write_text('[\n{"prompt": "x"},\n{"prompt": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3: invalid JSON"):
        load_rows(p)


def test_parquet_and_datasets_use_zero_based_row_index(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "a", "answer": 1}, {"prompt": None, "answer": 2}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"row index 1: column 'prompt': required field is null"):
        load_rows(tmp_path / "n.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "nds"))
    with pytest.raises(DataError, match=r"row index 1: column 'prompt'"):
        load_rows(tmp_path / "nds")


def test_bool_is_not_int_but_int_is_float(tmp_path: Path) -> None:
    p = _write_jsonl_bytes(tmp_path / "b.jsonl", [b'{"prompt": "a", "x": 2, "y": true}'])
    assert load_rows(p, types={"x": float}).rows == [{"prompt": "a", "x": 2, "y": True}]
    with pytest.raises(DataError, match=r"column 'y': expected int, got bool"):
        load_rows(p, types={"y": int})


def test_chat_message_prompts_are_accepted_and_checked(tmp_path: Path) -> None:
    good = {"prompt": [{"role": "user", "content": "hi"}]}
    p = _write_jsonl_bytes(tmp_path / "c.jsonl", [json.dumps(good).encode(), b'{"prompt": []}'])
    with pytest.raises(DataError, match=r"line 2: column 'prompt': empty list of chat messages"):
        load_rows(p)
    assert load_rows(p, skip_bad=True).rows == [good]


def test_empty_missing_and_unknown_files(tmp_path: Path) -> None:
    for name in ("e.jsonl", "e.csv"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(DataError, match=r"empty"):
            load_rows(tmp_path / name)
    (tmp_path / "h.csv").write_text("prompt,answer\n", encoding="utf-8")  # header only
    with pytest.raises(DataError, match=r"empty"):
        load_rows(tmp_path / "h.csv")
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows(missing)
    (tmp_path / "x.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'"):
        load_rows(tmp_path / "x.txt")
    with pytest.raises(ValueError, match=r"split="):
        load_rows(_jsonl(tmp_path), split="train")


# ---------------------------------------------------------------------------- write_jsonl


def test_write_jsonl_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "out.jsonl"
    write_jsonl(out, ROWS)
    assert load_rows(out, required=("prompt", "answer")).rows == ROWS
    # A failing write leaves the previous file untouched and no temp file behind.
    with pytest.raises(TypeError, match=r"row 1 cannot be encoded as JSON"):
        write_jsonl(out, [{"prompt": "new"}, {"prompt": object()}])
    assert load_rows(out).rows == ROWS
    assert sorted(os.listdir(out.parent)) == ["out.jsonl"]
    with pytest.raises(TypeError, match=r"row 0 is list"):
        write_jsonl(out, [["not", "a", "dict"]])  # type: ignore[list-item]


# ---------------------------------------------------------------------------- format_prompt

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tokenizer(with_template: bool) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "hello", "world"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    if with_template:
        tok.chat_template = TEMPLATE
    return tok


def test_format_prompt_without_template_returns_plain_text() -> None:
    tok = _tokenizer(with_template=False)
    assert format_prompt(tok, "hello world") == "hello world"
    assert format_prompt(tok, "hello", system_prompt="Be brief.") == "Be brief.\n\nhello"
    with pytest.raises(ValueError, match=r"use_chat_template=True but tokenizer .* has no chat_template"):
        format_prompt(tok, "hello", use_chat_template=True)
    with pytest.raises(ValueError, match=r"list of chat messages but tokenizer"):
        format_prompt(tok, [{"role": "user", "content": "hi"}])


def test_format_prompt_with_template() -> None:
    tok = _tokenizer(with_template=True)
    # None + template present -> template applied; the string becomes one user message.
    assert format_prompt(tok, "hello") == "<|user|>hello\n<|assistant|>"
    assert format_prompt(tok, "hello", use_chat_template=False) == "hello"
    assert (
        format_prompt(tok, "hello", system_prompt="Be brief.")
        == "<|system|>Be brief.\n<|user|>hello\n<|assistant|>"
    )
    msgs = [{"role": "system", "content": "Own."}, {"role": "user", "content": "q"}]
    # The row's own system message wins over the default system_prompt.
    assert format_prompt(tok, msgs, system_prompt="Default.") == "<|system|>Own.\n<|user|>q\n<|assistant|>"
    with pytest.raises(ValueError, match=r"use_chat_template=False"):
        format_prompt(tok, msgs, use_chat_template=False)


# ---------------------------------------------------------------------------- the BOS policy

# A character tokenizer built here (independent of trustrl.tiny): <pad>=0 <s>=1 </s>=2 <unk>=3,
# then a=4 b=5 ... z=29, " "=30, "|"=31, "<"=32, ">"=33, "\n"=34.
_CHARS = "abcdefghijklmnopqrstuvwxyz |<>\n"
# the template writes the BOS itself, as Llama 2/3, Mistral and Gemma templates do
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
PLAIN_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<assistant>{% endif %}")
# ids by hand: "<user>" = < u s e r > = 32 24 22 8 21 33; "hi" = 11 12; "\n" = 34;
# "<assistant>" = < a s s i s t a n t > = 32 4 22 22 12 22 23 4 17 23 33; "<system>" =
# < s y s t e m > = 32 22 28 22 23 8 16 33; "be" = 5 8
USER, HI, NL = [32, 24, 22, 8, 21, 33], [11, 12], [34]
ASSISTANT = [32, 4, 22, 22, 12, 22, 23, 4, 17, 23, 33]
SYSTEM, BE = [32, 22, 28, 22, 23, 8, 16, 33], [5, 8]


def _char_tokenizer(bos: bool, template: str | None):
    """With ``bos``: a BOS token that ``add_special_tokens=True`` prepends (a post-processor
    like Llama's); without: no BOS at all (like Qwen's)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # "\\n" too
    core.add_special_tokens(specials)
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                            special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>" if bos else None, eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    if template is not None:
        tok.chat_template = template
    return tok


def test_bos_policy_plain_text_gets_one_bos_with_or_without_system_prompt() -> None:
    tok = _char_tokenizer(bos=True, template=None)
    assert tok("hi")["input_ids"] == [1, 11, 12]  # the tokenizer itself adds the BOS
    assert encode_prompt(tok, "hi") == ("hi", [1, *HI])
    # the defect: a system prompt made the text differ from the row, which was taken for
    # "templated" and the BOS was dropped
    assert encode_prompt(tok, "hi", system_prompt="be") == ("be\n\nhi", [1, *BE, 34, 34, *HI])
    # a template-holding tokenizer asked for plain text: plain text, BOS added
    tok_t = _char_tokenizer(bos=True, template=BOS_TEMPLATE)
    assert encode_prompt(tok_t, "hi", use_chat_template=False, system_prompt="be")[1] == [1, *BE, 34, 34, *HI]


def test_bos_policy_template_text_keeps_the_templates_single_bos() -> None:
    tok = _char_tokenizer(bos=True, template=BOS_TEMPLATE)
    text, ids = encode_prompt(tok, "hi")
    assert text == "<s><user>hi\n<assistant>"
    assert tok(text)["input_ids"][:2] == [1, 1]  # what encoding it with special tokens would do
    assert ids == [1, *USER, *HI, *NL, *ASSISTANT]
    text, ids = encode_prompt(tok, [{"role": "user", "content": "hi"}], system_prompt="be")
    assert text == "<s><system>be\n<user>hi\n<assistant>"
    assert ids == [1, *SYSTEM, *BE, *NL, *USER, *HI, *NL, *ASSISTANT]
    # a template that writes no BOS: none is added (as apply_chat_template(tokenize=True) does)
    tok_plain = _char_tokenizer(bos=True, template=PLAIN_TEMPLATE)
    assert encode_prompt(tok_plain, "hi")[1] == [*USER, *HI, *NL, *ASSISTANT]


def test_bos_policy_tokenizer_without_bos() -> None:
    tok = _char_tokenizer(bos=False, template=None)
    assert tok.bos_token is None
    assert encode_prompt(tok, "hi", system_prompt="be")[1] == [*BE, 34, 34, *HI]
    assert encode_rendered_text(tok, "hi") == HI
    tok_t = _char_tokenizer(bos=False, template=PLAIN_TEMPLATE)
    assert encode_prompt(tok_t, "hi")[1] == [*USER, *HI, *NL, *ASSISTANT]


def test_encode_rendered_text_adds_a_bos_only_where_none_is_written() -> None:
    tok = _char_tokenizer(bos=True, template=BOS_TEMPLATE)
    assert encode_rendered_text(tok, "hi") == [1, *HI]
    assert encode_rendered_text(tok, "<s><user>hi\n") == [1, *USER, *HI, *NL]
    # the prompt text of a template-holding tokenizer, rendered, then encoded: one BOS
    text, ids = encode_prompt(tok, "hi", system_prompt="be")
    assert encode_rendered_text(tok, text) == ids
