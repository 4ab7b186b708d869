#!/usr/bin/env python3
"""Writes tests/fixtures/gguf/<family>.gguf with llama.cpp's own converter (convert_hf_to_gguf.py)
from a tiny random model that transformers saved, with a tiny byte-level BPE tokenizer, plus
<family>.json: the logits transformers computes on a few ids and the ids its tokenizer gives a
sample text, so that tests/gguf_families.rs checks ranger-tune reads each file to the same
numbers. Not run in CI (its output is committed); rerun by hand after changing it:

    LLAMA_CPP=/path/to/llama.cpp python tools/make_gguf_fixtures.py tests/fixtures/gguf

LLAMA_CPP is a llama.cpp checkout (or the `vendor/llama.cpp` folder of the llama-cpp-python
sdist on PyPI: `pip download --no-deps --no-binary :all: llama-cpp-python`). Families: gpt2
(`GPT2LMHeadModel`: the converter transposes the Conv1D weights); phi4mini (`Phi3ForCausalLM`
with Phi-4-mini's byte-level BPE tokenizer, 3/4 of each head rotated, LongRoPE factors stored as
`rope_factors_long/short` tensors, tied embeddings). The tokenizer is unknown to the converter's
pre-tokenizer table, so its check is told "gpt-2" (plain byte-level splitting, which this
tokenizer uses). With SentencePiece tokenizers (an 800-piece BPE model with byte fallback, trained
here on the example data with the `sentencepiece` package): gemma3 (`Gemma3ForCausalLM`, 6
layers, the 5-sliding-1-global pattern and local base llama.cpp assumes; the converter stores the
norms as `1 + w`); gemma2 (4 layers, alternating, both soft-caps); phi3 (`Phi3ForCausalLM` with Phi-3-mini's SentencePiece tokenizer, LongRoPE,
a sliding window); llama (`LlamaForCausalLM` with a Llama-2-style SentencePiece tokenizer; the
converter permutes Q and K). Their `.json` also holds the ids sentencepiece itself and transformers' own
GGUF tokenizer give a few texts.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

TEXT = ("The lighthouse keeper of Glimmerholm counts the ships that pass in the night, "
        "and writes their names in a book of salt. ") * 20
SAMPLE = "The keeper writes the ships' names, 3 of them, in salt."
IDS = [[3, 7, 1, 12, 5, 9, 30, 2], [11, 4, 4, 8, 21, 0, 17, 6]]


def tokenizer(dir):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    from transformers import PreTrainedTokenizerFast
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(dir)
    cfg = json.load(open(os.path.join(dir, "tokenizer_config.json")))
    cfg["tokenizer_class"] = "GPT2Tokenizer"  # what Phi-4-mini's says; the converter reads it
    json.dump(cfg, open(os.path.join(dir, "tokenizer_config.json"), "w"))
    return fast, tok.get_vocab_size()


def gpt2(vocab):
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_ctx=64,
                                      bos_token_id=0, eos_token_id=0))


def phi4mini(vocab):
    from transformers import Phi3Config, Phi3ForCausalLM
    return Phi3ForCausalLM(Phi3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, original_max_position_embeddings=6,
        partial_rotary_factor=0.75, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 1.1, 1.3],
                      "long_factor": [2.0, 3.0, 4.0, 6.0, 2.5, 8.0]}))


def gemma3(vocab):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, rms_norm_eps=1e-6, max_position_embeddings=64,
        sliding_window=3, pad_token_id=0, eos_token_id=1, bos_token_id=2))


def llama(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=2, eos_token_id=1, pad_token_id=0))


def gemma2(vocab):
    from transformers import Gemma2Config, Gemma2ForCausalLM
    return Gemma2ForCausalLM(Gemma2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, rms_norm_eps=1e-6, max_position_embeddings=64,
        sliding_window=3, attn_logit_softcapping=2.0, final_logit_softcapping=3.0, pad_token_id=0, eos_token_id=1,
        bos_token_id=2))


def phi3(vocab):
    from transformers import Phi3Config, Phi3ForCausalLM
    return Phi3ForCausalLM(Phi3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=6, sliding_window=5,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 1.1, 1.3, 1.7, 1.05],
                      "long_factor": [2.0, 3.0, 4.0, 6.0, 2.5, 8.0, 5.0, 7.0]}))


FAMILIES = {"gpt2": gpt2, "phi4mini": phi4mini, "gemma3": gemma3, "gemma2": gemma2, "phi3": phi3, "llama": llama}
SENTENCEPIECE = {"gemma3", "gemma2", "phi3", "llama"}
TEXTS = ["The keeper writes 12 names, in salt.", "  two leading spaces and a tab\there", "Ünïcödé → 🦙 ok",
         "<start_of_turn>user\nhi<end_of_turn>"]


def sentencepiece_model(dir, dummy_prefix):
    """An 800-piece SentencePiece BPE model (byte fallback) trained on the example data; Gemma's
    adds no dummy prefix, Llama's and Phi-3's do."""
    import sentencepiece as spm
    here = os.path.dirname(os.path.abspath(__file__))
    lines = []
    for line in open(os.path.join(here, "..", "examples", "data", "glimmerholm.jsonl")):
        lines += [m["content"] for m in json.loads(line).get("messages", [])]
    corpus = os.path.join(dir, "corpus.txt")
    open(corpus, "w").write("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(dir, "tokenizer"), vocab_size=800, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], add_dummy_prefix=dummy_prefix, minloglevel=2)
    os.remove(corpus)
    os.remove(os.path.join(dir, "tokenizer.vocab"))
    return spm.SentencePieceProcessor(model_file=os.path.join(dir, "tokenizer.model"))

CONVERT = """
import sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {root!r} + "/gguf-py")
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", {src!r}, "--outfile", {out!r}, "--outtype", "f32"]
import runpy
runpy.run_path({root!r} + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def write(out, family, root):
    with tempfile.TemporaryDirectory() as src:
        if family in SENTENCEPIECE:
            sp = sentencepiece_model(src, dummy_prefix=not family.startswith("gemma"))
            vocab = sp.vocab_size()
            cls = "GemmaTokenizer" if family.startswith("gemma") else "LlamaTokenizer"
            json.dump({"tokenizer_class": cls, "add_bos_token": True}, open(os.path.join(src, "tokenizer_config.json"), "w"))
        else:
            fast, vocab = tokenizer(src)
        torch.manual_seed(0)
        model = FAMILIES[family](vocab)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
        model.eval()
        model.save_pretrained(src)
        gguf = os.path.join(out, f"{family}.gguf")
        subprocess.run([sys.executable, "-c", CONVERT.format(root=root, src=src, out=gguf)], check=True)
        with torch.no_grad():
            logits = model(torch.tensor(IDS)).logits
        ref = {"input_ids": IDS, "logits": logits.flatten().tolist(),
               "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}
        if family in SENTENCEPIECE:
            from transformers import AutoTokenizer
            gguf_tok = AutoTokenizer.from_pretrained(out, gguf_file=f"{family}.gguf")
            ref["texts"] = TEXTS
            ref["sentencepiece_ids"] = [sp.encode(t) for t in TEXTS]
            ref["transformers_gguf_ids"] = [gguf_tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
            ref["sample"], ref["sample_ids"] = TEXTS[0], ref["transformers_gguf_ids"][0]
        else:
            ref["sample"] = SAMPLE
            ref["sample_ids"] = fast(SAMPLE, add_special_tokens=False)["input_ids"]
        json.dump(ref, open(os.path.join(out, f"{family}.json"), "w"))
        print(f"wrote {gguf}")


def main():
    root = os.environ["LLAMA_CPP"]
    out = sys.argv[1]
    for family in sys.argv[2:] or FAMILIES:
        write(out, family, root)


if __name__ == "__main__":
    main()
