"""Parity of minbert's BertModel with transformers.BertModel, round trips, and bad-input errors."""
import json

import pytest
import torch

from minbert import BertConfig, BertModel, Tokenizer, default_checkpoint

transformers = pytest.importorskip("transformers")

ODD = dict(vocab_size=97, hidden_size=72, num_hidden_layers=3, num_attention_heads=3, intermediate_size=100,
           max_position_embeddings=40, type_vocab_size=2)


def _random_batch(vocab, b=4, l=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, l), generator=g)
    lengths = torch.tensor([l, l - 5, 3, 1][:b])
    mask = (torch.arange(l)[None] < lengths[:, None]).long()  # (B, L), right padding
    ids = ids * mask
    types = (torch.arange(l)[None] >= (lengths[:, None] // 2)).long() * mask
    return ids, mask, types


def _max_diff(ours, theirs, mask):
    keep = mask.bool()
    return (
        (ours.last_hidden_state - theirs.last_hidden_state)[keep].abs().max().item(),
        (ours.pooler_output - theirs.pooler_output).abs().max().item(),
    )


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory):
    """A randomly initialised HF checkpoint with odd sizes, written by transformers."""
    folder = tmp_path_factory.mktemp("odd")
    torch.manual_seed(3)
    hf = transformers.BertModel(transformers.BertConfig(**ODD))
    hf.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("impl", ["torch", "math"])
def test_parity_embedded_checkpoint(impl):
    folder = default_checkpoint()
    ours = BertModel.from_pretrained(folder, attn_implementation=impl).eval()
    theirs = transformers.BertModel.from_pretrained(str(folder)).eval()
    tok = Tokenizer.from_pretrained(folder)
    batch = tok(["A lovely film, with lovely performances.", "No.", "Naïve café owners don't like zyzzyvas!"],
                ["It was great", "Fine then", "Who knows?"], max_length=32)
    with torch.no_grad():
        diffs = _max_diff(ours(**batch), theirs(**batch), batch["attention_mask"])
    assert max(diffs) <= 1e-5, diffs


@pytest.mark.parametrize("impl", ["torch", "math"])
def test_parity_odd_random_checkpoint(odd_checkpoint, impl):
    ours = BertModel.from_pretrained(odd_checkpoint, attn_implementation=impl).eval()
    theirs = transformers.BertModel.from_pretrained(str(odd_checkpoint)).eval()
    ids, mask, types = _random_batch(ODD["vocab_size"])
    with torch.no_grad():
        diffs = _max_diff(ours(ids, mask, types), theirs(input_ids=ids, attention_mask=mask, token_type_ids=types), mask)
    assert max(diffs) <= 1e-5, diffs


def test_weight_names_match_transformers(odd_checkpoint):
    ours = BertModel(BertConfig(**ODD))
    theirs = transformers.BertModel(transformers.BertConfig(**ODD))
    theirs_keys = {k for k in theirs.state_dict() if not k.endswith("position_ids")}
    assert set(ours.state_dict()) == theirs_keys


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(5)
    ours = BertModel(BertConfig(**ODD)).eval()
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    theirs = transformers.BertModel.from_pretrained(str(tmp_path)).eval()
    ids, mask, types = _random_batch(ODD["vocab_size"], seed=7)
    with torch.no_grad():
        a = ours(ids, mask, types)
        b = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert torch.equal(a.pooler_output, b.pooler_output)
    assert torch.equal(a.last_hidden_state[mask.bool()], b.last_hidden_state[mask.bool()])
    again = BertModel.from_pretrained(tmp_path).eval()
    assert all(torch.equal(x, y) for x, y in zip(ours.state_dict().values(), again.state_dict().values()))


def test_bert_prefix_and_cls_heads_are_accepted(tmp_path):
    torch.manual_seed(2)
    hf = transformers.BertForPreTraining(transformers.BertConfig(**ODD))  # keys "bert.*" and "cls.*"
    hf.save_pretrained(str(tmp_path))
    ours = BertModel.from_pretrained(tmp_path).eval()
    ids, mask, types = _random_batch(ODD["vocab_size"])
    with torch.no_grad():
        diffs = _max_diff(ours(ids, mask, types), hf.bert.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types), mask)
    assert max(diffs) <= 1e-5


