"""Data layer: corpus, tokenizers, preprocessing, megatron datasets and the resumable sampler."""

import json
import os

import numpy
import pytest
import torch

from megatron_looprpt.data.corpus import generate_reasoning, harvest_stdlib_text, \
    write_default_corpus
from megatron_looprpt.data.datasets import build_data_iterator, build_datasets, \
    preprocess_jsonl, validate_data_prefixes
from megatron_looprpt.data.tokenizers import NullTokenizer, build_tokenizer, train_sentencepiece
from tests.scripts import load_script



def _load_tool(name):
    return load_script(os.path.join("tools", name + ".py"), name)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return write_default_corpus(str(out), max_text_bytes=300_000, num_reasoning=2000, seed=7)


@pytest.fixture(scope="module")
def sp_model(corpus, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tok") / "sp")
    return train_sentencepiece([corpus["text_path"], corpus["reasoning_path"]], prefix,
                               vocab_size=512)


@pytest.fixture(scope="module")
def prefixes(corpus, sp_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bin")
    text = preprocess_jsonl(corpus["text_path"], str(out / "text"), "SentencePieceTokenizer",
                            sp_model)["text"]
    reasoning = preprocess_jsonl(corpus["reasoning_path"], str(out / "reasoning"),
                                 "SentencePieceTokenizer", sp_model)["text"]
    return text, reasoning


def _texts(path):
    with open(path) as f:
        return [json.loads(line)["text"] for line in f]


# ---------------------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_nonempty(corpus, tmp_path):
    assert generate_reasoning(50, seed=3) == generate_reasoning(50, seed=3)
    assert generate_reasoning(50, seed=3) != generate_reasoning(50, seed=4)
    problems = generate_reasoning(200, seed=3)
    assert all(p.startswith("Question: ") and "\nStep 2: " in p and "\nAnswer: " in p
               for p in problems)
    for marker in ("Start with", "change", "km/h", "remainder", "taller", "seconds"):
        assert any(marker in p for p in problems), marker  # all templates are drawn

    docs = harvest_stdlib_text(100_000)
    assert docs and docs == harvest_stdlib_text(100_000)
    assert sum(len(d.encode()) for d in docs) <= 100_000

    again = write_default_corpus(str(tmp_path), max_text_bytes=300_000, num_reasoning=2000, seed=7)
    assert again["num_text_docs"] == corpus["num_text_docs"] > 0
    assert again["num_reasoning"] == len(_texts(again["reasoning_path"])) == 2000
    assert _texts(again["text_path"]) == _texts(corpus["text_path"])


def test_sentencepiece_round_trip(sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    assert tok.vocab_size == 512
    text = 'def f(x):\n    """Return x."""\n\n\treturn x * 12345  # ünïcode 日本\nAnswer: 42'
    ids = tok.tokenize(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.detokenize(ids) == text
    assert tok.eod not in ids and tok.pad >= 0 and tok.pad != tok.eod


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    def save(special_tokens, name):
        hf = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
        hf.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(special_tokens=special_tokens)
        hf.train_from_iterator(["the cat sat on the mat", "the dog ate the cat"], trainer)
        path = str(tmp_path / name)
        hf.save(path)
        return path, hf

    path, hf = save(["<unk>", "<pad>", "</s>"], "tokenizer.json")
    tok = build_tokenizer("HuggingFaceTokenizer", path)
    assert (tok.eod, tok.pad) == (hf.token_to_id("</s>"), hf.token_to_id("<pad>"))
    assert tok.vocab_size == hf.get_vocab_size()
    ids = tok.tokenize("the cat ate")
    assert ids == hf.encode("the cat ate").ids and tok.detokenize(ids) == "the cat ate"
    assert build_tokenizer("HuggingFaceTokenizer", str(tmp_path)).eod == tok.eod  # directory

    no_eod, _ = save(["<unk>"], "no_eod.json")
    with pytest.raises(ValueError, match="no_eod.json"):
        build_tokenizer("HuggingFaceTokenizer", no_eod)


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_matches_direct_tokenization(corpus, sp_model, tmp_path, workers):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    prefix = str(tmp_path / "reasoning")
    _load_tool("preprocess_data").main([
        "--input", corpus["reasoning_path"], "--output-prefix", prefix,
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
        "--append-eod", "--workers", str(workers), "--chunk-size", "16",
    ])
    dataset = IndexedDataset(prefix + "_text_document")
    texts = _texts(corpus["reasoning_path"])
    assert len(dataset) == len(texts)
    assert dataset[0].dtype == numpy.uint16
    for i in (0, 1, len(texts) // 2, len(texts) - 1):
        assert dataset[i].tolist() == tok.tokenize(texts[i]) + [tok.eod]


def test_preprocess_text_format_and_multiple_keys(sp_model, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    text_file = tmp_path / "docs.txt"
    text_file.write_text("first doc\nline two\n\n\nsecond doc\n")
    prefix = preprocess_jsonl(str(text_file), str(tmp_path / "plain"), "SentencePieceTokenizer",
                              sp_model, input_format="text", append_eod=False)["text"]
    # Items are views of the dataset's mmap, so the dataset must outlive them.
    plain = IndexedDataset(prefix)
    assert [plain[i].tolist() for i in range(len(plain))] == [
        tok.tokenize("first doc\nline two"), tok.tokenize("second doc")]

    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text(json.dumps({"q": "1 2", "a": "3"}) + "\n")
    out = preprocess_jsonl(str(jsonl), str(tmp_path / "qa"), "NullTokenizer", vocab_size=10,
                           json_keys=["q", "a"])
    assert out == {"q": str(tmp_path / "qa_q_document"), "a": str(tmp_path / "qa_a_document")}
    questions = IndexedDataset(out["q"])
    assert questions[0].tolist() == [1, 2, 9]


def test_build_datasets_blend(prefixes, sp_model, tmp_path):
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    blend = ["0.7", prefixes[0], "0.3", prefixes[1]]
    train, valid, test = build_datasets(blend, "80,15,5", 64, 1234, tok, (200, 40, 8),
                                        cache_dir=str(tmp_path / "cache"))
    # A weighted blend rounds each source's share up, so it may hold a few extra samples.
    assert len(train) >= 200 and len(valid) >= 40 and len(test) >= 8
    item = train[5]
    assert {"tokens", "labels", "loss_mask", "position_ids"} <= set(item)
    assert item["tokens"].shape == item["labels"].shape == (64,)
    assert torch.equal(item["tokens"][1:], item["labels"][:-1])
    again = build_datasets(blend, "80,15,5", 64, 1234, tok, (200, 40, 8))[0]
    assert torch.equal(again[5]["tokens"], item["tokens"])

    single = build_datasets(prefixes[1], "90,10,0", 32, 1, tok, (50, 5, 0))
    assert len(single[0]) >= 50 and single[2] is None


def test_build_datasets_caches_under_a_process_group(prefixes, sp_model, tmp_path):
    own_group = not torch.distributed.is_initialized()
    if own_group:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        tok = build_tokenizer("SentencePieceTokenizer", sp_model)
        blend = ["0.5", prefixes[0], "0.5", prefixes[1]]
        cache = tmp_path / "cache"
        first = build_datasets(blend, "90,10,0", 32, 5, tok, (30, 6, 0), cache_dir=str(cache))[0]
        cached = sorted(os.listdir(cache))
        assert any("BlendedDataset" in name for name in cached)
        assert any("GPTDataset" in name for name in cached)
        second = build_datasets(blend, "90,10,0", 32, 5, tok, (30, 6, 0), cache_dir=str(cache))[0]
        assert sorted(os.listdir(cache)) == cached
        assert torch.equal(first[7]["tokens"], second[7]["tokens"])
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def test_build_datasets_mock():
    tok = NullTokenizer(128)
    train, valid, test = build_datasets(None, "1,1,1", 16, 0, tok, (20, 4, 4), mock=True)
    assert min(len(train), len(valid), len(test)) >= 4  # mock splits are whole epochs
    assert train[0]["tokens"].shape == (16,)
    assert int(train[0]["tokens"].max()) < 128


def test_sampler_resume_and_data_parallel_slices(prefixes, sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    train = build_datasets(prefixes[1], "90,10,0", 32, 1, tok, (64, 8, 0))[0]

    full = list(build_data_iterator(train, 4, dp_rank=0, dp_size=1, consumed_samples=0))
    resumed = list(build_data_iterator(train, 4, dp_rank=0, dp_size=1, consumed_samples=8))
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)

    ranks = [next(build_data_iterator(train, 2, dp_rank=r, dp_size=2, consumed_samples=4))
             for r in range(2)]
    for key in full[1]:
        assert torch.equal(torch.cat([ranks[0][key], ranks[1][key]]), full[1][key])
    assert full[0]["loss_mask"].dtype == torch.float32 and full[0]["tokens"].dtype == torch.long


def test_clear_errors(tmp_path, sp_model, prefixes, capsys):
    with pytest.raises(FileNotFoundError, match=r"--data-path: .*missing\.bin"):
        validate_data_prefixes(["0.5", prefixes[0], "0.5", str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError, match="--tokenizer-model .*nope.model"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "nope.model"))
    with pytest.raises(ValueError, match="--tokenizer-type"):
        build_tokenizer("GPT2BPETokenizer", sp_model)
    with pytest.raises(FileNotFoundError, match="--input"):
        preprocess_jsonl(str(tmp_path / "none.jsonl"), str(tmp_path / "x"), "NullTokenizer",
                         vocab_size=8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "1"}) + "\n")
    with pytest.raises(ValueError, match="--json-keys"):
        preprocess_jsonl(str(bad), str(tmp_path / "bad"), "NullTokenizer", vocab_size=8)
    assert not os.path.exists(tmp_path / "bad_text_document.bin")

    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    with pytest.raises(ValueError, match="--split"):  # megatron would loop forever here
        build_datasets(prefixes[0], "969,30,1", 32, 1, tok, (10, 2, 1))

    with pytest.raises(SystemExit):
        _load_tool("train_tokenizer").main(
            ["--input", str(tmp_path / "absent.txt"), "--output-prefix", str(tmp_path / "t")])
    assert "--input" in capsys.readouterr().err


def test_documents_of_segments_train_on_their_trained_segments_only(tmp_path):
    """A loss mask written beside the tokens (preprocess --segments) reaches each sample's
    loss_mask through megatron's own sample mapping: 1 exactly where the label is a token of a
    trained segment (or the eod after the document), whatever document boundaries a sample
    crosses."""
    rng = numpy.random.default_rng(0)
    with open(tmp_path / "pc.jsonl", "w") as f:
        for _ in range(300):
            # context ids 1-5, trained ids 6-14: the label alone tells which part it is
            segments = []
            for _ in range(rng.integers(1, 4)):
                segments.append(" ".join(map(str, rng.integers(1, 6, rng.integers(1, 6)))) + " ")
                segments.append(" ".join(map(str, rng.integers(6, 15, rng.integers(1, 4)))) + " ")
            f.write(json.dumps({"segments": segments}) + "\n")
    tool = _load_tool("preprocess_data")
    tool.main(["--input", str(tmp_path / "pc.jsonl"), "--output-prefix", str(tmp_path / "pc"),
               "--json-keys", "segments", "--segments", "--tokenizer-type", "NullTokenizer",
               "--vocab-size", "16", "--append-eod"])
    prefix = str(tmp_path / "pc_segments_document")
    assert os.path.exists(str(tmp_path / "pc_segments_loss_mask.idx"))
    tok = NullTokenizer(16)
    train, _, _ = build_datasets(prefix, "1,0,0", 16, 3, tok, (200, 0, 0))
    counted = 0
    for i in range(len(train)):
        item = train[i]
        expected = (item["labels"] >= 6).float()
        assert torch.equal(item["loss_mask"], expected), i
        counted += int(expected.sum())
    assert 0 < counted < 200 * 16

    # Documents without a mask count every token.
    with open(tmp_path / "plain.jsonl", "w") as f:
        f.write(json.dumps({"text": " ".join(map(str, rng.integers(1, 15, 400)))}) + "\n")
    plain = preprocess_jsonl(str(tmp_path / "plain.jsonl"), str(tmp_path / "plain"), "NullTokenizer",
                             vocab_size=16)["text"]
    item = build_datasets(plain, "1,0,0", 16, 3, tok, (20, 0, 0))[0][0]
    assert item["loss_mask"].sum() == 16


def test_a_loss_mask_of_other_documents_is_refused(tmp_path):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    prefix = str(tmp_path / "x_text_document")
    for path, docs in ((prefix, [[1, 2, 3], [4, 5]]), (str(tmp_path / "x_text_loss_mask"), [[0, 1], [1, 1, 1]])):
        builder = IndexedDatasetBuilder(path + ".bin", dtype=DType.optimal_dtype(16))
        for doc in docs:
            builder.add_document(doc, [len(doc)])
        builder.finalize(path + ".idx")
    with pytest.raises(ValueError, match="loss mask .* other document lengths"):
        build_datasets(prefix, "1,0,0", 4, 3, NullTokenizer(16), (2, 0, 0))


def test_segment_ids_are_the_joint_text(sp_model):
    from megatron_looprpt.data.datasets import segment_ids

    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    segments = ["Question: what is 3 + 4? Answer:", " 7 apples", ". And 2 + 2?", " 4"]
    ids, mask = segment_ids(tok, segments)
    assert ids == tok.tokenize("".join(segments))
    assert [i for i, m in zip(ids, mask) if m] == ids[len(tok.tokenize(segments[0])):len(tok.tokenize("".join(segments[:2])))] \
        + ids[len(tok.tokenize("".join(segments[:3]))):]
    # tokenized alone, SentencePiece would start a segment with an extra word boundary
    assert tok.tokenize(" 7 apples") != ids[len(tok.tokenize(segments[0])):len(tok.tokenize("".join(segments[:2])))]
