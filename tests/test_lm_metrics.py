"""The LM's reported loss is its cross entropy whatever is optimised; the stage-1 objectives'
gradients; interval averages of the console/TensorBoard/wandb lines."""

from functools import partial

import pytest
import torch

from megatron_looprpt.models.builder import LoopedModelConfig, build_model
from megatron_looprpt.models.exit_gate import exit_distribution, exit_log_distribution
from megatron_looprpt.models.loss import ExitLossConfig, stage1_token_loss
from megatron_looprpt.models.step_weights import step_weights
from megatron_looprpt.training.logger import IntervalAverage, format_line
from megatron_looprpt.training.loop import lm_record
from megatron_looprpt.training.objectives import lm_objective
from megatron_looprpt.schedule import eval_step, make_forward_step

T, B, S, V = 4, 2, 16, 128


def _batches(num=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        tokens = torch.randint(0, V, (B, S + 1), generator=g)
        mask = torch.ones(B, S)
        mask[0, -3:] = 0   # a partial mask: the sums must respect it
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
                    "position_ids": torch.arange(S).expand(B, -1)})
    return out


def _evaluate(pm, cfg):
    return lm_record(eval_step(pm, _batches(), make_forward_step(partial(lm_objective, cfg=cfg))))


def test_same_weights_same_lm_loss_under_any_objective(single_process_parallel):
    model_cfg = LoopedModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                  ffn_hidden_size=96, vocab_size=V, max_position_embeddings=S, loop_steps=T)
    pm = build_model(model_cfg, seed=5, wrap_ddp=False)
    with torch.no_grad():
        pm.model.exit_gate.bias.fill_(0.7)   # a gate far from uniform, so H(p) matters
    small = _evaluate(pm, ExitLossConfig(entropy_coef=0.05))
    large = _evaluate(pm, ExitLossConfig(entropy_coef=5.0))
    stage2 = _evaluate(pm, ExitLossConfig(stage="stage2"))
    uniform = _evaluate(pm, ExitLossConfig(step_weights="uniform"))
    for other in (large, stage2, uniform):
        assert other["lm_loss"] == small["lm_loss"]
        assert other["step_loss"] == small["step_loss"] and other["qexit_loss"] == small["qexit_loss"]
    assert abs(large["objective"] - small["objective"]) > 1.0
    assert stage2["objective"] < 1.0 < small["lm_loss"]     # the gate's BCE, not a cross entropy
    # lm_loss is the expected CE under the exit distribution, and the stage-1 objective is it
    # less beta times the exit entropy
    assert small["objective"] == pytest.approx(small["lm_loss"] - 0.05 * small["exit_entropy"], rel=1e-5)
    assert large["objective"] == pytest.approx(large["lm_loss"] - 5.0 * large["exit_entropy"], rel=1e-5)
    # computed directly, from one full forward pass
    pm.model.eval()
    nll_sum = torch.zeros(T)
    expected_sum = qexit_sum = tokens = 0.0
    with torch.no_grad():
        for batch in _batches():
            out = pm.model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            ce = -out.stack("label_logprobs")
            p = exit_distribution(out.stack("gate_logits"))
            mask = batch["loss_mask"]
            expected_sum += ((p * ce).sum(0) * mask).sum().item()
            nll_sum += (ce * mask).sum(dim=(1, 2))
            first = torch.argmax((torch.cumsum(p, 0) >= 0.9).to(torch.int8), dim=0)
            qexit_sum += (ce.gather(0, first.unsqueeze(0)).squeeze(0) * mask).sum().item()
            tokens += mask.sum().item()
    assert small["lm_loss"] == pytest.approx(expected_sum / tokens, rel=1e-5)
    assert small["step_loss"] == pytest.approx((nll_sum / tokens).tolist(), rel=1e-5)
    assert small["qexit_loss"] == pytest.approx(qexit_sum / tokens, rel=1e-5)


def _leaves(seed=0):
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(T, B, S, generator=g) * 5).requires_grad_()
    gates = torch.randn(T, B, S, generator=g).requires_grad_()
    return logprobs, gates


