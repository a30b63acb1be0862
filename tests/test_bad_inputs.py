"""The bad-input catalog: each bad input fails with a specific error naming the culprit, and leaves
nothing behind (no output, no temporary or cache directory, inputs untouched).

Pair checks that `test_checkpoints.py` already covers at the library level appear here in other
variants, run end to end through the CLI's `decompose --output`.
"""

from __future__ import annotations

import contextlib
import json
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
from hf_decompose.artifact import INCOMPLETE, INDEX, WEIGHTS, _write_index
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
    _rewrite_index(artifact, format_version=2)
    with fails(tmp_path, ArtifactError, "format version 2 is newer than this hf_decompose reads"):
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


@pytest.mark.parametrize("digests", [{}, {"model.safetensors": None}, {"model.safetensors": []}])
def test_artifact_index_resigned_with_a_malformed_base_digest(tmp_path, artifact, digests):
    index = json.loads((artifact / INDEX).read_text())
    index["base_model"]["sha256"] = digests
    _write_index(artifact, index)  # consistent, re-signed: the structure check must catch it
    with fails(tmp_path, ArtifactError, "field 'base_model' lacks its id or sha256"):
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
from hf_decompose import ArtifactError, DecomposedConfig, decompose
model = decompose(sys.argv[2], sys.argv[1], DecomposedConfig(), progress=False)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
try:
    model.save_pretrained(sys.argv[3])
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
    merged = {n: m.merged_module().weight for n, m in model.model.named_modules() if hasattr(m, "merged_module")}
    params = dict(model.model.named_parameters())
    for name, param in reference.named_parameters():
        weight = merged.get(name.removesuffix(".weight"), params.get(name))
        assert weight is not None and _same_bits(weight, param), name
    ids = torch.arange(0, 24).reshape(2, 12)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
