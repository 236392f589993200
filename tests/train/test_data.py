"""Parsing of GLUE layouts, JSONL and E2E; typed errors with file and line; batch schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.errors import LoraError
from lorakit.train.batching import IGNORE, Schedule, encode_lm
from lorakit.train.data import (
    MRGroup,
    get_task,
    load_task_data,
    read_e2e,
    read_examples,
    read_glue_tsv,
    read_jsonl,
    split_by_mr,
    subsample,
)
from lorakit.train.errors import DataError, UnknownTaskError

from .conftest import shared_data


def write(path: Path, text: str, bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def test_task_lookup_is_forgiving_and_unknown_lists_known() -> None:
    assert get_task("SST-2").name == "sst2" and get_task("sts_b").kind == "regression"
    with pytest.raises(UnknownTaskError, match="known tasks: sst2, mrpc, rte, cola, stsb, e2e"):
        get_task("mnli")
    assert issubclass(UnknownTaskError, LoraError)


def test_sst2_header_and_labels(tmp_path: Path) -> None:
    ex = read_glue_tsv(
        write(tmp_path / "a.tsv", "sentence\tlabel\ngood film \t1\nbad film\t0\n"), get_task("sst2")
    )
    assert [(e.text, e.text_pair, e.label) for e in ex] == [("good film", None, 1), ("bad film", None, 0)]


def test_mrpc_bom_and_quotes(tmp_path: Path) -> None:
    text = 'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\t" He said .\tHe said " it " .\n'
    ex = read_glue_tsv(write(tmp_path / "m.tsv", text, bom=True), get_task("mrpc"))
    assert ex[0].text == '" He said .' and ex[0].text_pair == 'He said " it " .' and ex[0].label == 1


def test_cola_has_no_header(tmp_path: Path) -> None:
    ex = read_glue_tsv(
        write(tmp_path / "c.tsv", "gj04\t1\t\tThe dog barked.\ngj04\t0\t*\tDog the barked.\n"),
        get_task("cola"),
    )
    assert [e.label for e in ex] == [1, 0] and ex[0].text == "The dog barked."


def test_rte_string_labels_and_stsb_float(tmp_path: Path) -> None:
    rte = read_glue_tsv(
        write(tmp_path / "r.tsv", "index\ts1\ts2\tlabel\n0\tA.\tB.\tnot_entailment\n"), get_task("rte")
    )
    assert rte[0].label == 1
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    sts = read_glue_tsv(
        write(tmp_path / "s.tsv", head + "0\tg\tf\t2012\t1\tn\tn\tA man.\tA guy.\t4.250\n"), get_task("stsb")
    )
    assert sts[0].label == pytest.approx(4.25) and sts[0].text_pair == "A guy."


@pytest.mark.parametrize(
    ("task", "text", "match"),
    [
        ("sst2", "sentence\tlabel\ngood\t1\nbad line without tab\n", r"b\.tsv:3: expected 2 tab-separated"),
        ("sst2", "sentence\tlabel\ngood\t1\nbad\t2\n", r"b\.tsv:3: label '2' is not in the sst2 label set"),
        ("rte", "i\ta\tb\tlabel\n0\tA\tB\tcontradiction\n", "not in the rte label set"),
        (
            "stsb",
            "h\th\th\th\th\th\th\th\th\th\n0\tg\tf\ty\to\ts\ts\tA\tB\t7.5\n",
            "outside the task's range",
        ),
        ("stsb", "h\th\th\th\th\th\th\th\th\th\n0\tg\tf\ty\to\ts\ts\tA\tB\tx\n", "is not a number"),
        ("cola", "gj04\t1\t\tok.\ngj04\t1\tok\n", r"b\.tsv:2: expected 4 .*no header"),
        ("sst2", "sentence\tlabel\n", "no examples"),
        ("sst2", "\n\n", "file is empty"),
    ],
)
def test_malformed_input_names_file_and_line(tmp_path: Path, task: str, text: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        read_glue_tsv(write(tmp_path / "b.tsv", text), get_task(task))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_glue_tsv(tmp_path / "nope.tsv", get_task("sst2"))
    with pytest.raises(DataError, match="--train-file or --data-dir"):
        load_task_data(get_task("sst2"), tmp_path)


def test_jsonl(tmp_path: Path) -> None:
    rows = [
        {"text": "a", "text_pair": "b", "label": "entailment"},
        {"text": "c", "text_pair": "d", "label": 1},
    ]
    p = write(tmp_path / "x.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert [e.label for e in read_examples(p, get_task("rte"))] == [0, 1]
    with pytest.raises(DataError, match=r"x\.jsonl:1: .*text_pair"):
        read_jsonl(write(tmp_path / "x.jsonl", '{"text": "a", "label": 0}\n'), get_task("mrpc"))
    with pytest.raises(DataError, match=r"x\.jsonl:2: invalid JSON"):
        read_jsonl(write(tmp_path / "x.jsonl", '{"text": "a", "label": 0}\n{oops\n'), get_task("sst2"))


E2E = """name : A | food : Thai||A serves Thai food .
name : A | food : Thai||Thai food is served at A .
name : B | area : riverside||B is by the river .
name : C | area : city centre||C is central .
name : D | eatType : pub||D is a pub .
"""


def test_e2e_groups_and_split_by_mr(tmp_path: Path) -> None:
    groups = read_e2e(write(tmp_path / "e.txt", E2E))
    assert [g.mr for g in groups][:2] == ["name : A | food : Thai", "name : B | area : riverside"]
    assert groups[0].refs == ["A serves Thai food .", "Thai food is served at A ."]
    tr, dev = split_by_mr(groups, 0.5, seed=1)
    assert {g.mr for g in tr}.isdisjoint({g.mr for g in dev}) and len(tr) + len(dev) == 4
    tr2, dev2 = split_by_mr(groups, 0.5, seed=1)
    assert [g.mr for g in dev] == [g.mr for g in dev2]  # deterministic
    with pytest.raises(DataError, match=r"e\.txt:2: expected 'field : value"):
        read_e2e(write(tmp_path / "e.txt", "name : A||x\nno separator here\n"))
    with pytest.raises(DataError, match="MR item 'oops'"):
        read_e2e(write(tmp_path / "e.txt", "name : A | oops||x\n"))


class CharTokenizer:
    """Minimal tokenizer stand-in: one id per character; like Llama's, it adds BOS 1 itself (EOS 2)."""

    bos_token_id = 1
    eos_token_id = 2
    eos_token = "\x02"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [2 if c == "\x02" else ord(c) for c in text]
        return {"input_ids": [1] + ids if add_special_tokens else ids}


