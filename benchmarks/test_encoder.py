"""Encoder forward+backward: minbert vs transformers.BertModel on the embedded checkpoint.

Run: ``pytest benchmarks/test_encoder.py --benchmark-only`` (CPU, batch 32 x length 128).
Both providers run in the same session so their ratio is meaningful on a noisy machine.
"""
import pytest
import torch

from minbert import BertModel, default_checkpoint

BATCH, LENGTH = 32, 128


def _batch(vocab, padded=True):
    """Lengths drawn from 1/3..1 of L (realistic fine-tuning padding), or all full (no padding)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (BATCH, LENGTH), generator=g)
    lengths = torch.randint(LENGTH // 3, LENGTH + 1, (BATCH,), generator=g)
    lengths[0] = LENGTH
    if not padded:
        lengths[:] = LENGTH
    mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
    return ids * mask, mask, torch.zeros_like(ids)


def _step(model, ids, mask, types):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    (out.last_hidden_state.float().pow(2).mean() + out.pooler_output.float().sum()).backward()


def _model(provider):
    folder = default_checkpoint()
    if provider == "transformers":
        transformers = pytest.importorskip("transformers")
        return transformers.BertModel.from_pretrained(str(folder)).train()
    impl = provider.split(":")[1]
    return BertModel.from_pretrained(folder, attn_implementation=impl).train()


@pytest.mark.parametrize("padding", ["padded", "full"])
@pytest.mark.parametrize("provider", ["minbert:torch", "minbert:math", "transformers"])
def test_encoder_fwd_bwd(benchmark, provider, padding):
    torch.manual_seed(0)
    model = _model(provider)
    ids, mask, types = _batch(model.config.vocab_size, padded=padding == "padded")
    benchmark.group = f"encoder fwd+bwd B={BATCH} L={LENGTH} ({padding})"
    benchmark.extra_info.update(provider=provider, threads=torch.get_num_threads())
    benchmark.pedantic(_step, args=(model, ids, mask, types), rounds=8, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("provider", ["minbert:torch", "minbert:math", "transformers"])
def test_encoder_forward_eval(benchmark, provider):
    torch.manual_seed(0)
    model = _model(provider).eval()
    ids, mask, types = _batch(model.config.vocab_size)
    benchmark.group = f"encoder forward (eval, no grad) B={BATCH} L={LENGTH}"
    benchmark.extra_info.update(provider=provider, threads=torch.get_num_threads())

    def forward():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, token_type_ids=types)

    benchmark.pedantic(forward, rounds=8, warmup_rounds=2, iterations=1)
