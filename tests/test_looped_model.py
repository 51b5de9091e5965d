"""Single-process properties of the looped model."""

import torch
from megatron.core.models.gpt import GPTModel

from megatron_looprpt.models.builder import LoopedModelConfig, build_stage, transformer_config
from megatron_looprpt.models.exit_gate import exit_distribution, expected_exit_step, q_exit_steps
from megatron_looprpt.models.init_weights import init_weights
from megatron_looprpt.models.layer_specs import sandwich_layer_spec
from megatron_looprpt.models.loss import stage1_token_loss, stage2_token_loss, ExitLossConfig
from megatron_looprpt.models.looped_gpt import HeadRequest

SEQ, BATCH, VOCAB = 12, 2, 128


def make_model(loops, untie=True, **loop_options):
    cfg = LoopedModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=96, vocab_size=VOCAB, max_position_embeddings=32, loop_steps=loops,
        untie_embeddings_and_output_weights=untie, **loop_options,
    )
    model = build_stage(cfg)
    init_weights(model, seed=3, std=0.05, effective_depth=2 * loops)
    # A non-trivial gate so that the exit distribution is not uniform.
    with torch.no_grad():
        model.exit_gate.bias.fill_(-0.3)
    return cfg, model


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:], torch.arange(SEQ).expand(BATCH, -1)


def test_one_loop_step_reproduces_megatron_gpt_model(single_process_parallel):
    cfg, looped = make_model(loops=1)
    gpt = GPTModel(
        config=transformer_config(cfg), transformer_layer_spec=sandwich_layer_spec("local"),
        vocab_size=cfg.padded_vocab_size, max_sequence_length=cfg.max_position_embeddings,
        position_embedding_type="rope", share_embeddings_and_output_weights=False,
        rotary_base=cfg.rotary_base,
    )
    ours = looped.state_dict()
    theirs = gpt.state_dict()
    for name in theirs:
        if name.endswith("_extra_state"):
            continue
        source = "final_layernorm.weight" if name == "decoder.final_layernorm.weight" else name
        theirs[name] = ours[source]
    gpt.load_state_dict(theirs)
    tokens, labels, positions = batch()
    expected = gpt(tokens, positions, None)
    out = looped(tokens, positions, None, head=HeadRequest(label_logprobs=False, logits=True))
    assert torch.allclose(out.steps[0].logits, expected, atol=1e-5, rtol=0)


def test_parameter_count_does_not_depend_on_loop_steps(single_process_parallel):
    counts = {loops: sum(p.numel() for p in make_model(loops)[1].parameters()) for loops in (1, 2, 4)}
    assert len(set(counts.values())) == 1, counts


def test_per_step_outputs_and_exit_distribution(single_process_parallel):
    loops = 4
    _, model = make_model(loops)
    tokens, labels, positions = batch()
    out = model(tokens, positions, None, labels=labels,
                head=HeadRequest(entropy=True, predictions=True, hidden=True, logits=True))
    assert len(out.steps) == loops
    for step in out.steps:
        log_probs = torch.log_softmax(step.logits.float(), dim=-1)
        expected = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(step.label_logprobs, expected, atol=1e-5)
        assert torch.allclose(step.entropy, -(log_probs.exp() * log_probs).sum(-1), atol=1e-5)
        assert torch.equal(step.predictions, step.logits.argmax(-1))
        assert step.hidden.shape == (SEQ, BATCH, 64)
    # Steps differ: the block really is applied again.
    assert not torch.allclose(out.steps[0].logits, out.steps[-1].logits)
    p = exit_distribution(out.stack("gate_logits"))
    assert torch.allclose(p.sum(0), torch.ones(BATCH, SEQ), atol=1e-6)
    assert torch.all(p >= 0)
    assert torch.equal(q_exit_steps(p, 1.0), torch.full((BATCH, SEQ), loops - 1))
    assert torch.all(q_exit_steps(p, 0.3) < loops - 1)
    e = expected_exit_step(p)
    assert torch.all((e >= 1) & (e <= loops))


def test_loop_step_embedding_starts_as_ouro_and_tells_the_steps_apart(single_process_parallel):
    _, plain = make_model(loops=3)
    _, embedded = make_model(loops=3, loop_step_embedding=True)
    assert embedded.loop_step_embedding.shape == (3, 64)
    tokens, labels, positions = batch(2)
    head = HeadRequest(logits=True)
    # initialised to zero, every other weight drawn as without it: the same model as Ouro's
    expected = plain(tokens, positions, None, labels=labels, head=head)
    got = embedded(tokens, positions, None, labels=labels, head=head)
    for e, g in zip(expected.steps, got.steps):
        assert torch.equal(e.logits, g.logits)
    # its gradient reaches every step's vector, and a vector moves only the steps from its own on
    stage1_token_loss(got.stack("label_logprobs"), got.stack("gate_logits"), 0.05).mean().backward()
    assert torch.all(embedded.loop_step_embedding.grad.abs().sum(-1) > 0)
    with torch.no_grad():
        embedded.loop_step_embedding[1].normal_(std=0.5)
        moved = embedded(tokens, positions, None, labels=labels, head=head)
    assert torch.equal(moved.steps[0].logits, expected.steps[0].logits)
    assert not torch.allclose(moved.steps[1].logits, expected.steps[1].logits)
    assert not torch.allclose(moved.steps[2].logits, expected.steps[2].logits)


