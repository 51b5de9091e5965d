"""tools/checkpoint/convert.py: Hugging Face Ouro <-> megatron_looprpt checkpoints, with resharding.

The Hugging Face side is built here from the published architecture (Ouro's modeling_ouro.py:
parameter names and shapes, the sandwich norms, the per-step final norm and exit gate), with a
plain-PyTorch forward of those weights to compare our megatron-core model against.
"""

import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_looprpt.training.checkpointing import read_checkpoint_info
from tests.torchrun import ROOT, run

CONVERT = os.path.join(ROOT, "tools", "checkpoint", "convert.py")
VOCAB = 100  # not a multiple of 128: Megatron pads it, the HF side never sees the padding
WORDS = [f"w{i}" for i in range(VOCAB - 2)]


def ouro_config(tied: bool, loop_steps: int, num_layers: int = 2) -> dict:
    """A config.json with the fields of Ouro's published checkpoints."""
    return {
        "architectures": ["OuroForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_ouro.OuroConfig",
                     "AutoModel": "modeling_ouro.OuroModel",
                     "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"},
        "model_type": "ouro", "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1,
        "pad_token_id": 0, "hidden_act": "silu", "hidden_size": 32, "head_dim": 8,
        "initializer_range": 0.02, "intermediate_size": 48, "max_position_embeddings": 128,
        "max_window_layers": num_layers, "num_attention_heads": 4, "num_hidden_layers": num_layers,
        # RoPE base and norm epsilon as Ouro's (not our defaults), so a field dropped on the way shows
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_scaling": None, "rope_theta": 1000000.0,
        "sliding_window": None, "use_sliding_window": False, "layer_types": ["full_attention"] * num_layers,
        "tie_word_embeddings": tied, "torch_dtype": "float32", "total_ut_steps": loop_steps,
        "early_exit_threshold": 1.0, "use_cache": True, "vocab_size": VOCAB, "transformers_version": "4.55.0",
        "custom_note": "a field the converter does not know",
    }


def ouro_weights(config: dict, seed: int) -> dict:
    """Random weights with O(1) activations (so a wrong mapping shows in the logits)."""
    g = torch.Generator().manual_seed(seed)
    h, ffn, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]

    def mat(rows, cols):
        return torch.randn(rows, cols, generator=g) / cols ** 0.5

    def norm():
        return 1 + 0.3 * torch.randn(h, generator=g)

    # logits O(1): large enough for any mis-mapped tensor to show, small enough for fp32 to
    # stay within 1e-5 of the float64 reference
    w = {"model.embed_tokens.weight": 0.3 * torch.randn(VOCAB, h, generator=g), "model.norm.weight": norm(),
         "model.early_exit_gate.weight": mat(1, h), "model.early_exit_gate.bias": torch.randn(1, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.q_proj.weight": mat(q, h), p + "self_attn.k_proj.weight": mat(kv, h),
                  p + "self_attn.v_proj.weight": mat(kv, h), p + "self_attn.o_proj.weight": mat(h, q),
                  p + "mlp.gate_proj.weight": mat(ffn, h), p + "mlp.up_proj.weight": mat(ffn, h),
                  p + "mlp.down_proj.weight": mat(h, ffn), p + "input_layernorm.weight": norm(),
                  p + "input_layernorm_2.weight": norm(), p + "post_attention_layernorm.weight": norm(),
                  p + "post_attention_layernorm_2.weight": norm()})
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = 0.3 * torch.randn(VOCAB, h, generator=g)
    return w


def write_tokenizer(directory) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(directory, "tokenizer.json"))


def write_hf(directory, tied=False, loop_steps=4, sharded=False, seed=0, num_layers=2) -> dict:
    """An Ouro checkpoint directory (one safetensors file, or two shards with an index); returns
    its weights."""
    os.makedirs(directory, exist_ok=True)
    config = ouro_config(tied, loop_steps, num_layers)
    weights = ouro_weights(config, seed)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    if sharded:
        names = list(weights)
        halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for file_name, part in halves.items():
            save_file({n: weights[n] for n in part}, os.path.join(directory, file_name))
        index = {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f)
    else:
        save_file(weights, os.path.join(directory, "model.safetensors"))
    write_tokenizer(directory)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1}, f)
    return weights


