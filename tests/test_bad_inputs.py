"""The bad-input catalog: each bad input fails with a specific error naming the culprit, and leaves
nothing behind (no output, no temporary or cache directory, inputs untouched).

Pair checks that `test_checkpoints.py` already covers at the library level appear here in other
variants, run end to end through the CLI's `decompose --output`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

from hf_decompose import ArtifactError, CheckpointError, ConfigError, DecomposedConfig, DecomposedModel, PromptError, decompose
from hf_decompose.artifact import FORMAT_VERSION, INCOMPLETE, INDEX, WEIGHTS
from hf_decompose.cli import build_parser
from hf_decompose.equivalence import check_disjoint

from .synthetic import COMMON, perturb, random_model, save_pair

ROOT = Path(__file__).resolve().parent.parent


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@contextlib.contextmanager
def fails(root: Path, error: type[Exception], fragment: str):
    """Expect `error` matching `fragment`, and no file under `root` created, removed or changed."""
    before = _snapshot(root)
    with pytest.raises(error, match=fragment):
        yield
    assert _snapshot(root) == before, "a failed run left files behind or changed its inputs"


def cli(*argv) -> None:
    """Run a CLI command in-process, letting its `DecomposeError` propagate."""
    args = build_parser().parse_args([str(a) for a in argv])
    args.func(args)


def _edit_weights(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _llama(**changes):
    """A random model of the synthetic Llama's architecture, with `changes` to its config."""
    return AutoModelForCausalLM.from_config(LlamaConfig(**COMMON | {"tie_word_embeddings": True} | changes))


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory) -> tuple[Path, Path]:
    return save_pair(tmp_path_factory.mktemp("pair"), "llama")


@pytest.fixture
def pair(llama_pair, tmp_path) -> tuple[Path, Path]:
    """A fresh copy of the tiny Llama pair, to spoil."""
    return tuple(Path(shutil.copytree(p, tmp_path / p.name)) for p in llama_pair)


@pytest.fixture(scope="module")
def saved(llama_pair, tmp_path_factory) -> Path:
    base, ft = llama_pair
    out = tmp_path_factory.mktemp("artifact") / "artifact"
    decompose(ft, base, DecomposedConfig(), progress=False).save_pretrained(out)
    return out


@pytest.fixture
def artifact(saved, tmp_path) -> Path:
    """A fresh copy of a valid artifact, to spoil."""
    return Path(shutil.copytree(saved, tmp_path / "artifact"))


# -- base and fine-tune do not pair up ------------------------------------------------------------


def test_architectures_differ_with_equal_shapes(tmp_path, pair):
    base, _ = pair
    random_model("mistral").save_pretrained(tmp_path / "mistral")
    with fails(tmp_path, CheckpointError, "architectures differ.*llama.*mistral"):
        cli("decompose", base, tmp_path / "mistral", "--output", tmp_path / "out")


def test_same_architecture_other_width(tmp_path, pair):
    base, _ = pair
    _llama(intermediate_size=48).save_pretrained(tmp_path / "narrow")
    with fails(tmp_path, CheckpointError, r"model\.layers\.0\.mlp\.down_proj\.weight.*\(32, 64\).*\(32, 48\)"):
        cli("decompose", base, tmp_path / "narrow", "--output", tmp_path / "out")


def test_finetune_with_fewer_layers(tmp_path, pair):
    base, _ = pair
    _llama(num_hidden_layers=1).save_pretrained(tmp_path / "short")
    with fails(tmp_path, CheckpointError, r"missing from the fine-tune: model\.layers\.1\."):
        cli("decompose", base, tmp_path / "short", "--output", tmp_path / "out")


def test_vocabulary_shrank(tmp_path, pair):
    base, _ = pair
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(120)
    model.save_pretrained(tmp_path / "fewer_tokens")
    with fails(tmp_path, CheckpointError, r"model\.embed_tokens\.weight.*vocabulary shrank from 128 to 120"):
        cli("decompose", base, tmp_path / "fewer_tokens", "--output", tmp_path / "out")


def test_untied_base_tied_finetune(tmp_path):
    model = _llama(tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "untied")
    _, ft = save_pair(tmp_path, "llama")
    with fails(tmp_path, CheckpointError, "tie_word_embeddings differs: base False, fine-tune True"):
        cli("decompose", tmp_path / "untied", ft, "--output", tmp_path / "out")