def test_lm_features_put_loss_on_text_only() -> None:
    feats = encode_lm([MRGroup("n : A", ["hi"])], CharTokenizer(), max_len=64)
    (f,) = feats
    prompt = "n : A\nDescription:"
    prompt_len = 1 + len(prompt)  # the tokenizer's own BOS is kept
    assert f.input_ids[:prompt_len] == [1] + [ord(c) for c in prompt]
    assert f.label[:prompt_len] == [IGNORE] * prompt_len  # type: ignore[index]
    assert f.label[prompt_len:] == [ord(" "), ord("h"), ord("i"), 2]  # type: ignore[index]
    assert f.units == 4
    (g,) = encode_lm([MRGroup("n : A", ["hi"])], SmolLikeCharTokenizer(), max_len=64)
    assert g.input_ids[: len(prompt)] == [ord(c) for c in prompt]  # bos_token set, but never forced in


class SmolLikeCharTokenizer(CharTokenizer):
    """Has a bos_token (as SmolLM2's <|im_start|>) but, like SmolLM2's tokenizer, never adds it."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return super().__call__(text, add_special_tokens=False)


def test_schedule_is_deterministic_and_ranks_partition_the_global_batch() -> None:
    s1 = Schedule(50, micro_batch=4, grad_accum=2, world_size=1, seed=0)
    s2 = Schedule(50, micro_batch=2, grad_accum=2, world_size=2, seed=0)
    assert s1.global_batch == s2.global_batch == 8 and s1.steps_per_epoch == 6
    for step in (0, 5, 6, 13):
        g = s1.global_indices(step)
        assert g == s2.global_indices(step) and len(set(g)) == 8
        parts = [i for r in range(2) for mb in s2.rank_micro_batches(step, r) for i in mb]
        assert parts == g
    assert s1.global_indices(0) != s1.global_indices(6)  # a new permutation each epoch
    assert subsample(list(range(10)), 3, 0) == subsample(list(range(10)), 3, 0)


def test_shared_glue_and_e2e_files_parse() -> None:
    root = shared_data()
    sizes = {"sst2": 872, "mrpc": 408, "rte": 277, "cola": 1043, "stsb": 1500}
    for task, n in sizes.items():
        ex = read_glue_tsv(root / "glue" / get_task(task).glue_dir / "dev.tsv", get_task(task))
        assert len(ex) == n, task
    assert not read_glue_tsv(root / "glue/MRPC/dev.tsv", get_task("mrpc"))[0].text.startswith("\ufeff")
    tr, dev = load_task_data(get_task("e2e"), root, seed=0)
    assert len(tr) + len(dev) == 547 and {g.mr for g in tr}.isdisjoint({g.mr for g in dev})
