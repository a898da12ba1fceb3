import pytest
import torch
from transformers import AutoTokenizer

from evaluators.text import CalibrationSplit, TextError, load_text, text_blocks, to_blocks


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "wikitext2_raw").mkdir()
    (tmp_path / "wikitext2_raw" / "wiki.test.raw").write_bytes(b" = Title = \r\n Body one . \r\n Body two . \r\n")
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(" a b c \n d e \n")
    return tmp_path


def test_named_sets_read_the_local_copy_with_their_row_joins(data_dir):
    assert load_text("wikitext2:test", data_dir) == " = Title = \n\n Body one . \n\n Body two . "
    assert load_text("ptb:test", data_dir) == " a b c \n d e "


def test_unknown_and_unreachable_texts_say_what_to_do(data_dir, monkeypatch):
    with pytest.raises(TextError, match="unknown text 'wiki'"):
        load_text("wiki", data_dir)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TextError, match="--data-dir"):
        load_text("ptb:validation", data_dir)


def test_blocks_are_non_overlapping_windows():
    ids = torch.arange(10)
    assert torch.equal(to_blocks(ids, 3), torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]]))
    assert to_blocks(ids, 3, max_blocks=2).shape == (2, 3)
    with pytest.raises(TextError, match="fewer than one window"):
        to_blocks(ids, 11)


def test_tokenization_is_cached_and_split_is_disjoint(llama_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("GAPRUNE_CACHE", str(tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    first = text_blocks(str(text_file), tokenizer, 32)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 1
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: pytest.fail("tokenized twice"))
    again = text_blocks(str(text_file), tokenizer, 32)
    assert torch.equal(first, again)
    split = CalibrationSplit.cut(first, 4, 3)
    assert torch.equal(split.score, first[:4]) and torch.equal(split.tune, first[4:7])
    with pytest.raises(TextError, match="asked for"):
        CalibrationSplit.cut(first[:5], 4, 3, name="tiny")
