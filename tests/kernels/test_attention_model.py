"""minbert with attn_implementation="triton" (the fused kernel, interpreted on CPU)."""
import torch

from minbert import BertConfig, BertModel, Tokenizer, default_checkpoint


def test_triton_matches_torch_on_embedded_checkpoint(triton_backend, device):
    folder = default_checkpoint()
    tok = Tokenizer.from_pretrained(folder)
    batch = tok(["A lovely film.", "Not good at all, and far too long for its own good."], ["Yes.", "No"], max_length=24)
    batch = {k: v.to(device) for k, v in batch.items()}
    ref = BertModel.from_pretrained(folder, attn_implementation="torch").to(device).eval()
    ours = BertModel.from_pretrained(folder, attn_implementation="triton").to(device).eval()
    with torch.no_grad():
        a, b = ref(**batch), ours(**batch)
    keep = batch["attention_mask"].bool()
    assert (a.last_hidden_state - b.last_hidden_state)[keep].abs().max().item() <= 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max().item() <= 1e-5


def test_triton_attention_trains_a_tiny_model(triton_backend, device):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
                     max_position_embeddings=16, attention_probs_dropout_prob=0.1, attn_implementation="triton")
    model = BertModel(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(1, 50, (3, 9)).to(device)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    target = torch.randn(3, 32).to(device)
    losses = []
    for _ in range(4):
        out = model(ids, mask)
        loss = (out.pooler_output - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