def test_nan_in_the_base(tmp_path, pair):
    base, ft = pair
    _edit_weights(base, lambda t: t["model.layers.0.mlp.gate_proj.weight"].__setitem__((1, 2), float("nan")))
    with fails(tmp_path, CheckpointError, r"base: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has 1 NaN/Inf"):
        cli("decompose", base, ft, "--output", tmp_path / "out")


def test_inf_in_a_late_layer_of_a_bf16_finetune(tmp_path, pair):
    base, _ = pair
    model = AutoModelForCausalLM.from_pretrained(base).to(torch.bfloat16)
    with torch.no_grad():
        model.model.norm.weight[5] = float("-inf")
    model.save_pretrained(tmp_path / "ft16")
    with fails(tmp_path, CheckpointError, r"tensor 'model\.norm\.weight' has 1 NaN/Inf"):
        cli("decompose", base, tmp_path / "ft16", "--output", tmp_path / "out")


def test_corrupted_safetensors_header(tmp_path, pair):
    base, ft = pair
    with open(ft / "model.safetensors", "r+b") as f:
        f.seek(9)
        f.write(b"\xff\x00garbage")
    with fails(tmp_path, CheckpointError, r"ft/model\.safetensors: not a readable safetensors file"):
        cli("decompose", base, ft, "--output", tmp_path / "out")


def test_empty_weights_file(tmp_path, pair):
    base, ft = pair
    (ft / "model.safetensors").write_bytes(b"")
    with fails(tmp_path, CheckpointError, r"ft/model\.safetensors: not a readable"):
        cli("decompose", base, ft, "--output", tmp_path / "out")


@pytest.fixture
def sharded(tmp_path, pair) -> tuple[Path, Path, list[Path]]:
    base, ft = pair
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    return tmp_path / "sharded", ft, shards


def test_truncated_shard_of_a_sharded_base(tmp_path, sharded):
    base, ft, shards = sharded
    shards[1].write_bytes(shards[1].read_bytes()[:100])
    with fails(tmp_path, CheckpointError, shards[1].name):
        cli("decompose", base, ft, "--output", tmp_path / "out")


def test_shard_listed_in_index_is_missing(tmp_path, sharded):
    base, ft, shards = sharded
    shards[-1].unlink()
    with fails(tmp_path, CheckpointError, f"missing weight file.*{shards[-1].name}"):
        cli("decompose", base, ft, "--output", tmp_path / "out")


def test_config_is_not_a_causal_lm(tmp_path):
    model = LlamaForSequenceClassification(LlamaConfig(**COMMON, num_labels=3))
    model.save_pretrained(tmp_path / "base")
    perturb(model).save_pretrained(tmp_path / "ft")
    with fails(tmp_path, CheckpointError, r"ft/config\.json: llama \['LlamaForSequenceClassification'\] is not a causal language model"):
        cli("decompose", tmp_path / "base", tmp_path / "ft", "--output", tmp_path / "out")


def test_model_type_unknown_to_transformers(tmp_path, pair):
    for directory in pair:
        _edit_config(directory, model_type="my_llama")
    with fails(tmp_path, CheckpointError, "model_type 'my_llama' is not supported"):
        cli("decompose", *pair, "--output", tmp_path / "out")


def test_unsupported_module(tmp_path, pair):
    for seed, directory in enumerate(pair):
        _edit_weights(directory, lambda t: t.__setitem__("model.layers.1.mlp.adapter.weight", torch.randn(4, 32) + seed))
    with fails(tmp_path, CheckpointError, r"model\.layers\.1\.mlp\.adapter\.weight' has no matching parameter in LlamaForCausalLM"):
        cli("decompose", *pair, "--output", tmp_path / "out")


def test_quantized_integer_weights(tmp_path, pair):
    base, ft = pair
    _edit_weights(ft, lambda t: t.__setitem__("model.layers.0.self_attn.v_proj.weight", torch.ones(16, 32, dtype=torch.int8)))
    with fails(tmp_path, CheckpointError, r"v_proj\.weight' has dtype I8; only floating-point"):
        cli("decompose", base, ft, "--output", tmp_path / "out")


# -- prompts ------------------------------------------------------------------------------------


def test_empty_prompt_file(tmp_path, pair):
    (tmp_path / "prompts.txt").write_text("\n   \n\n")
    with fails(tmp_path, PromptError, "prompts.txt: the prompt set is empty"):
        cli("decompose", *pair, "--output", tmp_path / "out", "--prompts", tmp_path / "prompts.txt")


