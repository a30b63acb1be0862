"""Every supported architecture, as checkpoints ship: tiny random configs, sharded bfloat16 pairs (the
fine-tune is the base plus a structured change). Lossless rebuilds the fine-tune bit for bit (parameters,
buffers, generations), criterion and anneal run, and the artifact reloads through plain
`AutoModelForCausalLM` (after ``import hf_decompose``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_decompose  # noqa: F401  (registers the from_pretrained hook)
from hf_decompose import CheckpointError, ConfigError, DecomposedConfig, DecomposedModel, decompose, decompose_to_disk
from hf_decompose.experts import TenantExperts
from hf_decompose.multi import TenantParameters

from .conftest import _tiny_tokenizer
from .test_dtypes import assert_same_model, effective_state

CALIBRATION = ["to be or not", "that is the question", "whether tis nobler", "in the mind to suffer"]
TOKENIZER = _tiny_tokenizer(CALIBRATION * 4, 300, 64)  # byte-level BPE: every model type's tokenizer class reads it
COMMON = dict(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=0, bos_token_id=0)  # fmt: skip
MOE = dict(moe_intermediate_size=32, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
ARCHITECTURES = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "mistral": {"tie_word_embeddings": False},
    "gemma2": {"head_dim": 8},
    "gemma3_text": {"head_dim": 8},
    "phi3": {},
    "olmo2": {},
    "gpt2": {"n_positions": 64},
    "gpt_neox": {},
    "opt": {"ffn_dim": 64, "word_embed_proj_dim": 32},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2, "ffn_hidden_size": 64},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "shared_expert_intermediate_size": 32, **MOE},
    "qwen3_moe": {"num_experts": 4, "head_dim": 8, **MOE},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8, "layer_types": ["sliding_attention", "full_attention"],
                "sliding_window": 16},
    "glm4_moe": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1, "first_k_dense_replace": 1,
                 "head_dim": 8, "n_group": 1, "topk_group": 1},
    # multi-head latent attention: low-rank q and kv projections, values narrower than queries and keys
    "deepseek_v3": {"num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
                    "v_head_dim": 8, "n_group": 1, "topk_group": 1},
    # linear attention (gated delta rule) beside full attention
    "qwen3_next": {"num_experts": 4, "head_dim": 8, "layer_types": ["linear_attention", "full_attention"], "linear_num_value_heads": 4,
                   "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8, **MOE},
    # a router with a module of its own inside (its score correction)
    "ernie4_5_moe": {"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32, "moe_layer_start_index": 0, "head_dim": 8},
    "phimoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "smollm3": {},
    "granite": {},
    "cohere2": {"head_dim": 8, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16},
    # short convolutions beside attention
    "lfm2": {"layer_types": ["conv", "full_attention"], "block_ff_dim": 64},
    # code that reads a linear layer's weight outside its forward: Llama 4's embedding's device, Jamba's dt_proj
    "llama4_text": {"num_local_experts": 4, "num_experts_per_tok": 1, "head_dim": 8, "intermediate_size_mlp": 64, "interleave_moe_layer_step": 1,
                    "attention_chunk_size": 16, "no_rope_layers": [1, 0]},
    # per-layer input embeddings (a second, narrow embedding table read by every layer), and its mixture of experts beside the MLP
    "gemma4_text": {"head_dim": 8, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16, "hidden_size_per_layer_input": 8,
                    "vocab_size_per_layer_input": COMMON["vocab_size"], "per_layer_config": {}},
    "gemma4_text:moe": {"head_dim": 8, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16, "hidden_size_per_layer_input": 8,
                        "vocab_size_per_layer_input": COMMON["vocab_size"], "per_layer_config": {}, "enable_moe_block": True, "num_experts": 4,
                        "top_k_experts": 2, "moe_intermediate_size": 32},
    # per-layer input embeddings, AltUp's streams (their coefficients' modules called by method, not forward), LAuReL, activation sparsity
    "gemma3n_text": {"head_dim": 8, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16, "hidden_size_per_layer_input": 8,
                     "vocab_size_per_layer_input": COMMON["vocab_size"], "intermediate_size": [64, 64], "activation_sparsity_pattern": [0.95, 0.0],
                     "num_kv_shared_layers": 0, "laurel_rank": 4, "altup_num_inputs": 2},
    # a saved buffer (the router's score correction) under another name in the checkpoint
    "minimax_m2": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8},
    # decoder layers named blocks (transformer.blocks.N), not layers or h
    "mpt": {},
    # a recurrent layer that keeps its state between calls on itself
    "recurrent_gemma": {"block_types": ["recurrent", "attention"], "lru_width": 32, "attention_window_size": 16},
    # a scaled word embedding whose scale is a float, not a buffer
    "xglm": {},
    # Mamba's mixer reads dt_proj.weight outside its forward, and computes around it where a config says quantized
    "falcon_mamba": {"state_size": 4, "expand": 2, "time_step_rank": 4},
    "jamba": {"num_experts": 4, "num_experts_per_tok": 2, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
              "expert_layer_offset": 1, "mamba_d_state": 4, "mamba_expand": 2, "use_mamba_kernels": False},
}


def _structured_change(model: torch.nn.Module, seed: int = 1) -> None:
    """A fine-tune's kind of change: a few rows of every matrix (every expert's), some whole vectors, and a
    small change of every entry (what annealing stores in few bits)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            rows = p[..., :3, :] if p.dim() >= 2 else p
            rows.add_((torch.randn(rows.shape, generator=gen) * 2e-2).to(p.dtype))
            p.add_((torch.randn(p.shape, generator=gen) * 2e-3).to(p.dtype))


