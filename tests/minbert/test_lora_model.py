"""LoRA in minbert (minbert/lora.py): applying, freezing, merging, adapter files, per-task adapters,
layer selection, validation, checkpoint compatibility and LoRA training runs.

The suite's kernel backend is the torch reference, so "exactly the base outputs" is exact; one
test runs a tiny model through the Triton kernel (interpreted on CPU) against float64.
"""
import json
import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minbert import BertConfig, BertModel
from minbert.cli import main
from minbert.lora import (
    LoRALinear, apply_lora, count_trainable, load_adapters, lora_config, lora_modules, lora_parameter_count,
    lora_state_dict, merge_lora, merged_state_dict, read_adapter_config, save_adapters, unmerge_lora,
)
from minbert.lora import _resolve_layers
from minbert.run_dir import load_model_dir
from minbert.train_config import load_config

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "train"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
H, I = 32, 48  # hidden and intermediate sizes of the tiny models
TASKS = ["sst", "quora", "sts"]
ALL_PATHS = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"]
SIZES = {  # (in, out) of each target path
    "attention.self.query": (H, H), "attention.self.key": (H, H), "attention.self.value": (H, H),
    "attention.output.dense": (H, H), "intermediate.dense": (H, I), "output.dense": (I, H),
}


# ---- helpers ---------------------------------------------------------------------------------

def tiny_config(layers=6, **kw):
    # "math" attention: the same attention code whether or not autograd records (the "torch"
    # setting switches between SDPA and explicit math on CPU depending on requires_grad, which
    # would make outputs of frozen and unfrozen models differ by rounding).
    return BertConfig(vocab_size=100, hidden_size=H, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=I, max_position_embeddings=64, attn_implementation="math", **kw)


def tiny_model(layers=6, seed=0, **kw):
    torch.manual_seed(seed)
    return BertModel(tiny_config(layers, **kw)).eval()


def fresh_copy(model):
    """A new base model with the same base weights (no adapters)."""
    other = BertModel(model.config).eval()
    other.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    return other


def inputs(batch=3, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 5:] = 0  # padding: the encoder runs packed (T, H) token states (Unpadder)
    mask[2, 7:] = 0
    return ids, mask


def run(model, ids, mask):
    out = model(ids, mask)
    return out.last_hidden_state, out.pooler_output


def set_task(model, task):
    for m in model.modules():
        if hasattr(m, "set_task"):
            m.set_task(task)


