import logging

import datasets

from qlora_cls.data import TokenizedSplit, warn_if_pad_in_inputs


def _ds(ids):
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": [0] * len(ids), "length": [len(x) for x in ids],
                                       "idx": list(range(len(ids)))})


def test_pad_id_inside_inputs_warns(caplog):
    with caplog.at_level(logging.WARNING):
        assert warn_if_pad_in_inputs(_ds([[5, 6, 2], [7, 8]]), pad_id=2) is True
    assert "pad token id 2" in caplog.text
    caplog.clear()
    assert warn_if_pad_in_inputs(_ds([[5, 6], [7, 8, 9]]), pad_id=2) is False and not caplog.text


def test_batcher_pads_right_with_pad_id(tiny_model):
    from qlora_cls.modeling import load_tokenizer
    tok = load_tokenizer(tiny_model)
    tok.pad_token_id = 2
    b = TokenizedSplit(_ds([[5, 6, 7], [8]]), tok, is_regression=False)
    out = b([1, 0])
    assert out["input_ids"].tolist() == [[8, 2, 2], [5, 6, 7]]
    assert out["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert out["labels"].tolist() == [0, 0]