def _pair(root: Path, arch: str, finetunes: dict[str, int] | None = None) -> tuple[Path, ...]:
    """The base and its fine-tunes (name: seed of the change; one, "ft", by default), sharded bfloat16 checkpoints."""
    config = AutoConfig.for_model(arch.split(":")[0], **COMMON | ARCHITECTURES[arch])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for name, seed in {"base": None, **(finetunes or {"ft": 1})}.items():
        model.load_state_dict(base)
        if seed is not None:
            _structured_change(model, seed)
        model.save_pretrained(root / name, max_shard_size="20KB")
        TOKENIZER.save_pretrained(root / name)
    return tuple(root / name for name in ("base", *(finetunes or {"ft": 1})))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_architecture(tmp_path, arch):
    base, ft = _pair(tmp_path, arch)
    assert len(list(ft.glob("*.safetensors"))) > 1, "the pair should be sharded"
    reference = AutoModelForCausalLM.from_pretrained(ft).eval()
    assert reference.dtype == torch.bfloat16

    out = decompose_to_disk(ft, base, DecomposedConfig(mode="lossless"), output_dir=tmp_path / "lossless", progress=False)
    assert_same_model(DecomposedModel.from_pretrained(out), reference)
    assert_same_model(decompose(ft, base, DecomposedConfig(mode="lossless"), progress=False), reference)

    plain = AutoModelForCausalLM.from_pretrained(out)  # the from_pretrained hook
    got, want = effective_state(plain), dict(reference.named_parameters())
    assert all(torch.equal(got[n], p) for n, p in want.items()), [n for n, p in want.items() if not torch.equal(got[n], p)][:3]
    with torch.no_grad():
        assert plain(input_ids=torch.arange(2, 10)[None]).logits.shape == (1, 8, reference.config.vocab_size)

    ids = torch.arange(2, 10)[None]
    criterion = decompose(ft, base, DecomposedConfig(mode="criterion"), progress=False)
    annealed = decompose(ft, base, DecomposedConfig(mode="anneal", annealing={"calibration_prompts": 4, "calibration_tokens": 4}),
                         calibration=CALIBRATION, progress=False)  # fmt: skip
    with torch.no_grad():
        for model in (criterion, annealed):
            assert torch.isfinite(model(input_ids=ids).logits).all()
    assert 0 < criterion.report["kept_fraction"] < 1
    assert annealed.report["annealing"]["trace"]
    for mode, model in (("criterion", criterion), ("anneal", annealed)):  # split (the base and each matrix's parts) gives merged's logits
        model.save_pretrained(tmp_path / mode)
        merged, split = (DecomposedModel.from_pretrained(tmp_path / mode, execution=e, dtype=torch.float32).eval() for e in ("merged", "split"))
        with torch.no_grad():
            torch.testing.assert_close(split(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-4)


# modules whose changed parameters run with the whole batch's state (attention sinks, a gated delta net's decay, a mamba
# mixer's cache, a recurrence's state kept on the module), are read by another module (a short convolution's weight) or
# run in a method their parent calls (Gemma 3n's AltUp predicts and corrects on inputs with its streams first): a batch
# mixing fine-tunes is refused there, one a batch runs
MIXED_REFUSED = {"gpt_oss": r"layers\.0\.self_attn \(GptOssAttention\)", "qwen3_next": r"layers\.0\.linear_attn \(Qwen3NextGatedDeltaNet\)",
                 "lfm2": r"layers\.0\.conv\.conv\.weight is read by another module",
                 "jamba": r"layers\.0\.mamba \(JambaMambaMixer\) is called with more than its rows",
                 "gemma3n_text": r"layers\.0\.altup\.predict\(\) is called outside its module's forward",
                 "falcon_mamba": r"layers\.0\.norm\.weight is read by another module",
                 "minimax_m2": r"layers\.0\.mlp\.gate \(MiniMaxM2TopKRouter\) is called with more than its rows",
                 "recurrent_gemma": r"layers\.0\.temporal_block\.rg_lru \(RecurrentGemmaRglru\) keeps state between calls"}


WEIGHT_READ = {"llama4_text", "jamba"}


def _fused_experts(module: torch.nn.Module) -> bool:
    return any(p.dim() == 3 for name, p in module.named_parameters(recurse=False) if name.endswith("_proj"))  # not a convolution's


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_many_finetunes_by_name(tmp_path, arch):
    """Two fine-tunes over one base, loaded by name: a batch of one fine-tune (by rows, by `set_active`, in `generate`)
    and a batch mixing both and the base give each row what its fine-tune alone gives. Fused experts run each
    fine-tune's parts on its tokens; renamed checkpoint tensors (GPT-NeoX's head) and OPT's learned positions (a module
    with a forward of its own) run per fine-tune, and so does a weight read outside its module's forward (Llama 4's
    embedding, Jamba's dt_proj); where a mixed batch cannot run row by row it is refused by name."""
    base, *finetunes = _pair(tmp_path, arch, {"a": 1, "b": 2})
    modes = ("lossless", "anneal") if arch in ("llama", "phi3", "mixtral", "deepseek_v3", "gpt_oss", "qwen3_next") else ("lossless",)
    for mode in modes:
        config = DecomposedConfig(mode=mode, annealing={"calibration_prompts": 4, "calibration_tokens": 4})
        artifacts = {ft.name: decompose_to_disk(ft, base, config, output_dir=tmp_path / mode / ft.name, calibration=CALIBRATION, progress=False)
                     for ft in finetunes}  # fmt: skip
        alone = {name: DecomposedModel.from_pretrained(path, dtype=torch.float32).eval() for name, path in artifacts.items()}
        alone[None] = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        multi = DecomposedModel.from_pretrained(artifacts, dtype=torch.float32).eval()
        experts = [m for m in multi.modules() if isinstance(m, (TenantExperts, TenantParameters)) and _fused_experts(m.base)]
        assert all(isinstance(m, TenantExperts) for m in experts)  # each fine-tune's parts beside the shared experts, not copies
        ids = torch.arange(2, 14)[None].repeat(4, 1)  # 12 tokens a row: a module given some rows' tokens must not take them for 4 rows
        with torch.no_grad():
            want = {name: model(input_ids=ids[:1]).logits[0] for name, model in alone.items()}
            rows = multi(input_ids=ids, decomposed_names=["a"] * 4).logits
            torch.testing.assert_close(rows, want["a"].expand_as(rows), rtol=0, atol=1e-5)
            multi.set_active("b")
            torch.testing.assert_close(multi(input_ids=ids).logits, want["b"].expand_as(rows), rtol=0, atol=1e-5)
            multi.set_active(None)
            generated = multi.generate(ids[:1], decomposed_names=["a"], max_new_tokens=5, do_sample=False)
            assert torch.equal(generated, alone["a"].generate(ids[:1], max_new_tokens=5, do_sample=False))
            if arch in MIXED_REFUSED:
                with pytest.raises(ConfigError, match=rf"{MIXED_REFUSED[arch]}.*cannot run it row by row"):
                    multi(input_ids=ids, decomposed_names=["a", "b", None, "a"])
                continue
            mixed = multi(input_ids=ids, decomposed_names=["a", "b", None, "a"]).logits
            for row, name in enumerate(["a", "b", None, "a"]):
                torch.testing.assert_close(mixed[row], want[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_many_finetunes_with_a_layer_on_disk(tmp_path, arch):
    """Two fine-tunes by name with the first decoder layer offloaded to disk by Accelerate give the logits they give in
    memory: every module that swaps a fine-tune's values in (norms, fused experts, LFM2's convolution, whose weight
    its parent reads) has them loaded where it runs. (The hooks once loaded the base's over them, silently.)"""
    base, *finetunes = _pair(tmp_path, arch, {"a": 1, "b": 2})
    artifacts = {ft.name: decompose_to_disk(ft, base, DecomposedConfig(mode="lossless"), output_dir=tmp_path / "artifacts" / ft.name,
                                           progress=False) for ft in finetunes}  # fmt: skip
    rows = ["a", "a", "a"] if arch in MIXED_REFUSED else ["a", "b", None]
    ids = torch.arange(2, 14)[None].repeat(3, 1)
    models = [DecomposedModel.from_pretrained(artifacts, dtype=torch.float32).eval() for _ in range(2)]
    layer = next(n for n, _ in models[1].named_modules() if n.endswith(("layers.0", "h.0", "blocks.0")))
    models[1].dispatch({"": "cpu", layer: "disk"}, offload_folder=tmp_path / "offload")
    with torch.no_grad():
        in_memory, offloaded = (m(input_ids=ids, decomposed_names=rows).logits for m in models)
    torch.testing.assert_close(offloaded, in_memory, rtol=0, atol=1e-5)


@pytest.mark.parametrize("execution", ["merged", "split"])
@pytest.mark.parametrize("arch", sorted(WEIGHT_READ))
def test_a_model_reading_weights_outside_forward_with_a_layer_on_disk(tmp_path, arch, execution):
    """A decomposed model with its first decoder layer offloaded to disk gives the logits it gives in memory where the
    architecture reads a module's weights outside that module's forward (Jamba's mixer multiplies by ``dt_proj.weight``:
    it was on the meta device, a crash)."""
    base, ft = _pair(tmp_path, arch)
    out = decompose_to_disk(ft, base, DecomposedConfig(mode="lossless"), output_dir=tmp_path / "lossless", progress=False)
    models = [DecomposedModel.from_pretrained(out, dtype=torch.float32, execution=execution).eval() for _ in range(2)]
    layer = next(n for n, _ in models[1].named_modules() if n.endswith("layers.0"))
    models[1].dispatch({"": "cpu", layer: "disk"}, offload_folder=tmp_path / "offload")
    ids = torch.arange(2, 14)[None]
    with torch.no_grad():
        in_memory, offloaded = (m(input_ids=ids).logits for m in models)
    torch.testing.assert_close(offloaded, in_memory, rtol=0, atol=1e-5)


def test_a_weight_read_outside_forward_is_built_only_where_an_operation_uses_it(tmp_path, monkeypatch):
    """Llama 4 reads ``embed_tokens.weight.device`` on every call. Served split, that read builds no merged copy of the
    embedding (it once built and held one); served by name, the weight an operation uses is the routed fine-tune's
    (the base's for the base alone; a linear layer's built from a few rows of the identity at a time), and a batch
    mixing fine-tunes is refused by the embedding's name."""
    import hf_decompose.multi

    base, a, b = _pair(tmp_path, "llama4_text", {"a": 1, "b": 2})
    artifacts = {ft.name: decompose_to_disk(ft, base, DecomposedConfig(mode="lossless"), output_dir=tmp_path / "out" / ft.name, progress=False)
                 for ft in (a, b)}  # fmt: skip
    ids = torch.arange(2, 14)[None]
    split, merged = (DecomposedModel.from_pretrained(artifacts["a"], dtype=torch.float32, execution=e).eval() for e in ("split", "merged"))
    with torch.no_grad():
        torch.testing.assert_close(split(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-5)
    embedding = split.get_input_embeddings()
    assert embedding.weight.device == torch.device("cpu") and embedding._merged is None  # read, never built
    want = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).get_input_embeddings().weight for name, path in
            (("a", a), ("b", b), (None, base))}  # fmt: skip
    torch.testing.assert_close(embedding.weight + 0, want["a"], rtol=0, atol=0)  # an operation builds the merged copy
    assert embedding._merged is not None

    multi = DecomposedModel.from_pretrained(artifacts, dtype=torch.float32).eval()
    shared = multi.get_input_embeddings()
    for name in ("a", "b", None):
        multi.set_active(name)
        torch.testing.assert_close(shared.weight * 1, want[name], rtol=0, atol=1e-6)
    multi.set_active(None)
    with multi._rows(["a", "b"]), pytest.raises(ConfigError, match=r"model\.embed_tokens\.weight is read by another module"):
        shared.weight.sum()
    with multi._rows(["b", "b"]):
        torch.testing.assert_close(shared.weight.sum(), want["b"].sum())
    monkeypatch.setattr(hf_decompose.multi, "IDENTITY_ROWS", 5)  # 32 inputs: six blocks of 5 and one of 2
    multi.set_active("a")
    query = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32).model.layers[1].self_attn.q_proj.weight
    torch.testing.assert_close(multi.model.layers[1].self_attn.q_proj.weight * 1, query, rtol=0, atol=1e-6)


def test_experts_of_an_unknown_layout_held_whole_refuse_a_mixed_batch(tmp_path, monkeypatch):
    """Experts outside transformers' experts interface that `experts.DENSE_EXPERTS` does not name are held whole per
    fine-tune. Their inputs are not the batch's rows in order (Llama 4's: every token once per expert), so a batch mixing
    fine-tunes is refused by name (Llama 4's once ran such a batch with the rows taken in the wrong order); one
    fine-tune a batch runs."""
    import hf_decompose.multi
    from hf_decompose.experts import runs_experts

    monkeypatch.setattr(hf_decompose.multi, "interface", lambda module: module if runs_experts(module) else None)
    base, *finetunes = _pair(tmp_path, "llama4_text", {"a": 1, "b": 2})
    artifacts = {ft.name: decompose_to_disk(ft, base, DecomposedConfig(mode="lossless"), output_dir=tmp_path / "out" / ft.name, progress=False)
                 for ft in finetunes}  # fmt: skip
    multi = DecomposedModel.from_pretrained(artifacts, dtype=torch.float32).eval()
    assert isinstance(multi.model.layers[0].feed_forward.experts, TenantParameters)
    ids = torch.arange(2, 14)[None].repeat(2, 1)
    with torch.no_grad():
        with pytest.raises(ConfigError, match=r"layers\.0\.feed_forward\.experts \(Llama4TextExperts\) runs experts outside"):
            multi(input_ids=ids, decomposed_names=["a", "b"])
        alone = DecomposedModel.from_pretrained(artifacts["b"], dtype=torch.float32).eval()(input_ids=ids[:1]).logits[0]
        torch.testing.assert_close(multi(input_ids=ids, decomposed_names=["b", "b"]).logits, alone.expand(2, -1, -1), rtol=0, atol=1e-5)


def test_a_saved_buffer_the_finetune_changed_is_refused_before_any_work(tmp_path):
    """MiniMax-M2 saves its routers' score correction (a buffer) under another name than the model's: a fine-tune that
    leaves it decomposes (`test_architecture`, where it was once refused as a tensor with no parameter), one that
    changed it is refused by name, nothing written (the decomposed model would run the base's)."""
    base, ft = _pair(tmp_path, "minimax_m2")
    model = AutoModelForCausalLM.from_pretrained(ft)
    model.model.layers[1].mlp.e_score_correction_bias += 1
    model.save_pretrained(tmp_path / "changed", max_shard_size="20KB")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.block_sparse_moe\.e_score_correction_bias' is a buffer of MiniMaxM2ForCausalLM the fine-tune changed"):
        decompose_to_disk(tmp_path / "changed", base, DecomposedConfig(mode="lossless"), output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_experts_fused_on_disk_are_tested_one_matrix_at_a_time(tmp_path):
    """Granite-MoE stores each layer's experts in one 3-D tensor: the criterion tests every expert's matrix on its own
    and finds the fine-tune's three changed rows in each, as a rank-3 part (the tensor was once one vector to the tests,
    kept whole)."""
    base, ft = _pair(tmp_path, "granitemoe")
    out = decompose_to_disk(ft, base, DecomposedConfig(mode="criterion"), output_dir=tmp_path / "criterion", progress=False)
    tensors = {n: t for layer in json.loads((out / "decomposition.json").read_text())["layers"] for n, t in layer["tensors"].items()}
    experts = {n: t for n, t in tensors.items() if ".input_linear.weight@" in n}
    assert len(experts) == 2 * 4  # two layers of four experts
    for name, stats in experts.items():
        assert stats["entries"] == 128 * 32 and stats["spectral_rank"] == 3 and stats["supported_entries"] <= 3 * 32, (name, stats)


def test_fused_parameters_map_to_strided_views_and_other_conversions_are_refused():
    from hf_decompose import CheckpointError
    from hf_decompose.names import _strided

    fused = torch.arange(4 * 6 * 5).reshape(4, 6, 5)  # 4 experts, [gate | up] rows fused
    up = fused[2, 3:, :]
    target = _strided("experts.gate_up_proj", up)
    assert torch.equal(target.view(fused), up)
    assert target.view(fused).untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()  # merged in place
    assert torch.equal(_strided("p", fused[1].t()).view(fused), fused[1].t())  # a transposed expert
    for computed in (up.flip(0), up.reshape(-1)[torch.randperm(up.numel(), generator=torch.Generator().manual_seed(0))].reshape(up.shape)):
        with pytest.raises(CheckpointError, match="by more than a strided view: this architecture is not supported"):
            _strided("experts.gate_up_proj", computed)


def _four_layers(arch: str) -> dict:
    """`arch`'s test config with four decoder layers (per-layer lists repeated)."""
    config = COMMON | ARCHITECTURES[arch] | {"num_hidden_layers": 4}
    return config | {k: v * 2 for k, v in config.items() if isinstance(v, list) and len(v) == 2}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_fused_parameters_of_like_layers_take_one_probe_and_the_same_views(arch, monkeypatch):
    """A converted parameter like one probed in another layer takes its views under its own layer's name: the very targets
    each parameter's own probe gives, from one probe per kind of parameter."""
    from accelerate import init_empty_weights

    import hf_decompose.names as names

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.split(":")[0], **_four_layers(arch)))
    targets = names.TensorTargets(model)
    converted = list(targets._converted)
    probes = []
    revert = names._revert
    monkeypatch.setattr(names, "_revert", lambda m, state: probes.extend(t for t in state.values() if t.device.type != "meta") or revert(m, state))
    found = {name: targets.get(name) for pname in converted for name in targets._shapes[pname]}
    own = {}
    for pname in converted:
        param = targets.params[pname]
        own |= {n: names._strided(pname, p) for n, p in revert(model, {pname: torch.arange(param.numel()).view(param.shape)}).items()}
    assert found == own
    kinds = {(names._layer_split(p)[1], tuple(targets.params[p].shape)) for p in converted}
    assert len(probes) == len(kinds) and (len(kinds) < len(converted) or not converted)