def _by_hand(model, tokens, positions, inject: bool, carry_residual: bool) -> list:
    """Each step's logits, the loop written out: what --loop-input-injection and --loop-carry
    residual are documented to compute."""
    rope = model.rotary_pos_emb(tokens.shape[1])
    embedded = model.embedding(input_ids=tokens, position_ids=positions)
    unit_embedded = embedded * torch.rsqrt(embedded.pow(2).mean(-1, keepdim=True) + 1e-6)
    state, logits = embedded, []
    for step in range(model.loop_steps):
        block_input = state + unit_embedded if inject and step > 0 else state
        residual = model.decoder(hidden_states=block_input, attention_mask=None, rotary_pos_emb=rope)
        normed = model.final_layernorm(residual)
        logits.append(model.output_layer(normed)[0].transpose(0, 1))
        state = residual if carry_residual else normed
    return logits


def test_input_injection_and_residual_carry_compute_what_they_say(single_process_parallel):
    tokens, labels, positions = batch(4)
    head = HeadRequest(logits=True)
    _, plain = make_model(loops=3)
    plain_steps = plain(tokens, positions, None, labels=labels, head=head).steps
    for inject, carry in ((True, "normed"), (False, "residual"), (True, "residual")):
        _, model = make_model(loops=3, loop_input_injection=inject, loop_carry=carry)
        got = model(tokens, positions, None, labels=labels, head=head)
        with torch.no_grad():
            expected = _by_hand(model, tokens, positions, inject, carry == "residual")
        for step, (e, g) in enumerate(zip(expected, got.steps)):
            assert torch.allclose(e, g.logits, atol=1e-5, rtol=1e-5), (inject, carry, step)
        # no new weights, the first step untouched: only what later steps read changes
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
        assert torch.equal(got.steps[0].logits, plain_steps[0].logits)
        assert not torch.allclose(got.steps[1].logits, plain_steps[1].logits)
        # later steps' losses reach the embedding through the injection and the carried state
        stage1_token_loss(got.stack("label_logprobs"), got.stack("gate_logits"), 0.05).mean().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_head_recompute_gives_the_same_gradients(single_process_parallel):
    _, model = make_model(loops=3)
    tokens, labels, positions = batch(1)
    grads = []
    for recompute in (True, False):
        model.zero_grad()
        out = model(tokens, positions, None, labels=labels, head=HeadRequest(recompute=recompute))
        loss = stage1_token_loss(out.stack("label_logprobs"), out.stack("gate_logits"), 0.05).mean()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_stage1_loss_matches_direct_formula():
    torch.manual_seed(0)
    logp = -torch.rand(3, 2, 5) * 4
    gates = torch.randn(3, 2, 5)
    lam = torch.sigmoid(gates)
    p = torch.stack([lam[0], (1 - lam[0]) * lam[1], (1 - lam[0]) * (1 - lam[1])])
    expected = (p * -logp).sum(0) + 0.1 * (p * p.log()).sum(0)
    assert torch.allclose(stage1_token_loss(logp, gates, 0.1), expected, atol=1e-6)


def test_stage2_trains_only_the_gate():
    logp = (-torch.rand(3, 2, 5) * 4).requires_grad_()
    gates = torch.randn(3, 2, 5, requires_grad=True)
    stage2_token_loss(logp, gates, ExitLossConfig(stage="stage2")).sum().backward()
    assert logp.grad is None
    assert gates.grad[:-1].abs().sum() > 0
    # The last step's gate never decides anything: all remaining mass exits there.
    assert gates.grad[-1].abs().sum() == 0


def test_fused_label_log_probs_and_entropy_equal_the_separate_reductions(single_process_parallel):
    from megatron_looprpt.models import vocab_parallel

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 50, generator=g) * 4
    labels = torch.randint(0, 50, (5, 3), generator=g)
    with torch.no_grad():
        logp, ent = vocab_parallel.label_log_probs_and_entropy(logits, labels)
    direct = torch.log_softmax(logits.double(), dim=-1)
    torch.testing.assert_close(logp.double(), direct.gather(-1, labels.unsqueeze(-1)).squeeze(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), -(direct.exp() * direct).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp, vocab_parallel.label_log_probs(logits.clone(), labels))
    torch.testing.assert_close(ent, vocab_parallel.entropy(logits))
