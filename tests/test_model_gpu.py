"""bf16 on CUDA against HF transformers, for every backend (run on the GPU machine).

Truth is HF in fp32 on the same GPU. bf16 cannot match it exactly, so the tolerance is the ratio
rule (shared/STYLE.md): over all positions / steps, our bf16 logits may be at most 2x as far from the
fp32 truth as HF's own bf16 logits are (relative L2 error; a per-step max error is too heavy-tailed to
compare: on CPU, ours was the closer one in median yet 3.6x HF's worst single step). Greedy tokens are
compared teacher-forced along the fp32 greedy path: ours must equal the fp32 argmax except where
the token we chose is within HF-bf16's own error of the top logit (a tie at bf16 precision).
"""

from __future__ import annotations

import pytest
import torch

from decoding import loader
from hf_utils import decode_logits, prefill_logits, save_random_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPES = {  # variant -> config overrides: realistic head dims (64, 128) and the embedded model's shape
    "llama": dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=2, intermediate_size=1024),
    "llama3": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1, intermediate_size=512),
    "mistral": dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, intermediate_size=512),
    "qwen2": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512),
    "smollm2": dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                    num_hidden_layers=4, tie_word_embeddings=True, vocab_size=49152),
}
STEPS = 32


def _ratio_check(ours, hf_bf16, truth, what):
    rel_ours = ((ours.float() - truth).norm() / truth.norm()).item()
    rel_hf = ((hf_bf16.float() - truth).norm() / truth.norm()).item()
    assert rel_ours <= 2 * rel_hf, f"{what}: ours {rel_ours:.2e} vs HF bf16 {rel_hf:.2e} relative L2 from fp32"
    return rel_ours, rel_hf


@pytest.fixture(scope="module", params=list(SHAPES))
def checkpoint(request, tmp_path_factory):
    variant = request.param
    path = tmp_path_factory.mktemp(variant)
    base = "llama3" if variant == "smollm2" else variant
    hf = save_random_checkpoint(base, path, seed=3, max_position_embeddings=1024, **SHAPES[variant])
    return variant, path, hf.cuda()


@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_bf16_matches_hf(checkpoint, backend, monkeypatch):
    variant, path, hf = checkpoint
    monkeypatch.setenv("DECODING_BACKEND", backend)
    model, _ = loader.load(path, "cuda", torch.bfloat16)
    hf_bf16 = type(hf)(hf.config).to("cuda", torch.bfloat16).eval()
    hf_bf16.load_state_dict(hf.state_dict())
    prompt = [(13 * i + 5) % 250 for i in range(100)]
    seq = list(prompt)
    with torch.no_grad():
        truth_all = hf(torch.tensor([seq], device="cuda")).logits[0].float()
        base_all = hf_bf16(torch.tensor([seq], device="cuda")).logits[0]
    ours_all, cache, blocks = prefill_logits(model, seq, block_size=16)
    _ratio_check(ours_all, base_all, truth_all, f"{variant}/{backend} prefill")
    ours, rows = ours_all[-1], []
    mismatches = 0
    for step in range(STEPS):
        with torch.no_grad():
            truth = hf(torch.tensor([seq], device="cuda")).logits[0, -1].float()
            base = hf_bf16(torch.tensor([seq], device="cuda")).logits[0, -1].float()
        rows.append((ours.float(), base, truth))
        want, got = int(truth.argmax()), int(ours.argmax())
        if got != want:
            mismatches += 1
            tie = (base - truth).abs().max()
            assert truth[got] >= truth[want] - 2 * tie, f"{variant}/{backend} step {step}: not a bf16 tie"
        seq.append(want)
        ours = decode_logits(model, cache, blocks, want, len(seq) - 1)
    ours_steps, base_steps, truth_steps = (torch.stack(col) for col in zip(*rows))
    rel_ours, rel_hf = _ratio_check(ours_steps, base_steps, truth_steps, f"{variant}/{backend} decode")
    print(f"{variant}/{backend}: {STEPS - mismatches}/{STEPS} teacher-forced greedy tokens equal to fp32 HF; "
          f"decode logits rel. L2 error ours {rel_ours:.2e}, HF bf16 {rel_hf:.2e}")
