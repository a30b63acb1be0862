"""The model run one decoder layer at a time (`layerwise`) computes what the model in memory computes."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_decompose.checkpoints import CheckpointPair, CheckpointReader
from hf_decompose.equivalence import greedy_generate
from hf_decompose.layerwise import Layerwise
from hf_decompose.model import _plain_config
from hf_decompose.modules import DecomposedModule
from hf_decompose.parts import DensePart, TensorDelta


def _runner(pair) -> Layerwise:
    checkpoints = CheckpointPair(CheckpointReader(pair.base), CheckpointReader(pair.finetuned))
    ft = checkpoints.finetuned
    return Layerwise(_plain_config(pair.finetuned), checkpoints.dtype, checkpoints.names(), ft.get, ft.raw.get)


@pytest.mark.parametrize("tied", [True, False])
def test_layer_by_layer_logits_and_generations_are_the_models(tiny_pair, tiny_pair_untied, tied):
    pair = tiny_pair if tied else tiny_pair_untied
    lw, model = _runner(pair), AutoModelForCausalLM.from_pretrained(pair.finetuned).eval()
    tok = AutoTokenizer.from_pretrained(pair.finetuned)
    prompts = pair.calib_prompts[:12]
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = torch.cat([model(input_ids=enc["input_ids"][s : s + 8], attention_mask=enc["attention_mask"][s : s + 8]).logits for s in (0, 8)])
        hidden, calls = lw.capture(enc["input_ids"], enc["attention_mask"])
        for _, hidden in lw.run(hidden, calls, 0):
            pass
        got = torch.cat(list(lw.head(hidden, enc["input_ids"], enc["attention_mask"])))
    assert torch.equal(got, want)
    sequential = greedy_generate(model, tok, prompts, 8)
    jobs = [lambda b=prompts[s : s + 8]: greedy_generate(lw.model, tok, b, 8) for s in (0, 8)]
    in_step = [t for batch in lw.in_step(jobs) for t in batch]  # each layer read once per new token for both batches
    assert all(torch.equal(a, b) for a, b in zip(sequential, in_step, strict=True))


def test_jobs_in_lock_step_that_diverge_fail_instead_of_waiting_forever(tiny_pair):
    lw = _runner(tiny_pair)
    ids = torch.arange(1, 9)[None]
    with torch.no_grad(), pytest.raises(RuntimeError, match="lock step"):
        lw.in_step([lambda: lw.model(input_ids=ids), lambda: lw.model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)])


def test_the_head_gets_a_contiguous_input_where_the_model_slices_kept_positions(tiny_pair):
    """On the strided slice of kept positions a bfloat16 head's `F.linear` copies its weight once per prompt."""
    lw = _runner(tiny_pair)
    tok = AutoTokenizer.from_pretrained(tiny_pair.finetuned)
    enc = tok(tiny_pair.calib_prompts[:8], return_tensors="pt", padding=True)
    seen = []
    for resident in (False, True):
        if resident:  # the tied head wrapped as a decomposed module when the embedding's delta goes in
            name = "model.embed_tokens.weight"
            exact = CheckpointReader(tiny_pair.finetuned).get(name) - CheckpointReader(tiny_pair.base).get(name)
            lw.set_resident({name: TensorDelta(name, tuple(exact.shape), False, [DensePart(exact)])})
        head = lw.model.get_output_embeddings()
        assert isinstance(head, DecomposedModule) == resident
        hook = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
        with torch.no_grad():
            hidden, calls = lw.capture(enc["input_ids"], enc["attention_mask"])
            for _, hidden in lw.run(hidden, calls, 0):
                pass
            logits = next(lw.head(hidden, enc["input_ids"], enc["attention_mask"], logits_to_keep=3))
        hook.remove()
        assert logits.shape[1] == 3 < enc["input_ids"].shape[1]
    assert seen and all(seen)


def test_a_dropped_runner_is_freed_at_once_with_its_weights(tiny_pair):
    """Without a reference cycle through its layer proxies: annealing drops the fine-tune's runner after calibration
    and its resident weights (a vocabulary-sized embedding) must go then, not when the garbage collector runs."""
    import gc
    import weakref

    lw = _runner(tiny_pair)
    tok = AutoTokenizer.from_pretrained(tiny_pair.finetuned)
    prompts = tiny_pair.calib_prompts[:4]
    lw.in_step([lambda runner=lw: greedy_generate(runner.model, tok, prompts, 3)])
    gone, embedding = weakref.ref(lw), weakref.ref(lw.model.get_input_embeddings().weight)
    gc.disable()
    try:
        del lw
        assert gone() is None and embedding() is None
    finally:
        gc.enable()


def test_stored_deltas_read_back_by_name_each_with_its_own_parts_only(tmp_path):
    """A file of the store read back by name, whole or some: each delta gets its own parts (a name that begins another's,
    a bias beside its weight's low-rank and dense parts), read when asked for, equal to what was put."""
    from hf_decompose.layerwise import DeltaStore
    from hf_decompose.parts import LowRankPart

    gen = torch.Generator().manual_seed(0)
    put = {"m.proj": TensorDelta("m.proj", (6, 4), False, [DensePart(torch.randn(6, 4, generator=gen)),
                                                           LowRankPart(torch.randn(6, 2, generator=gen), torch.randn(2, 4, generator=gen))]),
           "m.proj.bias": TensorDelta("m.proj.bias", (6,), False, [DensePart(torch.randn(6, generator=gen))]),
           "m.proj_2": TensorDelta("m.proj_2", (3, 3), True, [DensePart(torch.randn(3, 3, generator=gen))])}
    store = DeltaStore(tmp_path)
    store.put("k", put)
    for names in (None, ["m.proj"], ["m.proj.bias", "m.proj_2"]):
        back = store.get("k", names)
        assert list(back) == (names or list(put))
        for n, d in back.items():
            assert [p.kind for p in d.parts] == [p.kind for p in put[n].parts] and d.transposed == put[n].transposed
            assert torch.equal(d.to_dense(), put[n].to_dense())