def test_a_fused_parameter_unlike_the_one_probed_is_probed_itself():
    """Another layer's parameter of one kind whose checkpoint tensors are not the probed one's under its layer's prefix
    (other names or shapes) takes no views from it."""
    from hf_decompose.names import Target, _like

    probed = ("model.layers.0", {"model.layers.0.mlp.experts.1.up_proj.weight": Target("model.layers.0.mlp.experts.gate_up_proj", (4, 8), (8, 1), 32)})
    shapes = {"model.layers.3.mlp.experts.1.up_proj.weight": (4, 8)}
    assert _like(probed, "model.layers.3", shapes, "model.layers.3.mlp.experts.gate_up_proj") == {
        "model.layers.3.mlp.experts.1.up_proj.weight": Target("model.layers.3.mlp.experts.gate_up_proj", (4, 8), (8, 1), 32)}
    assert _like(probed, "model.layers.3", {"model.layers.3.mlp.experts.1.up_proj.weight": (8, 4)}, "p") is None  # another shape
    assert _like(probed, "model.layers.3", {"model.layers.3.mlp.experts.2.up_proj.weight": (4, 8)}, "p") is None  # another tensor
    assert _like(probed, "model.layers.3", shapes | {"model.layers.3.extra": (1, 1)}, "p") is None  # one more
    assert _like(("model.layers.0", {"lm_head.weight": Target("p")}), "model.layers.3", shapes, "p") is None  # outside its layer