def test_missing_prompt_file(tmp_path, pair):
    with fails(tmp_path, PromptError, r"prompt file .*nowhere\.txt does not exist"):
        cli("decompose", *pair, "--output", tmp_path / "out", "--prompts", tmp_path / "nowhere.txt")


def test_calibration_and_evaluation_prompts_overlap(tmp_path):
    calib = ["To be, or not to be", "Friends, Romans, countrymen"]
    check_disjoint(calib, ["All the world's a stage"])
    with fails(tmp_path, PromptError, "overlap .1 shared.*'Friends, +Romans, countrymen '"):
        check_disjoint(calib, ["All the world's a stage", "Friends,  Romans, countrymen "])


def test_cli_calibration_overlaps_evaluation(tmp_path, pair):
    (tmp_path / "eval.txt").write_text("Now is the winter of our discontent\nOnce more unto the breach\n")
    (tmp_path / "calib.txt").write_text("Once more unto the breach\nA horse, a horse\n")
    with fails(tmp_path, PromptError, "overlap .1 shared.*'Once more unto the breach'"):
        cli("decompose", *pair, "--output", tmp_path / "out", "--mode", "anneal",
            "--prompts", tmp_path / "eval.txt", "--calibration", tmp_path / "calib.txt")  # fmt: skip


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "yaml_text, fragment",
    [
        ("decomposition:\n  q: 0\n", "q=0 must lie strictly between 0 and 1"),
        ("decomposition:\n  q: 1.0\n", "q=1.0 must lie strictly between 0 and 1"),
        ("decomposition:\n  max_rank: -3\n", "max_rank=-3 must be a non-negative integer"),
        ("decomposition:\n  dense_block_density: -0.5\n", r"dense_block_density=-0\.5 must lie in \[0, 1\]"),
        ("decomposition:\n  q: '0.05'\n", "q='0.05' has type str, expected int or float"),
        ("decomposition:\n  mode: lossles\n", "mode='lossles' is not one of"),
        ("decomposition:\n  budget: 3\n", "unknown config field.*'budget'"),
        ("decomposition:\n  annealing:\n    column_steps: 3\n", r"annealing.column_steps=3 must be a number in \[0, 2\]"),
        ("decomposition:\n  annealing:\n    head_row_steps: -1\n", r"annealing.head_row_steps=-1 must be a non-negative number of logits"),
    ],
)
def test_config_value_out_of_range(tmp_path, pair, yaml_text, fragment):
    (tmp_path / "recipe.yaml").write_text(yaml_text)
    with fails(tmp_path, ConfigError, fragment):
        cli("decompose", *pair, "--output", tmp_path / "out", "--config", tmp_path / "recipe.yaml")


# -- artifacts ----------------------------------------------------------------------------------


def _rewrite_index(artifact: Path, **changes) -> None:
    index = json.loads((artifact / INDEX).read_text())
    (artifact / INDEX).write_text(json.dumps(index | changes))


def test_artifact_of_another_base(tmp_path, artifact):
    other = random_model("llama", seed=5)
    other.save_pretrained(tmp_path / "other_base")
    with fails(tmp_path, ArtifactError, "base mismatch: .*artifact was decomposed against .*other_base has sha256"):
        DecomposedModel.from_pretrained(artifact, base_model=tmp_path / "other_base")


def test_artifact_from_a_newer_format(tmp_path, artifact):
    _rewrite_index(artifact, format_version=FORMAT_VERSION + 1)
    with fails(tmp_path, ArtifactError, f"format version {FORMAT_VERSION + 1} is newer than this hf_decompose reads"):
        DecomposedModel.from_pretrained(artifact)


