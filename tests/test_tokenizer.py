"""ALBEF's single-sentence template: [CLS] tokens, no trailing [SEP]; truncation and padding as the original."""
import pytest
import torch

from models.tokenizer import load_tokenizer, tokenize

SENTENCES = ["a red circle left of a blue square", "two green stars", "a large yellow triangle above a cross",
             "there are three shapes on a gray background"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(SENTENCES * 10, vocab_size=120,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    hf = BertTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                           cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", do_lower_case=True)
    folder = tmp_path_factory.mktemp("tok")
    hf.save_pretrained(str(folder))
    return load_tokenizer(str(folder))


def test_no_trailing_sep_and_leading_cls(tok):
    enc = tokenize(tok, SENTENCES, max_length=25)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (ids[:, 0] == tok.cls_token_id).all()
    assert not (ids == tok.sep_token_id).any()
    # same ids as the stock tokenizer minus its [SEP]
    for i, s in enumerate(SENTENCES):
        ref = tok(s)["input_ids"]
        assert ref[-1] == tok.sep_token_id
        n = int(mask[i].sum())
        assert ids[i, :n].tolist() == ref[:-1]
        assert (ids[i, n:] == tok.pad_token_id).all()
    assert ids.shape[1] == max(len(tok(s)["input_ids"]) - 1 for s in SENTENCES)  # 'longest' padding
    assert int(mask.sum(1).max()) == ids.shape[1]


def test_truncation_counts_cls_in_max_length(tok):
    long = " ".join(["red circle"] * 40)
    enc = tokenize(tok, [long, "two green stars"], max_length=25)
    assert enc["input_ids"].shape == (2, 25)
    assert enc["attention_mask"][0].sum() == 25  # [CLS] + 24 word pieces, as the original
    assert enc["input_ids"][0, -1] != tok.sep_token_id


def test_max_length_padding(tok):
    enc = tokenize(tok, ["two green stars"], max_length=30, padding="max_length")
    assert enc["input_ids"].shape == (1, 30) and enc["attention_mask"].dtype == torch.long
    with pytest.raises(ValueError):
        tokenize(tok, ["x"], max_length=30, padding="do_not_pad")


def test_load_tokenizer_errors(tmp_path):
    from models.pretrained import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="not-a-real-tokenizer-name"):
        load_tokenizer("someone/not-a-real-tokenizer-name")