def read_hf(directory) -> dict:
    weights = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(directory, name)))
    return weights


def convert(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CONVERT, *map(str, argv)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)


def convert_ok(*argv) -> None:
    result = convert(*argv)
    assert result.returncode == 0, result.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# a plain-PyTorch Ouro forward (float64), from the published architecture
# --------------------------------------------------------------------------------------------
def _rms(x, weight, eps):
    return weight.double() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, theta):
    seq, dim = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    rotated = torch.cat([-x[..., dim // 2:], x[..., : dim // 2]], dim=-1)
    return x * emb.cos() + rotated * emb.sin()


def ouro_forward(w: dict, config: dict, tokens: torch.Tensor):
    """Per-step logits [T, b, s, V] and exit-gate logits [T, b, s]."""
    w = {k: v.double() for k, v in w.items()}
    b, s = tokens.shape
    heads, kv_heads, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    causal = torch.full((s, s), float("-inf"), dtype=torch.float64).triu(1)
    lm_head = w["model.embed_tokens.weight"] if config["tie_word_embeddings"] else w["lm_head.weight"]
    h = w["model.embed_tokens.weight"][tokens]
    logits, gates = [], []
    for _ in range(config["total_ut_steps"]):
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = _rms(h, w[p + "input_layernorm.weight"], eps)
            q = (x @ w[p + "self_attn.q_proj.weight"].T).view(b, s, heads, hd).transpose(1, 2)
            k = (x @ w[p + "self_attn.k_proj.weight"].T).view(b, s, kv_heads, hd).transpose(1, 2)
            v = (x @ w[p + "self_attn.v_proj.weight"].T).view(b, s, kv_heads, hd).transpose(1, 2)
            q, k = _rope(q, theta), _rope(k, theta)
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
            att = torch.softmax(q @ k.transpose(2, 3) * hd ** -0.5 + causal, dim=-1) @ v
            att = att.transpose(1, 2).reshape(b, s, heads * hd) @ w[p + "self_attn.o_proj.weight"].T
            h = h + _rms(att, w[p + "input_layernorm_2.weight"], eps)
            x = _rms(h, w[p + "post_attention_layernorm.weight"], eps)
            mlp = (torch.nn.functional.silu(x @ w[p + "mlp.gate_proj.weight"].T)
                   * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
            h = h + _rms(mlp, w[p + "post_attention_layernorm_2.weight"], eps)
        h = _rms(h, w["model.norm.weight"], eps)
        logits.append(h @ lm_head.T)
        gates.append((h @ w["model.early_exit_gate.weight"].T + w["model.early_exit_gate.bias"]).squeeze(-1))
    return torch.stack(logits), torch.stack(gates)


def our_forward(ckpt_dir: str, tokens: torch.Tensor):
    """Our model, built from the converted checkpoint's saved arguments and loaded with
    load_checkpoint as --load does; per-step logits (unpadded) and gate logits."""
    from megatron_looprpt import parallel
    from megatron_looprpt.models.looped_gpt import HeadRequest
    from megatron_looprpt.training import checkpointing
    from megatron_looprpt.training.loop import model_config
    from megatron_looprpt.models.builder import build_model

    args = Namespace(**checkpointing.read_checkpoint_args(ckpt_dir))
    args.transformer_impl = "local"  # derived at run time (validate_args); this test runs on CPU
    parallel.initialize(1, 1, seed=5)
    cfg = model_config(args, args.vocab_size)
    assert cfg.padded_vocab_size == args.padded_vocab_size
    pm = build_model(cfg, seed=5, wrap_ddp=False)
    loaded = checkpointing.load_checkpoint(ckpt_dir, pm, None, None)
    assert loaded.iteration == 0 and not loaded.rng_loaded
    model = pm.model.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        out = model(tokens, positions, None, head=HeadRequest(label_logprobs=False, logits=True))
    logits = torch.stack([step.logits for step in out.steps])
    padding = logits[..., VOCAB:]
    gates = torch.stack([step.gate_logits.reshape(tokens.shape) for step in out.steps])
    return logits[..., :VOCAB], padding, gates


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("loop_steps", [1, 4])
def test_converted_model_matches_a_plain_pytorch_ouro_forward(tmp_path, single_process_parallel, tied, loop_steps):
    from megatron_looprpt.conversion.convert import ConvertOptions, convert as run_convert

    hf_dir, ckpt = tmp_path / "hf", tmp_path / "mcore"
    weights = write_hf(hf_dir, tied=tied, loop_steps=loop_steps)
    run_convert(ConvertOptions("hf", "mcore", str(hf_dir), str(ckpt)))
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_gates = ouro_forward(weights, ouro_config(tied, loop_steps), tokens)
    logits, padding, gates = our_forward(str(ckpt), tokens)
    assert logits.shape == ref_logits.shape and logits.dtype == torch.float32
    assert ref_logits.abs().max() > 1.0
    assert (logits.double() - ref_logits).abs().max() < 1e-5
    assert (gates.double() - ref_gates).abs().max() < 1e-5
    assert torch.all(padding == 0)  # Megatron's padding rows are zero


def test_round_trip_through_tp2_pp2_is_bit_identical(tmp_path):
    src, ckpt, back = tmp_path / "hf", tmp_path / "mcore", tmp_path / "hf_back"
    weights = write_hf(src, sharded=True)
    (src / "modeling_ouro.py").write_text("# stands in for Ouro's remote code, carried as an asset\n")
    convert_ok("--source-format", "hf", "--target-format", "mcore", "--load-dir", src, "--save-dir", ckpt,
               "--target-tensor-parallel-size", 2, "--target-pipeline-model-parallel-size", 2)
    # the converted checkpoint: TP=2 pads the vocabulary to a multiple of 128 x 2
    from megatron_looprpt.training.checkpointing import read_checkpoint_args

    saved = read_checkpoint_args(str(ckpt))
    assert (saved["padded_vocab_size"], saved["vocab_size"]) == (256, VOCAB)
    assert saved["tensor_model_parallel_size"] == 2 and saved["pipeline_model_parallel_size"] == 2
    assert saved["tokenizer_type"] == "HuggingFaceTokenizer"
    assert os.path.isfile(saved["tokenizer_model"])

    convert_ok("--source-format", "mcore", "--target-format", "hf", "--load-dir", ckpt, "--save-dir", back,
               "--max-shard-size", "20KB")
    files = sorted(os.listdir(back))
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 2
    for asset in ("tokenizer.json", "generation_config.json", "modeling_ouro.py"):
        assert (back / asset).read_bytes() == (src / asset).read_bytes()
    restored = read_hf(back)
    assert restored.keys() == weights.keys()
    for name, tensor in weights.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights)


def test_dtype_and_resharding_between_megatron_checkpoints(tmp_path):
    src = tmp_path / "hf"
    weights = write_hf(src, tied=True)
    convert_ok("--source-format", "hf", "--target-format", "mcore", "--load-dir", src,
               "--save-dir", tmp_path / "tp2", "--target-tensor-parallel-size", 2, "--dtype", "bf16",
               "--make-vocab-size-divisible-by", 8)
    convert_ok("--source-format", "mcore", "--target-format", "mcore", "--load-dir", tmp_path / "tp2",
               "--save-dir", tmp_path / "tp1")
    from megatron_looprpt.training.checkpointing import read_checkpoint_args

    source, resharded = (read_checkpoint_args(str(tmp_path / d)) for d in ("tp2", "tp1"))
    # the padding rule is the source run's (8 x TP: 112 rows at TP=2, 104 at TP=1); the rest of
    # its arguments (tokenizer, sequence length, the Hugging Face config) carry over
    assert source["padded_vocab_size"] == 112
    assert (resharded["padded_vocab_size"], resharded["tensor_model_parallel_size"], resharded["bf16"]) == (104, 1, True)
    for name in ("make_vocab_size_divisible_by", "tokenizer_type", "seq_length", "hf_config", "rotary_base"):
        assert resharded[name] == source[name], name
    assert resharded["tokenizer_model"] == str(tmp_path / "tp1" / "hf_assets" / "tokenizer.json")
    convert_ok("--source-format", "mcore", "--target-format", "hf", "--load-dir", tmp_path / "tp1",
               "--save-dir", tmp_path / "back", "--dtype", "fp32")
    restored = read_hf(tmp_path / "back")
    assert "lm_head.weight" not in restored
    for name, tensor in weights.items():
        assert torch.equal(restored[name], tensor.to(torch.bfloat16).float()), name
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "float32"


@pytest.mark.parametrize("case, argv, message", [
    ("llama", ["--target-format", "mcore"], "unknown architecture"),
    ("missing_shard", ["--target-format", "mcore"], "names shards that are missing: model-00002-of-00002"),
    ("ok", ["--target-format", "mcore", "--target-tensor-parallel-size", "3"],
     "--target-tensor-parallel-size 3: num_attention_heads 4 does not split into 3 parts"),
    ("ok", ["--target-format", "mcore", "--target-pipeline-model-parallel-size", "3"],
     "--target-pipeline-model-parallel-size 3: 2 layers do not split into 3 stages"),
    ("bad_shape", ["--target-format", "mcore"], "tensor model.layers.1.mlp.up_proj.weight has shape [40, 32]"),
    ("ok", ["--target-format", "hf", "--target-tensor-parallel-size", "2"],
     "apply to --target-format mcore only"),
    ("ok", ["--target-format", "gguf"], "--target-format 'gguf': choose one of hf, mcore"),
    ("no_weight_map", ["--target-format", "mcore"], "has no weight_map (tensor name -> shard file)"),
    ("corrupt", ["--target-format", "mcore"], "model.safetensors is not a readable safetensors file"),
])
def test_refusals_are_one_line_errors_before_any_work(tmp_path, case, argv, message):
    src = tmp_path / "hf"
    write_hf(src, sharded=case in ("missing_shard", "no_weight_map"))
    if case == "llama":
        config = json.loads((src / "config.json").read_text())
        config.update(model_type="llama", architectures=["LlamaForCausalLM"])
        (src / "config.json").write_text(json.dumps(config))
    elif case == "missing_shard":
        os.remove(src / "model-00002-of-00002.safetensors")
    elif case == "no_weight_map":
        (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    elif case == "corrupt":
        (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    elif case == "bad_shape":
        weights = load_file(src / "model.safetensors")
        weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(40, 32)
        save_file(weights, src / "model.safetensors")
    result = convert("--source-format", "hf", "--load-dir", src, "--save-dir", tmp_path / "out", *argv)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert.py: error:") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


# settings that add weights per loop step, and settings that make the loop compute another function
@pytest.mark.parametrize("flag, message", [
    ("--exit-gate-init uniform", "with --exit-gate-init uniform, whose per-step exit-gate biases Ouro's format cannot hold"),
    ("--loop-step-embedding", "with --loop-step-embedding, whose per-step input embeddings Ouro's format cannot hold"),
    ("--loop-input-injection", "with --loop-input-injection, which re-reads the token embedding at every loop step; "
                               "Ouro's architecture does not"),
    ("--loop-carry residual", "with --loop-carry residual, which carries the un-normalised state between loop steps; "
                              "Ouro's architecture does not"),
])
def test_a_checkpoint_ouro_cannot_run_is_refused_on_export(tmp_path, flag, message):
    assert message in _refused_export_of_one_trained_with(tmp_path, flag)


def test_a_checkpoint_with_another_loop_reshards_and_keeps_it(tmp_path):
    # the refusal is Hugging Face's: megatron -> megatron keeps the loop setting it was trained with
    trained = _trained_with(tmp_path, "--loop-input-injection")
    convert_ok("--source-format", "mcore", "--target-format", "mcore", "--load-dir", trained,
               "--save-dir", tmp_path / "tp2", "--target-tensor-parallel-size", 2)
    args = read_checkpoint_info(str(tmp_path / "tp2"))["args"]
    assert args["loop_input_injection"] is True and args["tensor_model_parallel_size"] == 2


def _trained_with(tmp_path, flag: str):
    """One training step with ``flag`` saved under tmp_path/mcore."""
    trained = subprocess.run(
        [sys.executable, os.path.join(ROOT, "pretrain_looprpt.py"), "--mock-data", "--tokenizer-type",
         "NullTokenizer", "--vocab-size", "128", "--num-layers", "1", "--hidden-size", "32",
         "--num-attention-heads", "2", "--ffn-hidden-size", "64", "--seq-length", "16", "--train-iters", "1",
         "--save", str(tmp_path / "mcore"), "--no-progress-bar", *flag.split()],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    return tmp_path / "mcore"


def _refused_export_of_one_trained_with(tmp_path, flag: str) -> str:
    """Train one step with ``flag``, ask for its Hugging Face export; the refusal's one line."""
    result = convert("--source-format", "mcore", "--target-format", "hf", "--load-dir", _trained_with(tmp_path, flag),
                     "--save-dir", tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert not (tmp_path / "out").exists()
    return lines[0]


def test_megatron_source_whose_vocabulary_exceeds_its_embedding_rows(tmp_path):
    write_hf(tmp_path / "hf")
    convert_ok("--source-format", "hf", "--target-format", "mcore", "--load-dir", tmp_path / "hf",
               "--save-dir", tmp_path / "mcore")
    result = convert("--source-format", "mcore", "--target-format", "hf", "--load-dir", tmp_path / "mcore",
                     "--save-dir", tmp_path / "out", "--vocab-size", "1000")
    assert result.returncode == 2
    assert "the vocabulary has 1000 entries but the checkpoint's embedding only 128 rows" in result.stderr
    # a save directory that already holds a checkpoint is never overwritten
    result = convert("--source-format", "hf", "--target-format", "mcore", "--load-dir", tmp_path / "hf",
                     "--save-dir", tmp_path / "mcore")
    assert result.returncode == 2 and "already holds a checkpoint" in result.stderr


@pytest.mark.slow
def test_pretraining_continues_from_a_converted_checkpoint_and_exports_back(tmp_path):
    """HF -> mcore (TP=2, PP=2); pretrain_looprpt.py --load trains on from it under TP=2 x PP=2
    (and refuses, in one line, a layout that pads the vocabulary otherwise); the result exports
    back to HF; tools/evaluate.py reads both checkpoints."""
    src, ckpt, run_dir = tmp_path / "hf", tmp_path / "mcore", tmp_path / "run"
    original = write_hf(src, loop_steps=2)
    convert_ok("--source-format", "hf", "--target-format", "mcore", "--load-dir", src, "--save-dir", ckpt,
               "--target-tensor-parallel-size", 2, "--target-pipeline-model-parallel-size", 2)
    g = torch.Generator().manual_seed(0)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for _ in range(200):
            ids = torch.randint(0, len(WORDS), (int(torch.randint(20, 60, (1,), generator=g)),), generator=g)
            f.write(json.dumps({"text": " ".join(WORDS[i] for i in ids)}) + "\n")
    tokenizer = ckpt / "hf_assets" / "tokenizer.json"  # carried over from the HF directory
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input",
                    tmp_path / "docs.jsonl", "--output-prefix", tmp_path / "docs", "--tokenizer-type",
                    "HuggingFaceTokenizer", "--tokenizer-model", tokenizer, "--append-eod", "--workers", "1"],
                   check=True, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True)
    # the model shape is given by flags, as for any --load; the vocabulary (100, the config's)
    # is adopted from the checkpoint
    argv = ["--num-layers", 2, "--hidden-size", 32, "--num-attention-heads", 4, "--num-query-groups", 2,
            "--ffn-hidden-size", 48, "--max-position-embeddings", 128, "--seq-length", 32, "--loop-steps", 2,
            "--untie-embeddings-and-output-weights", "--data-path", tmp_path / "docs_text_document",
            "--split", "90,10,0", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
            "--load", ckpt, "--save", run_dir, "--micro-batch-size", 2, "--global-batch-size", 4,
            "--lr", 1e-3, "--train-iters", 2, "--log-interval", 1, "--no-progress-bar",
            "--log-json", tmp_path / "log.jsonl"]

    refused = run("pretrain_looprpt.py", 1, argv, timeout=300)
    assert refused.returncode != 0
    assert "padded vocabulary 128 (from the tokenizer or --vocab-size) but the checkpoint has 256" in refused.stderr
    # what the weights were trained to expect is part of the shape: Ouro's RoPE base, its epsilon
    assert "--rotary-base 10000 but the checkpoint has 1000000.0" in refused.stderr
    assert "--norm-epsilon 1e-06 but the checkpoint has 1e-05" in refused.stderr
    argv += ["--rotary-base", 1000000, "--norm-epsilon", 1e-5]

    result = run("pretrain_looprpt.py", 4, [*argv, "--tensor-model-parallel-size", 2,
                                            "--pipeline-model-parallel-size", 2], timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(tmp_path / "log.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["iteration"] for r in records] == [1, 2]
    assert all(0 < r["lm_loss"] < 20 for r in records)

    export = tmp_path / "export"
    convert_ok("--source-format", "mcore", "--target-format", "hf", "--load-dir", run_dir, "--save-dir", export)
    trained = read_hf(export)
    assert trained.keys() == original.keys()
    changed = [name for name in original if not torch.equal(trained[name], original[name])]
    assert "model.layers.0.mlp.down_proj.weight" in changed and "model.early_exit_gate.bias" in changed
    assert (export / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    # every config.json field survives training (the run's --exit-threshold 0.9 is not Ouro's
    # inference default, which stays the source's)
    assert json.loads((export / "config.json").read_text()) == json.loads((src / "config.json").read_text())

    for load_dir, iteration in ((ckpt, 0), (run_dir, 2)):
        out = tmp_path / f"eval_{iteration}"
        result = run("tools/evaluate.py", 2, ["--load", load_dir, "--tensor-model-parallel-size", 2,
                                              "--data-path", tmp_path / "docs_text_document",
                                              "--split", "90,10,0", "--micro-batch-size", 2,
                                              "--global-batch-size", 4, "--eval-iters", 1,
                                              "--output-dir", out], timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        (model,) = json.loads((out / "evaluation.json").read_text())["models"]
        assert model["iteration"] == iteration
        assert [s["step"] for s in model["per_step"]] == [1, 2]
        assert all(0 < s["nll"] < 20 for s in model["per_step"])


def test_a_failed_hugging_face_write_leaves_nothing_behind(tmp_path):
    from megatron_looprpt.conversion.architecture import ConversionError
    from megatron_looprpt.conversion.hf_format import HFLoader, save_hf

    write_hf(tmp_path / "hf")
    source = HFLoader(str(tmp_path / "hf"))
    fetched = []

    def failing_get(name):
        fetched.append(name)
        if len(fetched) == 3:
            raise ConversionError(f"tensor {name} is unreadable")
        return source.get(name)

    with pytest.raises(ConversionError, match="unreadable"):
        save_hf(source.arch, failing_get, torch.float32, str(tmp_path / "out"), 1 << 30)
    assert sorted(os.listdir(tmp_path)) == ["hf"]      # neither out nor out.tmp-PID


def test_an_export_writes_its_dtype_under_every_key_the_source_config_uses():
    """transformers 4.56 reads "dtype" before "torch_dtype": a bf16 export of a source whose
    config has both must not keep the source's float32 under one of them."""
    from megatron_looprpt.conversion.architecture import OuroArchitecture

    both = {**ouro_config(tied=False, loop_steps=4), "dtype": "float32"}
    config = OuroArchitecture.from_hf_config(both, "config.json").to_hf_config("bfloat16")
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    # a source with only torch_dtype gets no second key; one with only dtype is read by it
    assert "dtype" not in OuroArchitecture.from_hf_config(ouro_config(False, 4), "c").to_hf_config("bfloat16")
    newer = {k: v for k, v in both.items() if k != "torch_dtype"}
    newer["dtype"] = "bfloat16"
    assert OuroArchitecture.from_hf_config(newer, "config.json").torch_dtype == "bfloat16"