@pytest.mark.parametrize("name", [WEIGHTS, "config.json"])
def test_artifact_with_a_corrupted_byte(tmp_path, artifact, name):
    data = bytearray((artifact / name).read_bytes())
    data[len(data) * 2 // 3] ^= 0x01
    (artifact / name).write_bytes(bytes(data))
    with fails(tmp_path, ArtifactError, f"{name}: checksum mismatch"):
        DecomposedModel.from_pretrained(artifact)


def test_artifact_with_an_edited_index(tmp_path, artifact):
    index = json.loads((artifact / INDEX).read_text())
    _rewrite_index(artifact, config=index["config"] | {"q": 0.5})
    with fails(tmp_path, ArtifactError, f"{INDEX}: checksum mismatch"):
        DecomposedModel.from_pretrained(artifact)


def test_artifact_missing_a_listed_file(tmp_path, artifact):
    (artifact / "generation_config.json").unlink()
    with fails(tmp_path, ArtifactError, "file generation_config.json listed in .* is missing"):
        DecomposedModel.from_pretrained(artifact)


def test_interrupted_artifact_write(tmp_path, artifact):
    (artifact / INCOMPLETE).touch()
    with fails(tmp_path, ArtifactError, "an incomplete artifact"):
        DecomposedModel.from_pretrained(artifact)


# -- output -------------------------------------------------------------------------------------


def test_output_holds_another_artifact(tmp_path, pair, artifact):
    with fails(tmp_path, ArtifactError, "artifact already holds an artifact .*--overwrite"):
        cli("decompose", *pair, "--output", artifact)


def test_overwrite_refuses_a_directory_of_other_files(tmp_path, pair):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    with fails(tmp_path, ArtifactError, "home is not empty and holds no hf_decompose artifact"):
        cli("decompose", *pair, "--output", tmp_path / "home", "--overwrite")


def test_resume_dir_that_is_no_layer_cache(tmp_path, pair):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with fails(tmp_path, ArtifactError, "notes is not empty and is no layer cache"):
        decompose(pair[1], pair[0], DecomposedConfig(), progress=False, resume_dir=tmp_path / "notes")


DISK_FULL = """
import resource, signal, sys
from hf_decompose import ArtifactError, DecomposedConfig, decompose_to_disk
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
try:
    decompose_to_disk(sys.argv[2], sys.argv[1], DecomposedConfig(), output_dir=sys.argv[3], progress=False)
except ArtifactError as err:
    print("ArtifactError:", err)
"""


def test_disk_fills_up_mid_write(tmp_path, pair):
    before = _snapshot(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DISK_FULL), *map(str, pair), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "ArtifactError: cannot write the artifact" in proc.stdout and "File too large" in proc.stdout, proc.stdout
    assert _snapshot(tmp_path) == before


# -- inputs a user expects to work --------------------------------------------------------------


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.float().view(torch.int32), b.float().view(torch.int32))


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # tied and untied embeddings
def test_added_tokens_are_supported(tmp_path, arch):
    base = random_model(arch)
    base.save_pretrained(tmp_path / "base")
    base.resize_token_embeddings(140)
    perturb(base).save_pretrained(tmp_path / "ft")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ft").eval()
    ids = torch.arange(100, 140).reshape(2, 20)  # old and new tokens
    model = decompose(tmp_path / "ft", tmp_path / "base", DecomposedConfig(), progress=False)
    model.save_pretrained(tmp_path / "out")
    loaded = DecomposedModel.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        assert expected.shape[-1] == 140
        assert torch.equal(model(input_ids=ids).logits, expected)
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    assert model.deltas["model.embed_tokens.weight"].shape == (140, 32)


def test_bf16_base_fp32_finetune_rebuilds_bit_for_bit(tmp_path):
    base = random_model("llama").to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    perturb(base.float(), scale=1e-2).save_pretrained(tmp_path / "ft")
    model = decompose(tmp_path / "ft", tmp_path / "base", DecomposedConfig(mode="lossless"), progress=False)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ft", dtype=torch.float32).eval()
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys() and len(expected) > 10
    for name, param in expected.items():
        assert _same_bits(state[name], param), name
    ids = torch.arange(0, 24).reshape(2, 12)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


# -- bounds: prompt lengths, encodings, paths, calibration ---------------------------------------


