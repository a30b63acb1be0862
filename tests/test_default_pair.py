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
    state = model.state_dict()
    assert set(reader.names()) <= set(state) and len(reader.names()) > 100  # every stored tensor, compared below
    for name in reader.names():
        assert torch.equal(state[name].float().view(torch.int32), reader.get(name).view(torch.int32)), name
    reference = AutoModelForCausalLM.from_pretrained(pair.finetuned).eval()
    tok = AutoTokenizer.from_pretrained(pair.finetuned)
    result = verify_equivalence(reference, model, tok, pair.eval_prompts, max_new_tokens=64, progress=False)
    assert result.num_prompts >= 32 and result.exact_match_rate == 1.0 and result.max_abs_logit_diff == 0.0