def test_pytorch_model_bin_is_loaded(tmp_path):
    torch.manual_seed(4)
    src = BertModel(BertConfig(**ODD))
    torch.save({"bert." + k: v for k, v in src.state_dict().items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(src.config.to_dict()))
    loaded = BertModel.from_pretrained(tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(src.state_dict().values(), loaded.state_dict().values()))


def test_dropout_and_grad_flow():
    model = BertModel(BertConfig(**ODD)).train()
    ids, mask, types = _random_batch(ODD["vocab_size"])
    out = model(ids, mask, types)
    out.pooler_output.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_encoder_input_and_start_layer_reproduce_forward():
    model = BertModel(BertConfig(**ODD)).eval()
    ids, mask, types = _random_batch(ODD["vocab_size"])
    full = model(ids, mask, types, output_hidden_states=True)
    emb = model.embed(ids, types)
    assert torch.equal(model(attention_mask=mask, encoder_input=emb).last_hidden_state, full.last_hidden_state)
    mid = full.hidden_states[2]  # the input of layer 2
    assert torch.allclose(model(attention_mask=mask, encoder_input=mid, start_layer=2).last_hidden_state,
                          full.last_hidden_state, atol=1e-6)


# ---- configuration and bad input -----------------------------------------------------------

def test_config_rejects_invalid_values():
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        BertConfig(num_hidden_layers=0)
    with pytest.raises(ValueError, match="attn_implementation"):
        BertConfig(attn_implementation="flash")


def test_config_keeps_unknown_fields(tmp_path):
    data = {**ODD, "model_type": "bert", "some_future_field": 3, "architectures": ["BertModel"]}
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = BertConfig.from_json_file(tmp_path / "config.json")
    assert cfg.extra["some_future_field"] == 3
    assert cfg.to_dict()["some_future_field"] == 3


def test_missing_folder():
    with pytest.raises(FileNotFoundError, match="not found"):
        BertModel.from_pretrained("/nonexistent/folder/bert")


def test_missing_weights_file(tmp_path):
    BertConfig(**ODD).to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        BertModel.from_pretrained(tmp_path)


def test_corrupt_safetensors(tmp_path):
    BertModel(BertConfig(**ODD)).save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="model.safetensors.*corrupt"):
        BertModel.from_pretrained(tmp_path)


def test_shape_mismatched_and_missing_keys_listed_together(tmp_path):
    model = BertModel(BertConfig(**ODD))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    state["encoder.layer.0.attention.self.query.weight"] = torch.zeros(5, 5)
    del state["pooler.dense.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        BertModel.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "encoder.layer.0.attention.self.query.weight: checkpoint (5, 5) vs model (72, 72)" in msg
    assert "pooler.dense.bias" in msg and "missing keys" in msg


def test_input_ids_out_of_vocab():
    model = BertModel(BertConfig(**ODD))
    ids = torch.tensor([[1, 2, ODD["vocab_size"]]])
    with pytest.raises(ValueError, match=r"input_ids contains id 97 outside the vocabulary \[0, 97\)"):
        model(ids)


def test_attention_mask_wrong_shape():
    model = BertModel(BertConfig(**ODD))
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(B, L\) = \(2, 5\), got \(2, 4\)"):
        model(ids, torch.ones(2, 4, dtype=torch.long))


def test_input_too_long_and_bad_dtype():
    model = BertModel(BertConfig(**ODD))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.ones(1, 41, dtype=torch.long))
    with pytest.raises(TypeError, match="int64 or int32"):
        model(torch.ones(1, 4))
