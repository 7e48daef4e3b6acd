"""minbert.engine.param_groups: AdamW groups (weight decay, head lr, layer-wise lr decay)."""
import pytest
import torch

from minbert import BertConfig, BertModel
from minbert.engine import param_groups
from minbert.multitask import MultitaskModel
from minbert.train_config import ConfigError, OptimConfig, TaskConfig


def tiny_model(layers=3):
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                                intermediate_size=24, max_position_embeddings=32))
    return MultitaskModel(bert, [TaskConfig(name="sst", head="mlp"), TaskConfig(name="quora")])


def by_name(groups):
    return {n: g for g in groups for n in g["names"]}


def test_every_trainable_parameter_once_with_the_right_decay():
    model = tiny_model()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    groups = param_groups(model, 1e-4, 0.01, head_lr=1e-3)
    names = [n for g in groups for n in g["names"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable) and len(names) == len(set(names))
    table = by_name(groups)
    assert table["bert.encoder.layer.0.attention.self.query.weight"]["weight_decay"] == 0.01
    for n in ("bert.encoder.layer.0.attention.self.query.bias", "bert.embeddings.LayerNorm.weight",
              "bert.encoder.layer.2.output.LayerNorm.bias"):
        assert table[n]["weight_decay"] == 0.0, n
    assert table["heads.quora.proj.weight"]["lr"] == 1e-3 and table["bert.pooler.dense.weight"]["lr"] == 1e-4
    assert all(g["initial_lr"] == g["lr"] for g in groups)
    # without layer decay the grouping is by (decay, head) only
    assert len(groups) == 4


def test_layer_decay_scales_the_lr_by_depth():
    model = tiny_model(layers=3)
    lr, decay = 1e-4, 0.5
    table = by_name(param_groups(model, lr, 0.01, head_lr=1e-3, layer_decay=decay))
    want = {"bert.embeddings.word_embeddings.weight": lr * decay ** 4,
            "bert.embeddings.LayerNorm.bias": lr * decay ** 4,
            "bert.encoder.layer.0.attention.self.query.weight": lr * decay ** 3,
            "bert.encoder.layer.1.intermediate.dense.bias": lr * decay ** 2,
            "bert.encoder.layer.2.output.dense.weight": lr * decay,
            "bert.pooler.dense.weight": lr,
            "heads.sst.mlp.net.1.weight": 1e-3}
    for name, value in want.items():
        assert table[name]["lr"] == pytest.approx(value, rel=1e-12), name
    # an LR schedule scales every group by the same factor, so the ratios hold all run long
    groups = param_groups(model, lr, 0.01, layer_decay=decay)
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    opt.step()
    sched.step()
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(g["initial_lr"] / 2)
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\], got 0"):
        param_groups(model, lr, 0.01, layer_decay=0)
    with pytest.raises(ConfigError, match=r"optim.layer_decay must be a number in \(0, 1\], got 1.5"):
        OptimConfig(layer_decay=1.5).validate("optim")


def test_fused_adamw_is_the_same_update_and_is_chosen_where_supported():
    from minbert.engine import build_adamw, fused_adamw_supported

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = []
    for net, fused in zip(nets, (False, True)):
        groups = [{"params": list(net[0].parameters()), "weight_decay": 0.1, "names": ["0.weight", "0.bias"]},
                  {"params": list(net[1].parameters()) + list(net[2].parameters()), "weight_decay": 0.0, "lr": 3e-3}]
        opts.append(build_adamw(groups, 1e-2, (0.9, 0.99), 1e-8, fused=fused))
    assert opts[1].defaults.get("fused") is True and not opts[0].defaults.get("fused")
    x = torch.randn(11, 7)
    for _ in range(5):
        for net, opt in zip(nets, opts):
            net(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # auto: fused on this torch's CPU; refused where there is no fused kernel
    assert fused_adamw_supported(nets[0].parameters())
    assert build_adamw([{"params": list(nets[0].parameters())}], 1e-3, (0.9, 0.999), 1e-8).defaults.get("fused")
    assert not fused_adamw_supported([torch.zeros(2, dtype=torch.long)]) and not fused_adamw_supported([])
    with pytest.raises(ValueError, match="optim.fused: true, but torch .* has no fused AdamW for parameters on"):
        build_adamw([{"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))]}], 1e-3, (0.9, 0.999), 1e-8,
                    fused=True)


def test_both_engines_implement_the_engine_interface():
    from minbert.distributed.engine import DeepSpeedEngineAdapter
    from minbert.engine import Engine, LocalEngine

    assert Engine.__abstractmethods__ == {"backward", "clip_grad_norm", "optimizer_step", "skip_step", "lr",
                                          "save_checkpoint", "load_checkpoint"}
    for cls in (LocalEngine, DeepSpeedEngineAdapter):
        assert issubclass(cls, Engine) and not cls.__abstractmethods__, cls
    with pytest.raises(TypeError):
        Engine()
    engine = LocalEngine(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
    assert engine.all_true(True) and not engine.all_true(False)
    assert engine.rank_mean({"a": 1.0}) == {"a": 1.0}
    weighting = object()
    assert engine.wrap_weighting(weighting) is weighting
    with engine.full_parameters():
        pass
