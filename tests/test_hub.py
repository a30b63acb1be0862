"""Pull and push through a local Hub (`tests/hub_server.py`) with the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_decompose import ArtifactError, AutoDecomposedModelForCausalLM, CheckpointError, DecomposedConfig, decompose
from hf_decompose.cli import main as cli_main
from hf_decompose.equivalence import greedy_generate

from .hub_server import local_hub  # noqa: F401  (session fixture: the server, this process pointed at it)
from .synthetic import random_model, save_pair

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 12
FRESH_LOAD = """
import json, os, sys, urllib.error, urllib.request
import hf_decompose
from hf_decompose.equivalence import greedy_generate
from transformers import AutoModelForCausalLM, AutoTokenizer
repo, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(repo)
loaders = {"auto_decomposed": hf_decompose.AutoDecomposedModelForCausalLM.from_pretrained, "auto_model": AutoModelForCausalLM.from_pretrained}
out = {}
for offline in (False, True):
    if offline:  # a marker in the server's log: from here on, no request may reach it
        try:
            urllib.request.urlopen(urllib.request.Request(os.environ["HF_ENDPOINT"] + "/offline-from-here", method="POST"))
        except urllib.error.HTTPError:
            pass
    for name, load in loaders.items():
        model = load(repo, local_files_only=offline)
        tokens = [t.tolist() for t in greedy_generate(model, tokenizer, prompts, n)]
        out[name + ("_offline" if offline else "")] = {"class": type(model).__name__, "tokens": tokens}
