"""Benchmark: the converter's peak memory against the model size.

For Ouro-shaped models of growing depth (the same width and vocabulary), a synthetic Hugging
Face checkpoint is written, then converted HF -> mcore (TP=2, PP=2) and mcore -> HF, each in a
fresh process that samples its private (anonymous) resident memory every few milliseconds.
Reported per conversion: peak memory above the process's baseline after imports, as a ratio to
the model's size and to the bound the converter promises (the largest layer chunk plus the
embedding and output layer). File pages mapped by safetensors and the page cache are not
counted: the kernel can drop them at will.

    python tools/bench_convert.py [--layers 4 8 16 --hidden-size 512 --vocab-size 32000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, {root!r})

def rss_anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0

from megatron_looprpt.conversion.convert import ConvertOptions, convert
import torch.distributed  # imported before the baseline is taken
baseline = rss_anon()
peak = [baseline]
done = threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.002)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
convert(ConvertOptions(**json.loads(sys.argv[1])))
done.set()
thread.join()
peak[0] = max(peak[0], rss_anon())
print(json.dumps({{"baseline": baseline, "peak_above_baseline": peak[0] - baseline}}))
"""


def write_synthetic_hf(directory: str, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int,
                       vocab: int) -> dict:
    """An untied Ouro checkpoint with random fp32 weights, one shard per layer (as published
    checkpoints are sharded); returns the byte counts the report needs."""
    import torch
    from safetensors.torch import save_file

    from megatron_looprpt.conversion.architecture import OuroArchitecture
    from megatron_looprpt.conversion.tensor_map import HF_LAYER_PREFIX, hf_shapes

    config = {"architectures": ["OuroForCausalLM"], "model_type": "ouro", "num_hidden_layers": layers,
              "hidden_size": hidden, "intermediate_size": ffn, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
              "total_ut_steps": 4, "tie_word_embeddings": False, "torch_dtype": "float32"}
    arch = OuroArchitecture.from_hf_config(config, directory)
    shapes = hf_shapes(arch)
    os.makedirs(directory, exist_ok=True)
    groups = {"global": [n for n in shapes if not n.startswith("model.layers.")]}
    for i in range(layers):
        groups[f"layer{i}"] = [n for n in shapes if n.startswith(HF_LAYER_PREFIX.format(i))]
    weight_map = {}
    for k, (group, names) in enumerate(groups.items()):
        file_name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: torch.randn(shapes[n]) for n in names}, os.path.join(directory, file_name))
        weight_map.update({n: file_name for n in names})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)

    def nbytes(names):
        total = 0
        for n in names:
            count = 1
            for s in shapes[n]:
                count *= s
            total += 4 * count
        return total

    layer = nbytes(groups["layer0"])
    vocab_tensors = nbytes(["model.embed_tokens.weight", "lm_head.weight"])
    largest_chunk = 4 * max(3 * ffn * hidden, (heads + 2 * kv_heads) * (hidden // heads) * hidden)
    return {"model_bytes": nbytes(list(shapes)), "layer_bytes": layer,
            "bound_bytes": largest_chunk + vocab_tensors}


def measure(options: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", _CHILD.format(root=ROOT), json.dumps(options)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--ffn-hidden-size", type=int, default=1536)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--num-query-groups", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp dir)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = p.parse_args()
    sys.path.insert(0, ROOT)
    warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core's notes on absent GPU extras

    rows = []
    with tempfile.TemporaryDirectory(dir=a.workdir) as work:
        for layers in a.layers:
            base = os.path.join(work, f"L{layers}")
            sizes = write_synthetic_hf(base + "_hf", layers, a.hidden_size, a.ffn_hidden_size,
                                       a.num_attention_heads, a.num_query_groups, a.vocab_size)
            steps = (("hf->mcore", dict(source_format="hf", target_format="mcore", load_dir=base + "_hf",
                                        save_dir=base + "_mcore", target_tensor_parallel_size=2,
                                        target_pipeline_model_parallel_size=2)),
                     ("mcore->hf", dict(source_format="mcore", target_format="hf", load_dir=base + "_mcore",
                                        save_dir=base + "_back", max_shard_size="200MB")))
            for direction, options in steps:
                peak = measure(options)["peak_above_baseline"]
                rows.append({"layers": layers, "direction": direction, **sizes, "peak_bytes": peak,
                             "peak_over_model": peak / sizes["model_bytes"],
                             "peak_over_bound": peak / sizes["bound_bytes"]})

    mb = 1 << 20
    print(f"{'layers':>6} {'direction':>10} {'model MB':>9} {'bound MB':>9} {'peak MB':>8} "
          f"{'peak/model':>10} {'peak/bound':>10}")
    for r in rows:
        print(f"{r['layers']:>6} {r['direction']:>10} {r['model_bytes'] / mb:>9.0f} {r['bound_bytes'] / mb:>9.0f} "
              f"{r['peak_bytes'] / mb:>8.0f} {r['peak_over_model']:>10.2f} {r['peak_over_bound']:>10.2f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