def perturb(model, scale=0.1, seed=3):
    """Random non-zero B (and new A) in every adapter, so the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for name in m.adapter_names:
                m.lora_B[name].copy_(torch.randn(m.lora_B[name].shape, generator=g) * scale)
                m.lora_A[name].copy_(torch.randn(m.lora_A[name].shape, generator=g) * scale)


def expected_count(paths, layers, rank, num_adapters=1):
    return sum(rank * sum(SIZES[p]) for p in paths) * len(layers) * num_adapters


def adapted(model):
    """{(layer index, path)} of the LoRALinear modules."""
    out = set()
    for name, _ in lora_modules(model):
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)$", name)
        out.add((int(m.group(1)), m.group(2)))
    return out


# ---- a fresh adapter changes nothing; freezing; counts ---------------------------------------

@pytest.mark.parametrize("options", [
    {},
    {"targets": "all", "layers": "last4"},
    {"targets": ["dense", "value"], "layers": [0, 5], "rank": 3, "alpha": 5},
    {"targets": "all", "tasks": TASKS},
])
def test_fresh_lora_gives_exactly_the_base_outputs(options):
    model = tiny_model()
    ids, mask = inputs()
    base = run(model, ids, mask)
    apply_lora(model, **options)
    if "tasks" in options:
        set_task(model, "quora")
    got = run(model, ids, mask)
    assert all(torch.equal(a, b) for a, b in zip(got, base))
    # and a non-zero B does change them (the adapters are really in the forward)
    perturb(model)
    assert not torch.allclose(run(model, ids, mask)[0], base[0], atol=1e-3)


@pytest.mark.parametrize("options, paths, layers, adapters", [
    ({}, ALL_PATHS[:2], range(6), 1),
    ({"targets": "all", "layers": "last4", "rank": 8}, ALL_PATHS, range(2, 6), 1),
    ({"targets": "dense", "layers": "first4", "rank": 2}, ALL_PATHS[3:], range(4), 1),
    ({"targets": ["query", "output.dense"], "tasks": TASKS}, [ALL_PATHS[0], ALL_PATHS[5]], range(6), 3),
])
def test_only_adapters_train_and_the_count_is_r_times_in_plus_out(options, paths, layers, adapters):
    model = tiny_model()
    total_before = sum(p.numel() for p in model.parameters())
    apply_lora(model, **options)
    rank = options.get("rank", 4)
    want = expected_count(paths, layers, rank, adapters)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert count_trainable(model) == lora_parameter_count(model) == want
    assert sum(p.numel() for p in model.parameters()) == total_before + want
    assert adapted(model) == {(i, p) for i in layers for p in paths}


def test_multitask_model_heads_stay_trainable(tiny_checkpoint):
    cfg = load_config(CONFIGS / "lora-qk-r4.yaml", [f"model={tiny_checkpoint}"])
    from minbert.finetune import set_trainable
    from minbert.multitask import MultitaskModel

    model = MultitaskModel(BertModel.from_pretrained(tiny_checkpoint), cfg.tasks)
    heads = sum(p.numel() for p in model.heads.parameters())
    params = set_trainable(model, cfg)
    assert sum(p.numel() for p in params) == count_trainable(model) == heads + expected_count(ALL_PATHS[:2], range(2), 4)
    assert not any(p.requires_grad for n, p in model.bert.named_parameters() if ".lora_" not in n)


# ---- merging -----------------------------------------------------------------------------------

def test_merge_gives_the_unmerged_outputs_and_unmerge_restores():
    model = tiny_model()
    ids, mask = inputs()
    apply_lora(model, targets="all", layers="mid4")
    perturb(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = run(model, ids, mask)
    merge_lora(model)
    q = model.encoder.layer[2].attention.self.query
    assert q.merged == "default"
    assert not torch.equal(q.weight, before["encoder.layer.2.attention.self.query.weight"])
    merged = run(model, ids, mask)
    for a, b in zip(merged, unmerged):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="already has adapter 'default' merged"):
        merge_lora(model)
    # while merged, the adapters are not used: changing them changes nothing
    with torch.no_grad():
        q.lora_B["default"].add_(1.0)
    assert torch.equal(run(model, ids, mask)[0], merged[0])
    with torch.no_grad():
        q.lora_B["default"].sub_(1.0)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
    for a, b in zip(run(model, ids, mask), unmerged):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    unmerge_lora(model)  # nothing merged: a no-op


def test_per_task_merge_needs_a_task_and_serves_only_that_task():
    model = tiny_model(layers=2)
    ids, mask = inputs()
    apply_lora(model, targets="all", tasks=TASKS)
    perturb(model)
    set_task(model, "sts")
    want = run(model, ids, mask)
    with pytest.raises(ValueError, match="name the task whose adapter to merge"):
        merge_lora(model)
    with pytest.raises(ValueError, match="no adapter for task 'cola'"):
        merge_lora(model, task="cola")
    assert all(m.merged is None for _, m in lora_modules(model))  # a failed merge changed nothing
    merge_lora(model, task="sts")
    set_task(model, "sts")
    for a, b in zip(run(model, ids, mask), want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="adapter of task 'sts' is merged"):
        set_task(model, "sst")
    unmerge_lora(model)
    set_task(model, "sst")


def test_merged_state_dict_exports_a_plain_bert(tmp_path):
    model = tiny_model()
    ids, mask = inputs()
    apply_lora(model, targets=["query", "value", "intermediate"], layers="last4")
    perturb(model)
    want = run(model, ids, mask)
    state = merged_state_dict(model)
    assert not any("lora" in k for k in state)
    plain = BertModel(model.config).eval()
    assert set(state) == set(plain.state_dict())
    plain.load_hf_state_dict(state, strict=True)
    for a, b in zip(run(plain, ids, mask), want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert lora_config(model) is not None  # the model itself is unchanged (not merged)
    assert all(m.merged is None for _, m in lora_modules(model))
    # already merged: the same export
    merge_lora(model)
    again = merged_state_dict(model)
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_merged_state_dict_per_task(caplog):
    model = tiny_model(layers=2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = inputs()
    apply_lora(model, tasks=TASKS)
    perturb(model)
    set_task(model, "quora")
    want = run(model, ids, mask)
    plain = BertModel(model.config).eval()
    plain.load_hf_state_dict(merged_state_dict(model, task="quora"))
    for a, b in zip(run(plain, ids, mask), want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with caplog.at_level(logging.WARNING, logger="minbert.lora"):
        state = merged_state_dict(model)
    assert "per-task LoRA adapters are not part of the exported weights" in caplog.text
    assert all(torch.equal(state[k], base[k]) for k in base)


# ---- adapter files -------------------------------------------------------------------------------

@pytest.mark.parametrize("tasks", [None, TASKS])
def test_saved_adapters_reload_into_a_fresh_base_model(tmp_path, tasks):
    model = tiny_model()
    base = fresh_copy(model)
    ids, mask = inputs()
    apply_lora(model, targets="all", layers=[1, 3, 4], rank=2, alpha=6, tasks=tasks)
    perturb(model)
    path = save_adapters(model, tmp_path / "adapters.safetensors")
    from safetensors.torch import load_file

    stored = load_file(str(path))
    assert set(stored) == set(lora_state_dict(model)) and all(".lora_" in k for k in stored)
    assert sum(t.numel() for t in stored.values()) == lora_parameter_count(model)
    meta = read_adapter_config(path)
    assert meta == {"rank": 2, "alpha": 6.0, "dropout": 0.0, "targets": ALL_PATHS, "layers": [1, 3, 4],
                    "tasks": tasks}
    load_adapters(base, path)  # applies LoRA from the metadata, then loads
    assert lora_config(base) == lora_config(model)
    assert count_trainable(base) == count_trainable(model)
    for task in tasks or [None]:
        if task is not None:
            set_task(model, task)
            set_task(base, task)
        assert all(torch.equal(a, b) for a, b in zip(run(base, ids, mask), run(model, ids, mask)))
    # loading into a model that already has the same LoRA also works
    other = tiny_model()
    apply_lora(other, targets="all", layers=[1, 3, 4], rank=2, alpha=6, tasks=tasks)
    load_adapters(other, path)
    assert all(torch.equal(lora_state_dict(other)[k], v) for k, v in lora_state_dict(model).items())


def test_adapter_file_mismatches_are_clear_errors(tmp_path):
    model = tiny_model()
    apply_lora(model, targets=["query", "key"], rank=4)
    path = save_adapters(model, tmp_path / "a.safetensors")
    different = tiny_model()
    apply_lora(different, targets=["query"], rank=8)
    with pytest.raises(ValueError, match=r"LoRA options differ:(.|\n)*rank: file 4 vs model 8(.|\n)*targets"):
        load_adapters(different, path)
    wider = BertModel(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=6, num_attention_heads=2,
                                 intermediate_size=I, max_position_embeddings=64))
    with pytest.raises(ValueError, match=r"shape-mismatched tensors:\n  encoder.layer.0.attention.self.query.lora_A.default"):
        load_adapters(wider, path)
    shallow = tiny_model(layers=2)
    with pytest.raises(ValueError, match="LoRA layer index 2 is out of range for a model with 2 layers"):
        load_adapters(shallow, path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a minbert LoRA adapter file"):
        load_adapters(tiny_model(), tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter file not found"):
        load_adapters(tiny_model(), tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="the model has no LoRA adapters"):
        save_adapters(tiny_model(), tmp_path / "b.safetensors")


# ---- per-task adapters -----------------------------------------------------------------------------

def test_per_task_adapters_get_gradients_only_from_their_task():
    model = tiny_model(layers=2)
    ids, mask = inputs()
    apply_lora(model, targets="all", tasks=TASKS)
    perturb(model)
    outs = {}
    for task in TASKS:
        model.zero_grad(set_to_none=True)
        set_task(model, task)
        hidden, pooled = run(model, ids, mask)
        outs[task] = hidden.detach()
        (hidden.square().mean() + pooled.sum()).backward()
        for _, m in lora_modules(model):
            for other in TASKS:
                ga, gb = m.lora_A[other].grad, m.lora_B[other].grad
                if other == task:
                    assert ga is not None and gb is not None and ga.abs().sum() > 0 and gb.abs().sum() > 0
                else:  # not even a zero tensor: AdamW skips these adapters entirely
                    assert ga is None and gb is None
        assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    assert not torch.allclose(outs["sst"], outs["quora"], atol=1e-4)
    # None = base layer only; unknown names and a missing set_task raise
    base = fresh_copy(model)
    set_task(model, None)
    assert all(torch.equal(a, b) for a, b in zip(run(model, ids, mask), run(base, ids, mask)))
    with pytest.raises(ValueError, match=r"no adapter for task 'cola'; this layer has per-task adapters for \['sst'"):
        set_task(model, "cola")
    fresh = tiny_model(layers=2)
    apply_lora(fresh, tasks=TASKS)
    with pytest.raises(RuntimeError, match=r"no task was selected; call set_task\(name\) first"):
        run(fresh, ids, mask)


def test_shared_adapter_ignores_the_task():
    model = tiny_model(layers=2)
    ids, mask = inputs()
    apply_lora(model)
    perturb(model)
    set_task(model, "sst")
    a = run(model, ids, mask)[0]
    set_task(model, "anything")
    assert torch.equal(run(model, ids, mask)[0], a)


def test_mixed_adapter_ids_in_one_call_match_one_task_per_call():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(H, 20), rank=3, alpha=6, tasks=TASKS)
    with torch.no_grad():
        for name in TASKS:
            layer.lora_A[name].normal_(0, 0.2)
            layer.lora_B[name].normal_(0, 0.2)
    x = torch.randn(4, 5, H)  # (B, L, in)
    ids = torch.tensor([2, -1, 0, 1])  # one per sequence; -1 = no adapter
    mixed = layer(x, adapter_ids=ids)
    for b, t in enumerate(ids.tolist()):
        layer.set_task(TASKS[t] if t >= 0 else None)
        torch.testing.assert_close(mixed[b], layer(x[b]), atol=1e-6, rtol=1e-6)
    # per-row ids on packed (N, in) input
    rows = x.reshape(-1, H)
    row_ids = ids[:, None].expand(-1, 5).reshape(-1)
    torch.testing.assert_close(layer(rows, adapter_ids=row_ids), mixed.reshape(-1, 20), atol=1e-6, rtol=1e-6)
    # gradients reach only the adapters that have rows
    layer.zero_grad(set_to_none=True)
    layer(x, adapter_ids=torch.tensor([0, 0, -1, 2])).sum().backward()
    assert layer.lora_A["quora"].grad.abs().sum() == 0 and layer.lora_A["sst"].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="adapter_ids needs per-task adapters"):
        LoRALinear(nn.Linear(H, 20), rank=3, alpha=6)(x, adapter_ids=ids)


def test_lora_dropout_applies_to_the_low_rank_path_only():
    torch.manual_seed(0)
    base = nn.Linear(H, 20)
    layer = LoRALinear(base, rank=4, alpha=4, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(6, H)
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.5, training=True)
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    torch.testing.assert_close(got, F.linear(x, base.weight, base.bias) + 1.0 * (xd @ a.t()) @ b.t())
    layer.eval()  # no dropout: the fused path
    torch.testing.assert_close(layer(x), F.linear(x, base.weight, base.bias) + (x @ a.t()) @ b.t())
    # per-task dropout path with mixed ids
    torch.manual_seed(0)
    multi = LoRALinear(nn.Linear(H, 20), rank=2, alpha=2, dropout=0.3, tasks=["a", "b"]).train()
    with torch.no_grad():
        for n in ("a", "b"):
            multi.lora_B[n].normal_()
    ids = torch.tensor([0, 1, -1, 1, 0, 0])
    torch.manual_seed(9)
    got = multi(x, adapter_ids=ids)
    torch.manual_seed(9)
    xd = F.dropout(x, 0.3, training=True)
    with torch.no_grad():
        want = F.linear(x, multi.weight, multi.bias)
        for i, t in enumerate(ids.tolist()):
            if t >= 0:
                n = "ab"[t]
                want[i] += 1.0 * (multi.lora_B[n] @ (multi.lora_A[n] @ xd[i]))
    torch.testing.assert_close(got.detach(), want)


# ---- layer selection, validation ----------------------------------------------------------------------

@pytest.mark.parametrize("layers, want", [
    (None, [0, 1, 2, 3, 4, 5]), ("all", [0, 1, 2, 3, 4, 5]), ("last4", [2, 3, 4, 5]), ("first4", [0, 1, 2, 3]),
    ("mid4", [1, 2, 3, 4]), ("mid2", [2, 3]), ("last1", [5]), ([0, -1], [0, 5]), ([4, 1], [1, 4]), (3, [3]),
])
def test_layer_selection(layers, want):
    model = tiny_model()
    apply_lora(model, targets="query", layers=layers)
    assert adapted(model) == {(i, "attention.self.query") for i in want}
    assert lora_config(model)["layers"] == want


def test_layer_patterns_on_other_depths(caplog):
    assert _resolve_layers("mid4", 12) == [4, 5, 6, 7]
    assert _resolve_layers("last4", 12) == [8, 9, 10, 11]
    assert _resolve_layers("mid4", 5) == [0, 1, 2, 3]
    assert _resolve_layers("last4", 4) == [0, 1, 2, 3]
    with caplog.at_level(logging.WARNING, logger="minbert.lora"):
        assert _resolve_layers("last4", 2) == [0, 1]
    assert "asks for 4 layers but the model has 2; adapting all of them" in caplog.text


@pytest.mark.parametrize("kwargs, error, match", [
    ({"targets": ["query", "qurey"]}, ValueError, "unknown LoRA target 'qurey'; expected one of"),
    ({"targets": []}, ValueError, "LoRA targets must be a non-empty list"),
    ({"rank": 0}, ValueError, "LoRA rank must be an integer >= 1, got 0"),
    ({"rank": 2.5}, ValueError, "LoRA rank must be an integer >= 1"),
    ({"alpha": 0}, ValueError, "LoRA alpha must be a finite number > 0"),
    ({"dropout": 1.0}, ValueError, r"LoRA dropout must be a number in \[0, 1\)"),
    ({"layers": [0, 6]}, ValueError, "LoRA layer index 6 is out of range for a model with 6 layers"),
    ({"layers": [-7]}, ValueError, "LoRA layer index -7 is out of range"),
    ({"layers": [1, 1]}, ValueError, "LoRA layers contain duplicates"),
    ({"layers": "middle4"}, ValueError, "LoRA layers must be None, 'all', 'firstN'"),
    ({"layers": "last0"}, ValueError, "the number of layers must be >= 1"),
    ({"layers": []}, ValueError, "non-empty list of indices"),
    ({"tasks": []}, ValueError, "LoRA tasks must name at least one task"),
    ({"tasks": ["sst", "sst"]}, ValueError, "LoRA tasks contain duplicates"),
    ({"tasks": "sst"}, ValueError, "LoRA tasks must be None or a list of task names"),
    ({"tasks": ["a.b"]}, ValueError, "without '.'"),
])
def test_validation_errors(kwargs, error, match):
    model = tiny_model()
    with pytest.raises(error, match=match):
        apply_lora(model, **kwargs)
    assert lora_config(model) is None  # nothing was changed
    assert all(p.requires_grad for p in model.parameters())


def test_apply_twice_and_wrong_models_raise():
    model = tiny_model(layers=2)
    apply_lora(model)
    with pytest.raises(RuntimeError, match="already has LoRA adapters"):
        apply_lora(model, targets="value")
    with pytest.raises(TypeError, match="LoRA needs a minbert BertModel"):
        apply_lora(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="the model has no LoRA adapters"):
        merge_lora(tiny_model(layers=2))
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        LoRALinear(nn.Conv1d(2, 2, 1), rank=1, alpha=1)


# ---- checkpoints ---------------------------------------------------------------------------------------

def test_hf_names_are_unchanged_and_save_pretrained_folders_load(tmp_path):
    model = tiny_model(layers=2)
    names = list(model.state_dict())
    apply_lora(model, targets="all")
    assert [k for k in model.state_dict() if ".lora_" not in k] == names
    perturb(model)
    model.save_pretrained(tmp_path / "enc")  # adapters folded in: a plain HF BERT folder
    from safetensors.torch import load_file

    assert not any(".lora_" in k for k in load_file(str(tmp_path / "enc" / "model.safetensors")))
    reloaded = BertModel.from_pretrained(tmp_path / "enc").eval()
    model.eval()
    ids = torch.randint(1, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).last_hidden_state, model(ids).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_base_checkpoint_loads_into_a_lora_model_with_strict():
    base = tiny_model(layers=2, seed=5)
    state = {f"bert.{k}": v for k, v in base.state_dict().items()}  # HF-style prefixed names
    model = tiny_model(layers=2, seed=6)
    apply_lora(model, targets="all")
    perturb(model)
    adapters = {k: v.clone() for k, v in lora_state_dict(model).items()}
    model.load_hf_state_dict(state, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.state_dict().items())
    assert all(torch.equal(lora_state_dict(model)[k], v) for k, v in adapters.items())  # adapters untouched


# ---- the Triton kernel inside the model --------------------------------------------------------------

def _forward_backward(model, ids, mask, task=None):
    model.zero_grad(set_to_none=True)
    if task is not None:
        set_task(model, task)
    hidden, pooled = run(model, ids, mask)
    (hidden.square().sum() + pooled.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return hidden.detach(), grads


def test_tiny_model_through_the_triton_kernel(triton_backend, monkeypatch):
    """Forward and all adapter gradients through the (interpreted) fused kernel, compared with
    float64: kernel error <= 2x plain torch float32's error + a small floor."""
    from minbert.kernels import lora as kernel_module

    launches = []
    real_apply = kernel_module.LoRALinearFunction.apply
    monkeypatch.setattr(kernel_module.LoRALinearFunction, "apply",
                        lambda *a: launches.append(a[0].shape) or real_apply(*a))
    model = tiny_model(layers=2)
    apply_lora(model, targets="all", rank=3, alpha=6, tasks=["sst", "sts"])
    perturb(model, scale=0.2)
    ids, mask = inputs(batch=3, length=8)
    tri_out, tri_grads = _forward_backward(model, ids, mask, "sts")
    assert len(launches) == 2 * 6 and launches[0][0] == int(mask.sum())  # the kernel ran, on packed (T, H) rows
    monkeypatch.setenv("MINBERT_KERNEL_BACKEND", "reference")
    ref_out, ref_grads = _forward_backward(model, ids, mask, "sts")
    model64 = model.double()
    gold_out, gold_grads = _forward_backward(model64, ids, mask, "sts")  # float64: torch reference
    model.float()

    def check(tri, ref, gold, what):
        err_tri = (tri.double() - gold).abs().max().item()
        err_ref = (ref.double() - gold).abs().max().item()
        assert err_tri <= 2 * err_ref + 1e-5 * max(1.0, gold.abs().max().item()), (what, err_tri, err_ref)

    check(tri_out, ref_out, gold_out, "hidden")
    # gradients: every adapter of task sts (2 layers x 6 linears x A, B); none for sst's adapters
    assert set(tri_grads) == set(ref_grads) == set(gold_grads) and len(tri_grads) == 2 * 6 * 2
    assert all(n.endswith(".sts") for n in tri_grads)
    for name in gold_grads:
        check(tri_grads[name], ref_grads[name], gold_grads[name], name)

    # one layer, tasks mixed in one call: the multi-adapter kernel (per-sequence ids, -1 = none)
    monkeypatch.setenv("MINBERT_KERNEL_BACKEND", "triton")
    torch.manual_seed(1)
    layer = LoRALinear(nn.Linear(H, 20), rank=3, alpha=6, tasks=TASKS)
    with torch.no_grad():
        for n in TASKS:
            layer.lora_B[n].normal_(0, 0.2)
    x = torch.randn(3, 5, H, requires_grad=True)
    ids = torch.tensor([1, -1, 0])
    results = []
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float32), ("reference", torch.float64)):
        monkeypatch.setenv("MINBERT_KERNEL_BACKEND", backend)
        layer.to(dtype).zero_grad(set_to_none=True)
        xi = x.detach().to(dtype).requires_grad_(True)
        y = layer(xi, adapter_ids=ids)
        (y * torch.linspace(-1, 1, 20, dtype=dtype)).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        results.append((y.detach(), xi.grad, grads))
    layer.float()
    (tri_y, tri_dx, tri_g), (ref_y, ref_dx, ref_g), (gold_y, gold_dx, gold_g) = results
    check(tri_y, ref_y, gold_y, "y")
    check(tri_dx, ref_dx, gold_dx, "dx")
    assert set(tri_g) == set(gold_g) == {f"lora_{m}.{t}" for m in "AB" for t in TASKS} | {"weight", "bias"}
    for name in gold_g:
        check(tri_g[name], ref_g[name], gold_g[name], name)
    assert tri_g["lora_A.sts"].abs().sum() == 0  # no row of sts: zero gradient
    assert len(launches) == 2 * 6 + 1  # the kernel ran for the mixed call too


