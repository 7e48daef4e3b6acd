"""SMART / MBPP / R3F (minbert/smart.py) on a tiny random BERT with fixture batches, CPU, reference kernels."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import minbert.kernels.smart_perturb as smart_perturb_mod
import minbert.kernels.symmetric_kl as symmetric_kl_mod
from minbert import BertConfig, BertModel, Tokenizer, default_checkpoint
from minbert import data as data_lib
from minbert.multitask import MultitaskModel
from minbert.smart import SMART
from minbert.build import setup_regularizers
from minbert.train import train
from minbert.train_config import ConfigError, TaskConfig, load_config

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "train"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FILES = {"sst": "ids-sst-train.csv", "quora": "quora-train.csv", "sts": "sts-train.csv"}
KIND = {"sst": "single_label_classification", "quora": "binary_classification", "sts": "regression"}
# (task, pair encoding): a single sentence, a cross-encoded pair, a bi-encoded pair
CASES = [("sst", "cross"), ("quora", "cross"), ("sts", "bi")]


# --- helpers -------------------------------------------------------------------------------------

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
            max_position_embeddings=128)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(default_checkpoint())


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    tasks = [TaskConfig(name="sst", pooling="mean"), TaskConfig(name="quora"),
             TaskConfig(name="sts", pair_encoding="bi", pooling="mean", head="cosine")]
    return MultitaskModel(BertModel(BertConfig(**TINY)), tasks).to(dtype).train()


def make_batch(tokenizer, task, encoding="cross", n=7, start=0):
    """``n`` fixture rows; every other row's sentences are shortened so the batch has padding."""
    td = data_lib.read_task_file(FIXTURES / FILES[task], task)
    rows = []
    for i, ex in enumerate(td.examples[start:start + n]):
        if i % 2:
            cut = 1 + i % 3
            ex = dataclasses.replace(ex, text_a=" ".join(ex.text_a.split()[:-cut]),
                                     text_b=None if ex.text_b is None else " ".join(ex.text_b.split()[:-1]))
        rows.append(ex)
    batch = data_lib.make_collate(tokenizer, task, 64, encoding)(rows)
    for mask in (batch.attention_mask, batch.attention_mask_b):
        assert mask is None or not bool(mask.bool().all()), "the batch should contain padding"
    return batch


def run(reg, model, batch):
    """What the trainer does: before_forward, the clean forward, the regularizer."""
    reg.before_forward(model, batch)
    output = model(batch)
    return output, reg(model, batch, output)


