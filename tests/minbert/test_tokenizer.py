"""minbert.Tokenizer against transformers.BertTokenizerFast on the same vocabulary."""
import shutil

import pytest
import torch

from minbert import Tokenizer, default_checkpoint

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "Hello, world! It's a lovely film -- isn't it?",
    "Naïve café résumé: Ångström, Über, façade.",
    "zyzzyvas quixotically flummoxed the xylophonist",
    "   leading and trailing spaces   ",
    "Numbers 3.14159 and $100,000; emails a@b.com; URLs http://x.y/z?q=1",
    "中文字符 and emoji 🙂 mixed",
    "a",
]
PAIRS = ["Second sentence.", "Another one, longer than the first by a fair margin indeed.", "x", "", "?", "y z", "b"]


def _hf_tokenizer():
    """transformers' fast BERT tokenizer built from the checkpoint's vocab.txt alone."""
    import tempfile

    folder = tempfile.mkdtemp()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_checkpoint() / name, folder)
    return transformers.BertTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="module", params=["tokenizer.json", "vocab.txt"])
def folders(request, tmp_path_factory):
    """The embedded checkpoint as shipped (tokenizer.json) and reduced to vocab.txt only."""
    src = default_checkpoint()
    if request.param == "tokenizer.json":
        return src
    dst = tmp_path_factory.mktemp("vocab_only")
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, dst / name)
    return dst


@pytest.mark.parametrize("max_length", [8, 64])
def test_single_sentences_match_transformers(folders, max_length):
    ours = Tokenizer.from_pretrained(folders)
    theirs = _hf_tokenizer()
    got = ours(SENTENCES, max_length=max_length)
    want = theirs(SENTENCES, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("max_length", [12, 64])
def test_pairs_match_transformers(folders, max_length):
    ours = Tokenizer.from_pretrained(folders)
    theirs = _hf_tokenizer()
    got = ours(SENTENCES, PAIRS, max_length=max_length)
    want = theirs(SENTENCES, PAIRS, padding=True, truncation="longest_first", max_length=max_length, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(got[key], want[key]), key


def test_dynamic_padding_to_longest():
    tok = Tokenizer.from_pretrained()
    out = tok(["short", "a much longer sentence with many words"], max_length=128)
    assert out["input_ids"].shape[1] == out["attention_mask"].sum(1).max().item()
    assert out["input_ids"].dtype == torch.long


def test_errors():
    tok = Tokenizer.from_pretrained()
    with pytest.raises(ValueError, match="texts_pair has 1"):
        tok(["a", "b"], ["c"])
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        tok(["a", 3])
    with pytest.raises(ValueError, match="max_length"):
        tok(["a"], max_length=1)


def test_save_and_reload(tmp_path):
    tok = Tokenizer.from_pretrained()
    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    a, b = tok(SENTENCES, max_length=32), again(SENTENCES, max_length=32)
    assert all(torch.equal(a[k], b[k]) for k in a)
