"""The main job on the real SmolLM2 pair (slow: downloads, a fine-tune, minutes of CPU)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_decompose import DecomposedConfig, decompose, verify_equivalence
from hf_decompose.checkpoints import CheckpointReader
from hf_decompose.pair import prepare_default_pair

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair():
    return prepare_default_pair()


def test_lossless_rebuilds_smollm2_finetune_and_generates_identically(pair):
    model = decompose(pair.finetuned, pair.base, DecomposedConfig(mode="lossless"), progress=False)
    reader = CheckpointReader(pair.finetuned)
    checked = []
    for name, module in model.model.named_modules():
        if hasattr(module, "merged_module") and f"{name}.weight" in reader.names():
            expected = reader.get(f"{name}.weight")
            assert torch.equal(module.merged_module().weight.view(torch.int32), expected.view(torch.int32)), name
            checked.append(name)
    # every matrix moved: the embedding and 7 projections in each of the 30 layers (the head is tied to the embedding)
    assert len(checked) == 1 + 7 * 30, checked
    reference = AutoModelForCausalLM.from_pretrained(pair.finetuned).eval()
    tok = AutoTokenizer.from_pretrained(pair.finetuned)
    result = verify_equivalence(reference, model, tok, pair.eval_prompts, max_new_tokens=64, progress=False)
    assert result.num_prompts >= 32 and result.exact_match_rate == 1.0 and result.max_abs_logit_diff == 0.0