def test_step_weights():
    assert step_weights("last", 3) == [0, 0, 1]
    assert step_weights("uniform", 4) == [0.25] * 4
    assert step_weights("progressive", 3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert step_weights("1,0,3", 3) == [0.25, 0, 0.75]
    assert step_weights("last:0.7", 4) == pytest.approx([0.1, 0.1, 0.1, 0.7])
    assert step_weights("last:0.7", 1) == [1.0] and step_weights("last:1", 3) == [0, 0, 1]
    for bad in ("1,2", "fast", "0,0,0", "-1,2,0", "last:0", "last:1.5", "last:x"):
        with pytest.raises(ValueError, match="step weights"):
            step_weights(bad, 3)


@pytest.mark.parametrize("weights", ["exit", "uniform", "progressive", "last", "1,1,0,2", "last:0.7"])
def test_stage1_step_weights_gradients(weights):
    beta = 0.3
    logprobs, gates = _leaves()
    stage1_token_loss(logprobs, gates, beta, weights).sum().backward()
    ref_logprobs, ref_gates = _leaves()
    log_p = exit_log_distribution(ref_gates)
    p = log_p.exp()
    entropy = -(p * log_p).sum(0)
    ramp = torch.arange(1, T + 1, dtype=p.dtype).view(T, 1, 1) / (T * (T + 1) / 2)
    backbone_weights = {"exit": p.detach(), "uniform": torch.full_like(p, 1.0 / T), "progressive": ramp.expand_as(p),
                        "last": torch.nn.functional.one_hot(torch.full((B, S), T - 1), T).permute(2, 0, 1).float(),
                        "1,1,0,2": torch.tensor([0.25, 0.25, 0.0, 0.5]).view(T, 1, 1).expand_as(p),
                        "last:0.7": torch.tensor([0.1, 0.1, 0.1, 0.7]).view(T, 1, 1).expand_as(p)}
    # the backbone's step-t loss is weighted as asked ...
    assert torch.allclose(logprobs.grad, -backbone_weights[weights], atol=1e-6)
    # ... and the gate always learns Ouro's exit objective on the per-step losses
    ((p * -ref_logprobs.detach()).sum(0) - beta * entropy).sum().backward()
    assert torch.allclose(gates.grad, ref_gates.grad, atol=1e-5)
    # the value is the backbone's loss less beta H(p)
    value = stage1_token_loss(logprobs.detach(), gates.detach(), beta, weights)
    backbone = (backbone_weights[weights] * -ref_logprobs.detach()).sum(0)
    assert torch.allclose(value, backbone - beta * entropy.detach(), atol=1e-5)


def test_step_increase_penalty_trains_only_the_step_that_rose():
    beta, lam = 0.3, 0.5
    logprobs, gates = _leaves()
    stage1_token_loss(logprobs, gates, beta, "uniform", increase_penalty=lam).sum().backward()
    plain, plain_gates = _leaves()
    stage1_token_loss(plain, plain_gates, beta, "uniform").sum().backward()
    ce = -logprobs.detach()
    rose = torch.zeros_like(ce)
    rose[1:] = (ce[1:] > ce[:-1]).float()
    assert 0.2 < rose[1:].mean() < 0.8   # the case is not trivial
    # each step's extra gradient is lambda where it rose above the step before, and nothing
    # reaches the step it rose above
    assert torch.allclose(logprobs.grad, plain.grad - lam * rose, atol=1e-6)
    assert torch.allclose(gates.grad, plain_gates.grad, atol=1e-6)
    value = stage1_token_loss(logprobs.detach(), gates.detach(), beta, "uniform", increase_penalty=lam)
    base = stage1_token_loss(logprobs.detach(), gates.detach(), beta, "uniform")
    assert torch.allclose(value - base, lam * torch.clamp(ce[1:] - ce[:-1], min=0).sum(0), atol=1e-5)


def test_interval_average_of_the_console_line():
    interval = IntervalAverage()
    records = [
        {"iteration": 1, "lm_loss": 4.0, "objective": 3.9, "qexit_loss": 4.1, "step_loss": [4.0, 5.0],
         "exit_step": 1.5, "qexit_steps": 2.0, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_sec": 2000.0,
         "tflops_per_device": 0.2, "mfu": None, "iteration_time": 1.0},
        {"iteration": 2, "lm_loss": 2.0, "objective": 1.9, "qexit_loss": 2.1, "step_loss": [2.0, 3.0],
         "exit_step": 1.5, "qexit_steps": 2.0, "grad_norm": 3.0, "lr": 2e-3, "tokens_per_sec": 200.0,
         "tflops_per_device": 0.02, "mfu": None, "iteration_time": 10.0},
    ]
    for record in records:
        interval.add(record)
    average = interval.pop()
    assert average["iteration"] == 2 and average["lr"] == 2e-3          # the last
    assert average["lm_loss"] == 3.0 and average["grad_norm"] == 2.0     # means
    assert average["step_loss"] == [3.0, 4.0]
    # rates are total work over total time: 4000 tokens in 11 s, not the mean of 2000 and 200
    assert average["tokens_per_sec"] == pytest.approx(4000 / 11)
    assert average["tflops_per_device"] == pytest.approx((0.2 + 0.2) / 11)
    assert average["iteration_time"] == 5.5 and average["mfu"] is None
    line = format_line(average, 10)
    assert "tokens/s 364 " in line and "lm loss 3.0000" in line and "objective 2.9000" in line
    assert interval.records == []   # the next interval starts empty


def test_the_quickstart_says_whether_the_loops_help():
    from megatron_looprpt.quickstart import loop_verdict

    assert loop_verdict([4.4, 4.3, 4.3, 4.2]).startswith("the loops help: held-out loss falls")
    assert loop_verdict([4.4, 4.5, 4.6, 4.7]).startswith("the loops do not help: loop step 1")
    assert loop_verdict([4.4, 4.3, 4.35, 4.5]).startswith("the loops help up to step 2")