class Recorder:
    """Wraps minbert.kernels.smart_perturb.smart_perturb_step, keeping every (delta in, grad, delta out)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = smart_perturb_mod.smart_perturb_step

        def wrapped(delta, grad, *args, **kwargs):
            out = real(delta, grad, *args, **kwargs)
            self.calls.append((delta.detach().clone(), grad.detach().clone(), out.clone(), kwargs))
            return out

        monkeypatch.setattr(smart_perturb_mod, "smart_perturb_step", wrapped)


def token_norms(x, norm):
    return x.abs().amax(-1) if norm == "inf" else x.double().norm(dim=-1)


# --- options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("lambda_s", -1.0), ("mu", float("nan")), ("steps", -1), ("steps", 1.5), ("steps", True), ("sigma", -1e-5),
    ("step_size", -1e-3), ("epsilon", -1.0), ("norm", "l1"), ("rule", "pgd"), ("norm_level", "batch"),
    ("dropout", "on"), ("beta", 1.5), ("layer", -1), ("noise", "gaussian"), ("r3f_distribution", "laplace"),
    ("kind", "ranking"), ("lambda_s", "abc"),
])
def test_bad_options_name_the_option(option, value):
    with pytest.raises(ConfigError, match=f"smart \\(task sst\\): option '{option}'"):
        SMART(task="sst", **{"kind": "single_label_classification", option: value})


def test_unknown_option_and_config_errors():
    with pytest.raises(ConfigError, match="unknown option 'lamda_s'"):
        SMART(task="sst", lamda_s=1.0)
    # numbers written as strings in YAML ("1e-5" is a string for YAML 1.1) are accepted
    assert SMART(task="sst", sigma="1e-5").sigma == 1e-5
    cfg = load_config(None, ["smart={lambda_s: 2.0, mu: 0.5}", "tasks.sts.smart={lambda_s: 5.0, layer: 1}",
                             "tasks.quora.smart={enabled: false}"])
    regs = setup_regularizers(cfg)
    sst, sts = regs["sst"][-1], regs["sts"][-1]
    assert (sst.lambda_s, sst.mu, sst.kind, sst.task) == (2.0, 0.5, "single_label_classification", "sst")
    assert (sts.lambda_s, sts.mu, sts.layer, sts.kind) == (5.0, 0.5, 1, "regression")
    assert not any(isinstance(r, SMART) for r in regs["quora"])
    with pytest.raises(ConfigError, match="option 'rule'"):
        setup_regularizers(load_config(None, ["smart={rule: fgsm}"]))


def test_smart_for_merges_the_global_block_with_the_task_block():
    from minbert.distributed.sharded import ZeRO3UnsupportedError, check_stage3_regularizers
    from minbert.train_config import SmartConfig

    assert {f.name for f in dataclasses.fields(SmartConfig)} == {"enabled", *SMART.OPTIONS}
    cfg = load_config(None, ["smart={lambda_s: 2.0, mu: 0.5, sigma: 1e-5}", "tasks.sts.smart={lambda_s: 5, layer: 1}",
                             "tasks.quora.smart={enabled: false}"])
    assert cfg.smart_for("sst").options() == {"lambda_s": 2.0, "mu": 0.5, "sigma": 1e-5}
    assert cfg.smart_for("sts").options() == {"lambda_s": 5.0, "mu": 0.5, "sigma": 1e-5, "layer": 1}
    assert cfg.smart_for("quora") is None
    # the saved config lists only the options a block gives, and reads back the same
    assert cfg.to_dict()["smart"] == {"lambda_s": 2.0, "mu": 0.5, "sigma": 1e-5}
    assert [t["smart"] for t in cfg.to_dict()["tasks"]] == [None, {"enabled": False}, {"lambda_s": 5.0, "layer": 1}]
    assert load_config(None, ["smart={}"]).smart_for("sst") == SmartConfig()
    assert load_config(None, []).smart_for("sst") is None
    # on for a task only through its own block; off everywhere under a global enabled: false
    only_sts = load_config(None, ["smart={enabled: false}", "tasks.sts.smart={enabled: true}"])
    assert [only_sts.smart_for(t) is not None for t in ("sst", "quora", "sts")] == [False, False, True]
    off = load_config(None, ["smart={enabled: false}", "tasks.sts.smart={mu: 0.5}"])
    assert all(off.smart_for(t) is None for t in ("sst", "quora", "sts"))
    # ZeRO-3's refusal asks the same question
    check_stage3_regularizers(3, off)
    with pytest.raises(ZeRO3UnsupportedError, match="smart is not supported"):
        check_stage3_regularizers(3, only_sts)
    with pytest.raises(ConfigError, match="smart.lamda_s"):
        load_config(None, ["smart={lamda_s: 1.0}"])


def test_layer_beyond_the_encoder_is_refused(tokenizer):
    model = make_model()
    with pytest.raises(ConfigError, match=r"option 'layer' must be in \[0, 1\]"):
        SMART(task="sst", layer=2).before_forward(model, make_batch(tokenizer, "sst"))


def test_call_without_before_forward_is_a_clear_error(tokenizer):
    model, batch = make_model(), make_batch(tokenizer, "sst")
    with pytest.raises(RuntimeError, match="before_forward"):
        SMART(task="sst")(model, batch, model(batch))


# --- the perturbation ----------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("task, encoding", CASES)
def test_delta_gradient_equals_autograd(tokenizer, monkeypatch, task, encoding, layer):
    """g used by the ascent step = d/dδ Σ_i ℓ_s(f(x_i + δ_i), f(x_i)) computed directly (float64)."""
    model = make_model(torch.float64).eval()
    batch = make_batch(tokenizer, task, encoding)
    rec = Recorder(monkeypatch)
    reg = SMART(task=task, kind=KIND[task], mu=0.0, layer=layer, sigma=1e-2, steps=2, dropout="eval")
    run(reg, model, batch)
    assert len(rec.calls) == 2 * len(model.masks(batch))  # K=2 steps, one call per sentence each
    with torch.no_grad():
        clean = model(batch)
        xs = model.hidden_at(batch, layer)
    for step in range(2):
        deltas = [d.clone().requires_grad_(True) for d, _, _, _ in rec.calls[step * len(xs):(step + 1) * len(xs)]]
        adv = model(batch, inputs=[x + d for x, d in zip(xs, deltas)], start_layer=layer)
        if task == "sst":
            loss = torch.nn.functional.kl_div(adv.log_softmax(-1), clean.log_softmax(-1), log_target=True,
                                              reduction="sum") + \
                torch.nn.functional.kl_div(clean.log_softmax(-1), adv.log_softmax(-1), log_target=True, reduction="sum")
        elif task == "quora":
            p, q = torch.sigmoid(adv), torch.sigmoid(clean)
            loss = ((p - q) * (adv - clean)).sum()  # Bernoulli symmetric KL
        else:
            loss = (adv - clean).pow(2).sum()
        want = torch.autograd.grad(loss, deltas)
        for (_, got, _, _), w in zip(rec.calls[step * len(xs):(step + 1) * len(xs)], want):
            assert got.abs().max() > 0
            torch.testing.assert_close(got, w, rtol=1e-7, atol=1e-12 * float(w.abs().max()))


@pytest.mark.parametrize("rule", ["projection", "mtdnn"])
@pytest.mark.parametrize("norm", ["inf", "l2"])
@pytest.mark.parametrize("norm_level", ["token", "sequence"])
def test_delta_stays_in_the_ball_and_off_padding(tokenizer, monkeypatch, rule, norm, norm_level):
    model = make_model()
    batch = make_batch(tokenizer, "sts", "bi")
    rec = Recorder(monkeypatch)
    eps = 1e-3
    reg = SMART(task="sts", kind="regression", mu=0.0, rule=rule, norm=norm, norm_level=norm_level,
                epsilon=eps if rule == "projection" else 1e-9, step_size=0.5, sigma=1e-3, steps=2)
    run(reg, model, batch)
    masks = model.masks(batch)
    assert len(rec.calls) == 4
    for i, (d_in, g, d_out, kwargs) in enumerate(rec.calls):
        pad = ~masks[i % 2].bool()
        assert kwargs["rule"] == rule and kwargs["norm"] == norm and kwargs["norm_level"] == norm_level
        assert torch.equal(kwargs["token_mask"], masks[i % 2])
        assert bool((d_in[pad] == 0).all()) and bool((d_out[pad] == 0).all())  # δ₀ and each update
        real = masks[i % 2].bool()
        if norm_level == "token":
            n = token_norms(d_out, norm)[real]
        else:
            z = d_out.double()
            n = z.abs().amax(dim=(1, 2)) if norm == "inf" else z.flatten(1).norm(dim=1)
        if rule == "projection":
            assert float(n.max()) <= eps * (1 + 1e-5)
            assert float(n.max()) > 0.5 * eps  # a step of 0.5 >> ε reaches the boundary
        else:
            torch.testing.assert_close(n.float(), torch.ones_like(n.float()), rtol=1e-2, atol=0)


def test_rs_vanishes_as_epsilon_shrinks(tokenizer):
    """Projection rule: R_s(ε) falls with ε and is exactly 0 at ε = 0 (shared dropout, train mode)."""
    batch = make_batch(tokenizer, "sst")
    values = []
    for eps in (1e-1, 1e-2, 1e-3, 1e-4, 1e-6, 0.0):
        model = make_model()
        torch.manual_seed(1)
        reg = SMART(task="sst", mu=0.0, epsilon=eps, step_size=1.0, sigma=1e-3, dropout="shared")
        _, terms = run(reg, model, batch)
        values.append(float(terms["smart"].detach()))
    assert values[0] > 0
    assert all(a > b for a, b in zip(values[:-2], values[1:-1])), values
    assert values[-2] < values[0] * 1e-4
    assert values[-1] == 0.0


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("task, encoding", CASES)
def test_shared_dropout_replays_the_clean_masks(tokenizer, task, encoding, layer):
    """δ = 0 in train mode: the perturbed pass equals the clean pass bit for bit only if every dropout
    mask (embeddings, attention, hidden, head; each sentence of a pair) is the same; eval mode is not."""
    batch = make_batch(tokenizer, task, encoding)
    model = make_model()
    assert model.training and model.bert.config.hidden_dropout_prob > 0
    torch.manual_seed(3)
    reg = SMART(task=task, kind=KIND[task], mu=0.0, layer=layer, sigma=0.0, noise="r3f", dropout="shared")
    _, terms = run(reg, model, batch)
    assert float(terms["smart"].detach()) == 0.0
    _, terms = run(SMART(task=task, kind=KIND[task], mu=0.0, layer=layer, sigma=0.0, noise="r3f", dropout="eval"),
                   model, batch)
    assert float(terms["smart"].detach()) > 0.0  # the control: the clean pass had dropout, the perturbed pass not
    # and the teacher's pass (MBPP, θ̃ = θ at the first call) replays the masks from the embeddings on
    _, terms = run(SMART(task=task, kind=KIND[task], lambda_s=0.0, layer=layer, dropout="shared"), model, batch)
    assert float(terms["bregman"].detach()) == 0.0
    _, terms = run(SMART(task=task, kind=KIND[task], lambda_s=0.0, layer=layer, dropout="eval"), model, batch)
    assert float(terms["bregman"].detach()) > 0.0


@pytest.mark.parametrize("task, encoding", CASES)
def test_eval_dropout_runs_the_extra_passes_without_dropout(tokenizer, task, encoding):
    """dropout="eval", δ = 0, layer 1: R_s = ℓ_s(layers ≥ 1 in eval mode on the clean pass's layer-1
    input, the clean output) and D_Breg = ℓ_s(the whole model in eval mode, the clean output);
    every module's mode is restored afterwards."""
    model, batch = make_model(), make_batch(tokenizer, task, encoding)
    model.heads[task].eval()  # a mixed state, to be restored as it was
    modes = [m.training for m in model.modules()]
    torch.manual_seed(4)
    _, terms = run(SMART(task=task, kind=KIND[task], layer=1, sigma=0.0, noise="r3f"), model, batch)
    assert [m.training for m in model.modules()] == modes
    torch.manual_seed(4)
    model.capture_layer = 1
    clean = model(batch).detach()
    kept, model.capture_layer, model.captured = model.captured, None, None
    model.eval()
    div = SMART(kind=KIND[task]).divergence
    with torch.no_grad():
        want_smart = div(model(batch, inputs=kept, start_layer=1), clean)
        want_bregman = div(model(batch), clean)
    assert float(want_smart) > 0 and float(want_bregman) > 0
    torch.testing.assert_close(terms["smart"].detach(), want_smart, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(terms["bregman"].detach(), want_bregman, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dropout", ["eval", "shared"])
def test_smart_leaves_the_global_rng_alone(tokenizer, dropout):
    model, batch = make_model(), make_batch(tokenizer, "sts", "bi")
    reg = SMART(task="sts", kind="regression", layer=1, steps=2, dropout=dropout)
    reg.before_forward(model, batch)
    output = model(batch)
    state = torch.get_rng_state()
    reg(model, batch, output)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.capture_layer is None and model.captured is None
    assert not model.bert.encoder.layer[1]._forward_pre_hooks and not model._forward_hooks


@pytest.mark.parametrize("task, encoding", CASES)
def test_layer_k_uses_the_captured_inputs(tokenizer, monkeypatch, task, encoding):
    """R_s via layer 1 (inputs kept from the trainer's forward, only layer 1 re-run) equals ℓ_s of the
    full model fed hidden_at(1) + δ."""
    model = make_model(torch.float64).eval()
    batch = make_batch(tokenizer, task, encoding)
    rec = Recorder(monkeypatch)
    reg = SMART(task=task, kind=KIND[task], mu=0.0, layer=1, sigma=1e-3, epsilon=1e-2, dropout="eval")
    _, terms = run(reg, model, batch)
    final = [out for _, _, out, _ in rec.calls]
    with torch.no_grad():
        clean = model(batch)
        xs = model.hidden_at(batch, 1)
        adv = model(batch, inputs=[x + d for x, d in zip(xs, final)], start_layer=1)
        want = reg.divergence(adv, clean)
    assert float(want) > 0
    torch.testing.assert_close(terms["smart"].detach(), want, rtol=1e-10, atol=0)


def test_final_term_trains_theta_through_both_outputs_and_ascent_makes_no_param_grads(tokenizer):
    model, batch = make_model(), make_batch(tokenizer, "sst")
    reg = SMART(task="sst", mu=0.0, epsilon=1e-2, step_size=1e-1)
    output, terms = run(reg, model, batch)
    assert all(p.grad is None for p in model.parameters())  # the ascent step used autograd.grad(ℓ, δ) only
    g_out, = torch.autograd.grad(terms["smart"], output, retain_graph=True)
    assert float(g_out.abs().max()) > 0  # the clean output is not detached in R_s
    terms["smart"].backward()
    emb = model.bert.embeddings.word_embeddings.weight.grad
    assert emb is not None and float(emb.abs().max()) > 0  # the perturbed pass reaches the embeddings
    assert float(model.heads["sst"].proj.weight.grad.abs().max()) > 0


def test_divergence_is_stable_when_probabilities_underflow():
    for kind, shape in (("single_label_classification", (4, 5)), ("binary_classification", (4,)), ("regression", (4,))):
        reg = SMART(kind=kind)
        p = (torch.randn(shape) * 1e4).requires_grad_(True)
        q = (-p.detach() + torch.randn(shape)).requires_grad_(True)
        for reduction in ("batchmean", "sum"):
            value = reg.divergence(p, q, reduction)
            gp, gq = torch.autograd.grad(value, (p, q))
            assert math.isfinite(float(value.detach())) and float(value.detach()) > 0
            assert bool(torch.isfinite(gp).all() and torch.isfinite(gq).all())
        assert float(reg.divergence(p, p.detach()).detach()) == 0.0
    with pytest.raises(ValueError, match=r"classification output must have shape \(B, C\), got \(4,\)"):
        SMART(kind="single_label_classification").divergence(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"binary_classification output must have shape \(B,\)"):
        SMART(kind="binary_classification").divergence(torch.zeros(4, 2), torch.zeros(4, 2))


# --- MBPP ----------------------------------------------------------------------------------------

def test_teacher_ema_equals_the_closed_form(tokenizer):
    """θ̃_n = β^n θ_0 + (1 − β) Σ_{j=1..n} β^{n−j} θ_j, for the trainable parameters only."""
    model, batch = make_model(), make_batch(tokenizer, "sst")
    for p in model.bert.parameters():  # a frozen encoder: the teacher covers only the heads
        p.requires_grad_(False)
    beta, n = 0.8, 6
    reg = SMART(task="sst", lambda_s=0.0, mu=1.0, beta=beta)
    run(reg, model, batch)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert set(reg.teacher) == set(trainable) and all(k.startswith("heads.") for k in reg.teacher)
    history = [{k: p.detach().double().clone() for k, p in trainable.items()}]
    for _ in range(n):
        with torch.no_grad():
            for p in trainable.values():
                p.add_(torch.randn_like(p))
        history.append({k: p.detach().double().clone() for k, p in trainable.items()})
        reg.after_step(model)
    for k in trainable:
        want = beta ** n * history[0][k] + sum((1 - beta) * beta ** (n - j) * history[j][k] for j in range(1, n + 1))
        torch.testing.assert_close(reg.teacher[k].double(), want, rtol=1e-5, atol=1e-6)


def test_tasks_share_one_teacher_updated_once_per_step(tokenizer):
    """One θ̃ for the model: every task's SMART with the same β shares it, its first task owns it,
    and the EMA is applied once per optimizer step however many tasks call after_step."""
    cfg = load_config(CONFIGS / "smarter.yaml", ["smart={mu: 1.0, beta: 0.5}", "tasks.sts.smart={beta: 0.9}"])
    regs = setup_regularizers(cfg)
    sst, quora, sts = (regs[t][-1] for t in ("sst", "quora", "sts"))
    assert sst.momentum_teacher is quora.momentum_teacher and sst.owns_teacher and not quora.owns_teacher
    assert sts.momentum_teacher is not sst.momentum_teacher and sts.owns_teacher  # another β, its own θ̃
    model = make_model()
    theta0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    run(quora, model, make_batch(tokenizer, "quora"))  # the shared teacher is created by any of its tasks
    assert sst.teacher is not None and sts.teacher is None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for reg in (sst, quora, sts):
        reg.after_step(model)
    for k, p in model.named_parameters():
        torch.testing.assert_close(sst.teacher[k], 0.5 * theta0[k] + 0.5 * p.detach())
    # only the owner saves θ̃ (it is one tensor set, however many tasks use it)
    assert sst.state_dict()["teacher"] is not None and quora.state_dict()["teacher"] is None


def test_bregman_is_zero_at_the_teacher_then_trains_the_student(tokenizer):
    model, batch = make_model(), make_batch(tokenizer, "quora")
    reg = SMART(task="quora", kind="binary_classification", lambda_s=0.0, mu=2.0, dropout="shared")
    _, terms = run(reg, model, batch)
    assert set(terms) == {"bregman"} and float(terms["bregman"].detach()) == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher = {k: v.clone() for k, v in reg.teacher.items()}
    output, terms = run(reg, model, batch)
    assert float(terms["bregman"].detach()) > 0
    terms["bregman"].backward()
    assert float(model.heads["quora"].proj.weight.grad.abs().max()) > 0
    assert all(torch.equal(teacher[k], reg.teacher[k]) for k in teacher)  # no gradient step on the teacher


def test_mbpp_refuses_partitioned_zero3_parameters(tokenizer):
    model, batch = make_model(), make_batch(tokenizer, "sst")
    model.heads["sst"].proj.weight.ds_id = 7  # what DeepSpeed ZeRO-3 puts on a partitioned parameter
    with pytest.raises(RuntimeError, match="ZeRO stage 3"):
        run(SMART(task="sst", mu=1.0), model, batch)
    run(SMART(task="sst", mu=0.0), model, batch)  # the smoothness term alone is fine


def test_state_dict_resumes_the_same_terms(tokenizer):
    batch = make_batch(tokenizer, "sts", "bi")
    model = make_model()
    reg = SMART(task="sts", kind="regression", epsilon=1e-2)
    for _ in range(2):
        run(reg, model, batch)
        with torch.no_grad():
            model.bert.encoder.layer[1].output.dense.bias.add_(0.05)
        reg.after_step(model)
    state = reg.state_dict()
    again = SMART(task="sts", kind="regression", epsilon=1e-2)
    again.load_state_dict(state)
    torch.manual_seed(5)
    _, a = run(reg, model, batch)
    torch.manual_seed(5)
    _, b = run(again, model, batch)
    assert set(a) == set(b) == {"smart", "bregman"}
    for k in a:
        assert float(a[k].detach()) == float(b[k].detach()) and float(a[k].detach()) > 0


# --- R3F -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_r3f_has_no_ascent_step(tokenizer, monkeypatch, distribution):
    def fail(*args, **kwargs):
        raise AssertionError("R3F must not take an ascent step")

    monkeypatch.setattr(smart_perturb_mod, "smart_perturb_step", fail)
    model, batch = make_model(), make_batch(tokenizer, "sst")
    reg = SMART(task="sst", mu=0.0, noise="r3f", r3f_distribution=distribution, sigma=0.5)
    noises = []
    real = reg.draw_noise
    reg.draw_noise = lambda like, mask, seed, dist: noises.append(real(like, mask, seed, dist)) or noises[-1]
    _, terms = run(reg, model, batch)
    assert float(terms["smart"].detach()) > 0
    z = noises[0]
    pad = ~batch.attention_mask.bool()
    assert bool((z[pad] == 0).all())
    real_z = z[~pad]
    if distribution == "uniform":
        assert float(real_z.abs().max()) <= 0.5 and float(real_z.abs().max()) > 0.45
    else:
        assert abs(float(real_z.std()) - 0.5) < 0.05


# --- the NaN guard -------------------------------------------------------------------------------

def test_nan_delta_gradient_skips_and_counts(tokenizer, monkeypatch):
    real = symmetric_kl_mod.symmetric_kl

    def poisoned(p, q, reduction="batchmean"):  # the ascent loss (reduction "sum") becomes NaN
        value = real(p, q, reduction)
        return value * float("nan") if reduction == "sum" else value

    monkeypatch.setattr(symmetric_kl_mod, "symmetric_kl", poisoned)
    rec = Recorder(monkeypatch)
    model, batch = make_model(), make_batch(tokenizer, "sst")
    reg = SMART(task="sst", mu=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # so that the Bregman term is not 0
    output, terms = run(reg, model, batch)
    assert float(terms["smart"].detach()) == 0.0 and terms["smart"].grad_fn is None
    assert float(terms["bregman"].detach()) >= 0 and math.isfinite(float(terms["bregman"].detach()))
    assert reg.stats()["smart_skipped"] == 1 and reg.stats()["bregman_skipped"] == 0
    assert not rec.calls  # skipped at the gradient: no step on δ, no adversarial forward
    (torch.nn.functional.cross_entropy(output, batch.labels) + sum(terms.values())).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_non_finite_perturbed_loss_skips_and_counts(tokenizer, monkeypatch):
    real = smart_perturb_mod.smart_perturb_step
    monkeypatch.setattr(smart_perturb_mod, "smart_perturb_step", lambda *a, **k: real(*a, **k) * float("inf"))
    model, batch = make_model(), make_batch(tokenizer, "sts", "bi")
    reg = SMART(task="sts", kind="regression", mu=0.0)
    _, terms = run(reg, model, batch)
    assert float(terms["smart"].detach()) == 0.0 and reg.skipped == 1


def _overrides(ckpt, out, *extra):
    return [f"model={ckpt}", f"data.dir={FIXTURES}", f"output_dir={out}", "quiet=true", "log_every=1",
            "predict=false", *[f"tasks.{t}.batch_size=8" for t in ("sst", "quora", "sts")], *extra]


def _records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_nan_guard_in_training_keeps_the_weights_finite(tiny_checkpoint, tmp_path, monkeypatch):
    real = symmetric_kl_mod.symmetric_kl
    monkeypatch.setattr(symmetric_kl_mod, "symmetric_kl",
                        lambda p, q, reduction="batchmean": real(p, q, reduction) * (float("nan") if reduction == "sum" else 1.0))
    out = tmp_path / "run"
    cfg = load_config(CONFIGS / "smarter.yaml", _overrides(tiny_checkpoint, out, "max_steps=3", "tasks=sst"))
    train(cfg)
    rows = _records(out)
    assert not [r for r in rows if r.get("event") == "nonfinite_skip"]  # the trainer never saw a NaN
    stats = [r for r in rows if "smart_skipped" in r]
    assert stats[-1]["smart_skipped"] == 3 and stats[-1]["task"] == "sst"
    state = torch.load(out / "checkpoint" / "checkpoint.pt", weights_only=False)["engine"]["model"]
    base = BertModel.from_pretrained(tiny_checkpoint).state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert any(not torch.equal(base[k], state[f"bert.{k}"]) for k in base)


# --- the trainer ---------------------------------------------------------------------------------

def test_zero_weights_train_bit_for_bit_like_the_plain_trainer(tiny_checkpoint, tmp_path):
    results = []
    for name, extra in (("plain", []), ("smart", ["smart={lambda_s: 0, mu: 0}"])):
        out = tmp_path / name
        cfg = load_config(CONFIGS / "multitask-joint.yaml", _overrides(tiny_checkpoint, out, "max_steps=3", *extra))
        assert (cfg.smart is not None) == (name == "smart")
        train(cfg)
        losses = [(r["step"], r["task"], r["loss"]) for r in _records(out) if "loss" in r]
        state = torch.load(out / "checkpoint" / "checkpoint.pt", weights_only=False)["engine"]["model"]
        results.append((losses, state))
    assert results[0][0] == results[1][0] and len(results[0][0]) == 9
    assert results[0][1].keys() == results[1][1].keys()
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])


@pytest.mark.parametrize("recipe", ["smarter", "round-robin-smart"])
def test_recipes_log_smart_and_bregman_terms(recipe, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(CONFIGS / f"{recipe}.yaml", _overrides(tiny_checkpoint, out, "max_steps=3", "epochs=1"))
    assert cfg.smart is not None
    result = train(cfg)
    assert math.isfinite(result["best_overall"])
    rows = _records(out)
    train_rows = [r for r in rows if r.get("split") == "train" and "loss" in r]
    assert train_rows and all(math.isfinite(r["smart"]) and math.isfinite(r["bregman"]) for r in train_rows)
    assert any(r["smart"] > 0 for r in train_rows)
    stats = [r for r in rows if "smart_skipped" in r]
    assert stats and all(r["smart_skipped"] == 0 and r["bregman_skipped"] == 0 for r in stats)
    assert {r["task"] for r in stats} == {r["task"] for r in train_rows}


def test_resume_restores_the_teacher(tiny_checkpoint, tmp_path):
    common = ["max_steps=4", "save_every=2", "tasks=sst", "smart={epsilon: 1.0e-3}"]
    full = tmp_path / "full"
    train(load_config(CONFIGS / "smarter.yaml", _overrides(tiny_checkpoint, full, *common)))
    cut = tmp_path / "cut"
    cfg = load_config(CONFIGS / "smarter.yaml", _overrides(tiny_checkpoint, cut, *common))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, stop_at_step=3)
    train(cfg, resume=str(cut / "checkpoint"))
    want = {r["step"]: (r["loss"], r["smart"], r["bregman"]) for r in _records(full) if "loss" in r and r["step"] >= 3}
    got = {r["step"]: (r["loss"], r["smart"], r["bregman"]) for r in _records(cut) if "loss" in r and r["step"] >= 3}
    assert len(want) == 2 and got == want


# --- the Triton path (interpreted on CPU) --------------------------------------------------------

def test_triton_kernels_in_the_loop(tokenizer, monkeypatch, triton_backend):
    """With the Triton kernels (noise, perturbation step, symmetric KL) SMART runs and keeps δ in the ball."""
    model, batch = make_model(), make_batch(tokenizer, "quora", n=4)
    rec = Recorder(monkeypatch)
    reg = SMART(task="quora", kind="binary_classification", epsilon=1e-3, step_size=1e-1, sigma=1e-4)
    output, terms = run(reg, model, batch)
    assert all(math.isfinite(float(v.detach())) for v in terms.values()) and float(terms["smart"].detach()) > 0
    d_in, _, d_out, _ = rec.calls[0]
    pad = ~batch.attention_mask.bool()
    assert bool((d_in[pad] == 0).all() and (d_out[pad] == 0).all())
    assert float(d_out.abs().max()) <= 1e-3 * (1 + 1e-6)
    sum(terms.values()).backward()