# ---- training runs -------------------------------------------------------------------------------------

def _sets(ckpt, out, *extra):
    over = [f"model={ckpt}", f"data.dir={FIXTURES}", f"output_dir={out}", "quiet=true", "log_every=1",
            "max_steps=2", *[f"tasks.{t}.batch_size=8" for t in TASKS], *extra]
    return [arg for o in over for arg in ("--set", o)]


def test_lora_training_run_logs_trainable_count_and_reloads(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", str(CONFIGS / "lora-qk-r4.yaml"), *_sets(tiny_checkpoint, out)]) == 0
    log = capsys.readouterr().out
    m = re.search(r"parameters: ([\d,]+) trainable of ([\d,]+) \(([\d.]+)%\), finetune=lora", log)
    assert m, log
    trainable = int(m.group(1).replace(",", ""))
    model, cfg, _ = load_model_dir(out / "best")
    heads = sum(p.numel() for p in model.heads.parameters())
    assert trainable == count_trainable(model) == heads + expected_count(ALL_PATHS[:2], range(2), 4)
    # the base encoder did not move; the adapters did (B left zero)
    base = BertModel.from_pretrained(tiny_checkpoint).state_dict()
    assert all(torch.equal(v, base[k]) for k, v in model.bert.state_dict().items() if ".lora_" not in k)
    assert any(v.abs().sum() > 0 for k, v in lora_state_dict(model).items() if ".lora_B." in k)
    # the encoder/ export loads as a plain BERT
    BertModel.from_pretrained(out / "best" / "encoder")
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("split") == "train" and "loss" in r for r in records)


def test_per_task_lora_training_run(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", str(CONFIGS / "lora-last4.yaml"),
                 *_sets(tiny_checkpoint, out, "lora.per_task=true", "predict=false")]) == 0
    model, _, _ = load_model_dir(out / "best")
    assert lora_config(model)["tasks"] == TASKS
    assert lora_config(model)["targets"] == ALL_PATHS and lora_config(model)["layers"] == [0, 1]
    # round-robin sst, quora: those adapters moved, sts's B is still zero
    moved = {t: any(v.abs().sum() > 0 for k, v in lora_state_dict(model).items() if k.endswith(f".lora_B.{t}"))
             for t in TASKS}
    assert moved == {"sst": True, "quora": True, "sts": False}