# experts on disk one by one; stacked (out, in); stacked (in, out); Llama 4's, run on every token expert by expert
@pytest.mark.parametrize("arch", ["qwen2_moe", "granitemoe", "gpt_oss", "llama4_text"])
def test_annealed_experts_are_codes_served_by_name(tmp_path, arch):
    """Annealing stores each expert's matrices at the level its guard accepts (here the top-1 target, which tiny random
    models pass in few bits; they were once kept exact, a mixture's fine-tune barely smaller than itself), and a model
    serving fine-tunes by name runs those codes beside the shared experts, each row as its fine-tune alone."""
    from hf_decompose import artifact
    from hf_decompose.parts import QuantPart

    base, *finetunes = _pair(tmp_path, arch, {"a": 1, "b": 2})
    config = DecomposedConfig(mode="anneal", annealing={"target": "top1", "calibration_prompts": 4, "calibration_tokens": 4})
    artifacts = {ft.name: decompose_to_disk(ft, base, config, output_dir=tmp_path / "anneal" / ft.name, calibration=CALIBRATION, progress=False)
                 for ft in finetunes}  # fmt: skip
    _, deltas = artifact.load(artifacts["a"])
    report = json.loads((artifacts["a"] / "decomposition.json").read_text())
    annealed = [level["layer"] for level in report["annealing"]["levels"] if level["level"] is not None and ".layers." in level["layer"]]
    in_annealed = tuple(f"{layer}." for layer in annealed)  # tiny random models' guard may keep a layer exact
    experts = {n: d for n, d in deltas.items() if n.startswith(in_annealed) and len(d.shape) == 2 and (".experts." in n or "_linear" in n)
               and not n.endswith("bias")}  # fmt: skip
    assert annealed and len(experts) == len(annealed) * 4 * (3 if arch == "qwen2_moe" else 2), sorted(experts)
    assert all("dense" not in [p.kind for p in d.parts] for d in experts.values()), {n: [p.kind for p in d.parts] for n, d in experts.items()}
    alone = {name: DecomposedModel.from_pretrained(path, dtype=torch.float32).eval() for name, path in artifacts.items()}
    alone[None] = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    multi = DecomposedModel.from_pretrained(artifacts, dtype=torch.float32).eval()
    wrappers = [m for m in multi.modules() if isinstance(m, TenantExperts) and m.name.startswith(in_annealed)]
    assert wrappers and all(any(isinstance(p, QuantPart) for p in m.tenants["a"].modules()) for m in wrappers)
    held = sum(t.nbytes for m in wrappers for t in (*m.tenants["a"].parameters(), *m.tenants["a"].buffers()))
    assert held < 0.5 * sum(p.nbytes for m in wrappers for p in m.base.parameters())  # codes, not a float32 copy of the experts
    ids = torch.arange(2, 14)[None].repeat(4, 1)
    rows = ["a", "a", "a", "a"] if arch in MIXED_REFUSED else ["a", "b", None, "a"]
    with torch.no_grad():
        mixed = multi(input_ids=ids, decomposed_names=rows).logits
        for row, name in enumerate(rows):
            torch.testing.assert_close(mixed[row], alone[name](input_ids=ids[:1]).logits[0], rtol=0, atol=1e-4)
        multi.set_active("b")  # one fine-tune's tokens: each expert's base matrix and codes in one pass of the kernel
        torch.testing.assert_close(multi(input_ids=ids[:1]).logits, alone["b"](input_ids=ids[:1]).logits, rtol=0, atol=1e-4)
