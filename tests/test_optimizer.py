"""The training optimizer: fused AdamW where torch has it, the same updates as the per-tensor loop."""

from __future__ import annotations

import torch

from lhtcli.config import ModelConfig
from lhtcli.model import LHTEncoder
from lhtcli.training.optimizer import build_adamw, keep_fused


def tiny_model(seed: int = 0) -> LHTEncoder:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_heads=2, num_layers=2, d_ff=32, max_seq_len=32, dropout=0.0)
    return LHTEncoder(cfg)


def set_grads(model: LHTEncoder, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=gen)


def test_cpu_optimizer_is_fused_and_keeps_the_decay_groups():
    model = tiny_model()
    opt = build_adamw(model, lr=1e-3, weight_decay=0.1)
    assert opt.defaults["fused"] is True
    decays = {len(g["params"]): g["weight_decay"] for g in opt.param_groups}
    matrices = sum(p.dim() >= 2 for p in model.parameters())
    assert decays == {matrices: 0.1, sum(1 for _ in model.parameters()) - matrices: 0.0}
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6


def test_fused_steps_match_the_per_tensor_loop():
    fused_model, loop_model = tiny_model(), tiny_model()
    fused = build_adamw(fused_model, lr=1e-2, weight_decay=0.1)
    loop = torch.optim.AdamW(loop_model.optimizer_groups(0.1), lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    for step in range(3):
        set_grads(fused_model, step)
        set_grads(loop_model, step)
        fused.step()
        loop.step()
    moved = 0.0
    for (name, a), b, start in zip(fused_model.named_parameters(), loop_model.parameters(), tiny_model().parameters(),
                                   strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, float((a - start).detach().abs().max()))
    assert moved > 1e-3  # the steps did change the weights


def test_a_state_saved_by_the_loop_resumes_fused():
    old_model = tiny_model()
    old = torch.optim.AdamW(old_model.optimizer_groups(0.1), lr=1e-2)  # fused=None, as older checkpoints
    set_grads(old_model, 0)
    old.step()
    model = tiny_model()
    opt = build_adamw(model, lr=1e-2, weight_decay=0.1)
    opt.load_state_dict(old.state_dict())
    assert all(not g["fused"] for g in opt.param_groups)  # what load_state_dict alone leaves
    keep_fused(opt)
    assert all(g["fused"] is True for g in opt.param_groups)
    set_grads(model, 1)
    opt.step()  # the fused kernel continues the restored moments
    assert all(float(state["step"]) == 2.0 for state in opt.state.values())