@pytest.fixture
def tokenized(pair) -> tuple[Path, Path]:
    """The pair with a small word-level tokenizer (the synthetic pair has none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "<unk>", *"to be or not that is the question short".split()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")
    for directory in pair:
        tokenizer.save_pretrained(directory)
    return pair


class _MustNotRun(torch.nn.Module):
    """A model that fails if it is ever run: proves a check came before any allocation."""

    def __init__(self, config):
        super().__init__()
        self.config, self.weight = config, torch.nn.Parameter(torch.zeros(1))

    def forward(self, *args, **kwargs):
        raise AssertionError("the model ran")

    generate = forward


def test_prompt_longer_than_the_context_is_refused_before_any_model_runs(tmp_path, tokenized):
    from transformers import AutoConfig, AutoTokenizer

    from hf_decompose.equivalence import verify_equivalence

    ft = tokenized[1]
    model = _MustNotRun(AutoConfig.from_pretrained(ft))
    with fails(tmp_path, PromptError, r"prompt 1 .* has \d+ tokens: with 8 new tokens it exceeds the model's context of 64"):
        verify_equivalence(model, model, AutoTokenizer.from_pretrained(ft), ["short", "to be " * 20_000], max_new_tokens=8)


def test_cli_long_prompt_is_refused_before_decomposing(tmp_path, tokenized):
    (tmp_path / "prompts.txt").write_text("short\n" + "to be " * 20_000 + "\n")
    with fails(tmp_path, PromptError, "exceeds the model's context of 64.*--max-prompt-tokens"):
        cli("decompose", *tokenized, "--output", tmp_path / "out", "--prompts", tmp_path / "prompts.txt", "--max-new-tokens", "8")


def test_max_prompt_tokens_truncates_with_a_warning(tmp_path, tokenized, caplog):
    from transformers import AutoTokenizer

    from hf_decompose.equivalence import verify_equivalence

    ft = tokenized[1]
    reference = AutoModelForCausalLM.from_pretrained(ft).eval()
    result = verify_equivalence(reference, reference, AutoTokenizer.from_pretrained(ft), ["short", "to be " * 20_000],
                                max_new_tokens=8, max_prompt_tokens=16, progress=False)  # fmt: skip
    assert result.exact_match_rate == 1.0 and result.max_abs_logit_diff == 0
    assert "1 prompt(s) longer than 16 tokens are truncated to it (prompt 1:" in caplog.text
    with pytest.raises(PromptError, match="max_prompt_tokens=0 must be a positive integer"):
        verify_equivalence(reference, reference, AutoTokenizer.from_pretrained(ft), ["short"], max_prompt_tokens=0)


@pytest.mark.parametrize("command", ["decompose", "verify"])
def test_prompt_file_that_is_not_utf8(tmp_path, pair, artifact, command):
    (tmp_path / "prompts.txt").write_bytes(b"To be\n\xff\xfe\x00binary\x89PNG\n")
    argv = ("decompose", *pair, "--output", tmp_path / "out") if command == "decompose" else ("verify", artifact)
    with fails(tmp_path, PromptError, r"prompts\.txt: not UTF-8 text"):
        cli(*argv, "--prompts", tmp_path / "prompts.txt")


def test_output_whose_parent_is_a_file(tmp_path, pair):
    (tmp_path / "notes.txt").write_text("not a directory")
    with fails(tmp_path, ArtifactError, r"notes\.txt/out.*Not a directory"):
        cli("decompose", *pair, "--output", tmp_path / "notes.txt" / "out")


def test_output_in_new_directories_leaves_none_behind_on_failure(tmp_path, pair):
    (tmp_path / "prompts.txt").write_text("")
    with fails(tmp_path, PromptError, "the prompt set is empty"):
        cli("decompose", *pair, "--output", tmp_path / "a" / "b" / "out", "--prompts", tmp_path / "prompts.txt")


@pytest.mark.skipif(os.geteuid() == 0, reason="root enters and writes any directory")
def test_output_whose_parent_cannot_be_entered(tmp_path, pair):
    (tmp_path / "locked").mkdir(mode=0o600)
    try:
        with fails(tmp_path, ArtifactError, "locked.*Permission denied|permission denied"):
            cli("decompose", *pair, "--output", tmp_path / "locked" / "out")
    finally:
        (tmp_path / "locked").chmod(0o700)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory")
def test_checkpoint_that_cannot_be_read(tmp_path, pair):
    base, ft = pair
    ft.chmod(0o000)
    try:
        with fails(tmp_path, CheckpointError, "ft.*(permission denied|Permission denied)"):
            cli("decompose", base, ft, "--output", tmp_path / "out")
    finally:
        ft.chmod(0o755)


def test_bad_calibration_is_refused_before_any_checkpoint_is_read(tmp_path, pair):
    base, ft = pair
    (ft / "model.safetensors").write_bytes(b"")  # reading it would fail with a CheckpointError
    (tmp_path / "calib.txt").write_text("\n\n")
    with fails(tmp_path, PromptError, "empty"):
        cli("decompose", base, ft, "--output", tmp_path / "out", "--mode", "anneal", "--calibration", tmp_path / "calib.txt")
    with fails(tmp_path, PromptError, "empty"):
        decompose(ft, base, DecomposedConfig(mode="anneal", calibration=[]), progress=False)


def test_decompose_to_disk_takes_calibration_and_refuses_an_unknown_keyword(tmp_path, pair):
    """`calibration=` reaches the guard as in `decompose` (it once went into the Hub options, which a local directory never
    reads: the anneal ran on the built-in set); a keyword it does not know is a TypeError before any work."""
    from hf_decompose import decompose_to_disk

    base, ft = pair
    with fails(tmp_path, PromptError, "empty"):
        decompose_to_disk(ft, base, DecomposedConfig(mode="anneal"), output_dir=tmp_path / "out", calibration=["", " "], progress=False)
    with fails(tmp_path, TypeError, "unexpected keyword argument 'calibraton'"):
        decompose_to_disk(ft, base, DecomposedConfig(mode="anneal"), output_dir=tmp_path / "out", calibraton=["to be"], progress=False)


def test_anneal_without_a_tokenizer_is_refused_before_any_layer(tmp_path, pair):
    """Neither checkpoint ships tokenizer files: a Llama's tokenizer does not load; for a Qwen2 transformers builds an
    empty one, which encodes every prompt to no tokens (the guard then crashed inside `generate`)."""
    from hf_decompose import decompose_to_disk

    base, ft = pair
    with fails(tmp_path, PromptError, r"neither encodes them \(.*ft: ValueError.*base: ValueError.*save the tokenizer beside the fine-tune"):
        decompose_to_disk(ft, base, DecomposedConfig(mode="anneal"), output_dir=tmp_path / "out", progress=False)
    qwen = save_pair(tmp_path / "qwen2", "qwen2")
    with fails(tmp_path, PromptError, r"ft: encodes calibration prompt 0 \('.*'\) to no tokens; .*base: encodes calibration prompt 0"):
        decompose_to_disk(qwen[1], qwen[0], DecomposedConfig(mode="anneal"), output_dir=tmp_path / "out", progress=False)
    with pytest.raises(PromptError, match="neither encodes them"):  # in memory alike
        decompose(qwen[1], qwen[0], DecomposedConfig(mode="anneal"), progress=False)


def test_verifying_with_an_empty_tokenizer_is_refused(tmp_path):
    from transformers import AutoTokenizer

    from hf_decompose.equivalence import verify_equivalence

    base, ft = save_pair(tmp_path, "qwen2")
    model = _MustNotRun(AutoModelForCausalLM.from_pretrained(ft).config)
    with pytest.raises(PromptError, match=r"prompt 0 \('to be'\) encodes to no tokens with this tokenizer \(Qwen2Tokenizer\)"):
        verify_equivalence(model, model, AutoTokenizer.from_pretrained(ft), ["to be", "or not"], max_new_tokens=8)


def test_shard_named_outside_the_checkpoint_directory(tmp_path, sharded):
    base, ft, shards = sharded
    shutil.copy(shards[0], tmp_path / "outside.safetensors")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "../outside.safetensors" if v == shards[0].name else v for k, v in index["weight_map"].items()}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    with fails(tmp_path, CheckpointError, r"file name '\.\./outside\.safetensors' points outside the directory"):
        cli("decompose", base, ft, "--output", tmp_path / "out")


def test_shard_that_is_a_symlink_to_outside(tmp_path, sharded):
    base, ft, shards = sharded
    shards[0].rename(tmp_path / "elsewhere.safetensors")
    shards[0].symlink_to(tmp_path / "elsewhere.safetensors")
    with fails(tmp_path, CheckpointError, f"{shards[0].name} is a link to .*elsewhere.safetensors, outside"):
        cli("decompose", base, ft, "--output", tmp_path / "out")


def test_artifact_weights_that_are_a_symlink_to_outside(tmp_path, artifact):
    (artifact / WEIGHTS).rename(tmp_path / "elsewhere.safetensors")
    (artifact / WEIGHTS).symlink_to(tmp_path / "elsewhere.safetensors")
    with fails(tmp_path, ArtifactError, f"{WEIGHTS} is a link to .*elsewhere.safetensors, outside"):
        DecomposedModel.from_pretrained(artifact)


def test_symlinks_inside_a_hub_snapshot_are_followed(tmp_path, llama_pair):
    """A Hub cache snapshot links each file to the repo's blobs: inside the repo, so it is read."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in llama_pair[0].iterdir():
        shutil.copy(file, repo / "blobs" / file.name)
        (snapshot / file.name).symlink_to(Path("../..") / "blobs" / file.name)
    from hf_decompose.checkpoints import CheckpointReader

    assert CheckpointReader(snapshot).names() == CheckpointReader(llama_pair[0]).names()