print(json.dumps(out))
"""


def _upload(api: HfApi, directory: Path, repo_id: str) -> str:
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(folder_path=directory, repo_id=repo_id).oid


def _fresh_process(server, cache: Path, repo: str, prompts: list[str]) -> dict:
    env = dict(server.env(cache), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_LOAD, repo, json.dumps(prompts), str(NEW_TOKENS)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_through_the_hub(local_hub, tiny_pair, tmp_path):  # noqa: F811
    """Base and fine-tune on the Hub -> decompose while loading -> push -> fresh process: same generations."""
    api = HfApi()
    _upload(api, tiny_pair.base, "acme/tiny-base")
    _upload(api, tiny_pair.finetuned, "acme/tiny-ft")
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.finetuned)
    prompts = tiny_pair.eval_prompts[:4]
    expected = [t.tolist() for t in greedy_generate(AutoModelForCausalLM.from_pretrained(tiny_pair.finetuned), tokenizer, prompts, NEW_TOKENS)]

    model = AutoModelForCausalLM.from_pretrained("acme/tiny-ft", quantization_config=DecomposedConfig(base_model="acme/tiny-base"))
    index = model.decomposition.index
    assert index["base_model"]["revision"] == api.model_info("acme/tiny-base").sha  # pinned to a commit
    assert index["finetuned_model"] == {"id": "acme/tiny-ft", "revision": api.model_info("acme/tiny-ft").sha, "dtype": "float32"}
    commit = model.push_to_hub("acme/tiny-ft-decomposed")
    assert commit.oid == api.model_info("acme/tiny-ft-decomposed").sha

    files = {s.rfilename: s.size for s in api.model_info("acme/tiny-ft-decomposed", files_metadata=True).siblings}
    assert {"decomposed_config.json", "decomposition.safetensors", "config.json", "README.md", "tokenizer.json"} <= set(files)
    assert not any(name.endswith("model.safetensors") for name in files)
    base_digest = _sha256(tiny_pair.base / "model.safetensors")
    pulled = Path(api.snapshot_download("acme/tiny-ft-decomposed", cache_dir=tmp_path / "check"))
    assert sorted(p.name for p in pulled.iterdir()) == sorted(files)
    assert all(_sha256(p) != base_digest for p in pulled.iterdir())  # no copy of the base weights
    uploaded, finetuned = sum(files.values()), (tiny_pair.finetuned / "model.safetensors").stat().st_size
    print(f"\nuploaded repo: {uploaded / 2**20:.2f} MiB ({files['decomposition.safetensors'] / 2**20:.2f} MiB decomposition) "
          f"vs fine-tuned checkpoint {finetuned / 2**20:.2f} MiB")  # fmt: skip

    requests = local_hub.store.requests
    fresh = _fresh_process(local_hub, tmp_path / "cache", "acme/tiny-ft-decomposed", prompts)
    assert all(result == {"class": "DecomposedLlamaForCausalLM", "tokens": expected} for result in fresh.values()), fresh
    assert len(fresh) == 4 and requests[-1] == ("POST", "/offline-from-here")  # local_files_only: base from the cache too

    card = ModelCard.load("acme/tiny-ft-decomposed")
    assert card.data.base_model == "acme/tiny-base" and card.data.library_name == "hf_decompose"
    assert card.data.base_model_relation == "adapter" and "hf_decompose" in card.data.tags
    assert 'from_pretrained("acme/tiny-ft-decomposed")' in card.text and "| fine-tuned checkpoint |" in card.text


def test_card_metadata_carries_the_license_and_equivalence(local_hub, tmp_path):  # noqa: F811
    base, ft = save_pair(tmp_path, scale=0.05)
    (ft / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a fine-tune\n")
    _upload(HfApi(), base, "acme/card-base")
    _upload(HfApi(), ft, "acme/card-ft")
    model = AutoModelForCausalLM.from_pretrained("acme/card-ft", quantization_config=DecomposedConfig(base_model="acme/card-base"))
    model.decomposition.report["equivalence"] = {
        "exact_match_rate": 1.0, "num_prompts": 8, "max_new_tokens": 16, "first_divergence": [None] * 8,
        "max_abs_logit_diff": 0.0, "mean_kl": 0.0, "top1_agreement": 1.0, "perplexity_reference": 9.5, "perplexity_candidate": 9.5,
    }  # fmt: skip
    out = model.save_pretrained(tmp_path / "artifact", push_to_hub=True, repo_id="acme/card-dec", tags=["shakespeare"])
    assert ModelCard.load(out / "README.md").data.license == "apache-2.0"
    card = ModelCard.load("acme/card-dec")
    assert card.data.license == "apache-2.0" and {"shakespeare", "decomposition-lossless"} <= set(card.data.tags)
    assert "| greedy `generate()` identical | 8 / 8 held-out prompts x 16 new tokens |" in card.text


def test_pinned_base_revision_survives_a_moving_main(local_hub, tmp_path):  # noqa: F811
    base, ft = save_pair(tmp_path / "pair", scale=0.05)
    api = HfApi()
    first = _upload(api, base, "acme/moving-base")
    _upload(api, ft, "acme/moving-ft")
    model = AutoModelForCausalLM.from_pretrained("acme/moving-ft", quantization_config=DecomposedConfig(base_model="acme/moving-base"))
    assert model.decomposition.index["base_model"]["revision"] == first
    model.push_to_hub("acme/moving-ft-dec")
    random_model("llama", seed=5).save_pretrained(tmp_path / "base-v2")
    second = _upload(api, tmp_path / "base-v2", "acme/moving-base")
    assert second != first and api.model_info("acme/moving-base").sha == second

    requests = local_hub.store.requests
    start = len(requests)
    reloaded = AutoDecomposedModelForCausalLM.from_pretrained("acme/moving-ft-dec", cache_dir=tmp_path / "fresh-cache")
    assert ("GET", f"/acme/moving-base/resolve/{first}/model.safetensors") in requests[start:]
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, AutoModelForCausalLM.from_pretrained(ft)(ids).logits)
    with pytest.raises(ArtifactError, match=r"decomposed against acme/moving-base \(revision " + first + r".* but .*" + second):
        AutoDecomposedModelForCausalLM.from_pretrained("acme/moving-ft-dec", base_revision="main")


def test_missing_repos_fail_clearly(local_hub, tmp_path):  # noqa: F811
    base, ft = save_pair(tmp_path)
    with pytest.raises(CheckpointError, match="cannot fetch 'acme/no-such-base'"):
        AutoModelForCausalLM.from_pretrained(ft, quantization_config=DecomposedConfig(base_model="acme/no-such-base"))
    with pytest.raises(ArtifactError, match="cannot read the config of 'acme/no-such-artifact'"):
        AutoDecomposedModelForCausalLM.from_pretrained("acme/no-such-artifact")


def test_engine_model_and_cli_push(local_hub, tmp_path):  # noqa: F811
    base, ft = save_pair(tmp_path, scale=0.05)
    decompose(ft, base, progress=False).push_to_hub("acme/engine-dec", commit_message="engine push")
    assert "decomposed_config.json" in HfApi().list_repo_files("acme/engine-dec")
    card = ModelCard.load("acme/engine-dec")  # a local base: the card says why it names none, not where it was
    assert card.data.base_model is None and "a local checkpoint (not on the Hub" in card.text and str(tmp_path) not in card.text
    assert cli_main(["decompose", str(base), str(ft), "--output", str(tmp_path / "out"), "--push-to-hub", "acme/cli-dec"]) == 0
    files = HfApi().list_repo_files("acme/cli-dec")
    assert {"decomposed_config.json", "decomposition.safetensors", "README.md"} <= set(files)
    index = json.loads(Path(HfApi().hf_hub_download("acme/cli-dec", "decomposed_config.json", cache_dir=tmp_path / "c")).read_text())
    assert index["base_model"]["id"] == str(base)


def test_token_reaches_the_base_download(local_hub, tmp_path, monkeypatch):  # noqa: F811
    """A private base: the token reaches its download through the loader's arguments or HF_TOKEN, never by chance."""
    base, ft = save_pair(tmp_path, scale=0.05)
    api = HfApi()
    api.create_repo("acme/private-base", private=True)
    api.upload_folder(folder_path=base, repo_id="acme/private-base")
    model = AutoModelForCausalLM.from_pretrained(ft, quantization_config=DecomposedConfig(base_model="acme/private-base"))
    model.push_to_hub("acme/public-dec-of-private-base")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(CheckpointError, match="cannot fetch 'acme/private-base'"):
        AutoModelForCausalLM.from_pretrained("acme/public-dec-of-private-base", cache_dir=tmp_path / "anonymous")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = AutoModelForCausalLM.from_pretrained(ft)(ids).logits
    loaded = AutoDecomposedModelForCausalLM.from_pretrained("acme/public-dec-of-private-base", token=local_hub.token, cache_dir=tmp_path / "authorized")
    assert (tmp_path / "authorized" / "models--acme--private-base").is_dir()
    monkeypatch.setenv("HF_TOKEN", local_hub.token)  # plain transformers: huggingface_hub's own token
    plain = AutoModelForCausalLM.from_pretrained("acme/public-dec-of-private-base", cache_dir=tmp_path / "env")
    assert (tmp_path / "env" / "models--acme--private-base").is_dir()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected) and torch.equal(plain(ids).logits, expected)
