"""Pull checkpoints and artifacts from the Hub (or local directories) and push artifacts to it.

Everything goes through the public `huggingface_hub` client, so revisions, tokens, the cache
(``cache_dir`` / ``HF_HUB_CACHE``), offline mode (``local_files_only`` / ``HF_HUB_OFFLINE``) and
``HF_ENDPOINT`` behave as everywhere else in the Hugging Face stack. Only the files a step needs are
downloaded (``allow_patterns``); the base of an artifact is pulled at the commit it was decomposed
against, never at a moving branch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import artifact, checkpoints
from .errors import ArtifactError, CheckpointError

CONFIG_PATTERNS = [*checkpoints.CONFIG_PATTERNS, "README.md"]  # the card carries the license
WEIGHT_PATTERNS = checkpoints.WEIGHT_PATTERNS
ARTIFACT_PATTERNS = [artifact.INDEX, artifact.WEIGHTS, artifact.WEIGHTS_INDEX, artifact.SHARD_PATTERN, artifact.REPORT, *CONFIG_PATTERNS]
_COMMIT = re.compile(r"[0-9a-f]{40}")


def resolve(model: str | Path, revision: str | None = None, *, allow_patterns: list[str] | None = None, **hub_kwargs) -> Path:
    """A local directory as is, else the Hub snapshot (at `revision`) of the files matching `allow_patterns`.

    `hub_kwargs` go to `huggingface_hub.snapshot_download` (``token``, ``cache_dir``,
    ``local_files_only``, ...). The default patterns are a checkpoint's weights, config, tokenizer and card.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{model} is a file, expected a model directory or a Hub repo id")
    if path.is_absolute() or str(model).startswith(("./", "../", "~")):
        raise CheckpointError(f"{model}: no such directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = allow_patterns if allow_patterns is not None else WEIGHT_PATTERNS + CONFIG_PATTERNS
    kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    try:
        return Path(snapshot_download(str(model), revision=revision, allow_patterns=patterns, **kwargs))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot fetch {model!r} (revision {revision!r}): {_describe(err)}") from err


def pull_artifact(repo_or_dir: str | Path, revision: str | None = None, **hub_kwargs) -> Path:
    """The directory of a decomposed artifact: a local one as is, else a snapshot of only the artifact's files."""
    try:
        directory = resolve(repo_or_dir, revision, allow_patterns=ARTIFACT_PATTERNS, **hub_kwargs)
    except CheckpointError as err:
        raise ArtifactError(f"cannot fetch the decomposed artifact {repo_or_dir!r}: {err}") from err
    if not (directory / artifact.INDEX).is_file():
        raise ArtifactError(f"{repo_or_dir}: not a decomposed artifact (no {artifact.INDEX})")
    return directory


@dataclass(frozen=True)
class Snapshot:
    """Where a file of the Hub cache comes from."""

    cache_dir: Path
    repo_id: str
    commit: str


def snapshot_of(path: str | Path) -> Snapshot | None:
    """Parse ``<cache>/models--<org>--<name>/snapshots/<commit>[/<file>]``; `None` for other paths."""
    path = Path(path)
    for candidate in (path, path.parent):
        if candidate.parent.name == "snapshots" and _COMMIT.fullmatch(candidate.name):
            repo_folder = candidate.parent.parent
            kind, _, name = repo_folder.name.partition("--")
            if kind == "models" and name:
                return Snapshot(repo_folder.parent, name.replace("--", "/"), candidate.name)
    return None


def commit_of(path: str | Path) -> str | None:
    """The commit a Hub snapshot directory holds; `None` for a plain local directory."""
    snapshot = snapshot_of(path)
    return snapshot.commit if snapshot else None


def push_artifact(
    directory: str | Path,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
):
    """Upload an artifact directory (checked first) with a model card rendered for `repo_id`; returns the `CommitInfo`."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from .card import render_card

    directory = Path(directory)
    index = artifact.read_index(directory)  # refuse to upload a corrupted artifact
    report = artifact.read_report(directory)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    readme = render_card(index, report, directory, repo_id=repo_id, tags=tags)
    operations = [
        CommitOperationAdd(path_in_repo=p.relative_to(directory).as_posix(), path_or_fileobj=str(p))
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "README.md" and not p.name.startswith(".")
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode()))
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or "Upload decomposed model (hf_decompose)",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


def _describe(err: BaseException) -> str:
    """One line on why a download failed."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(err, GatedRepoError):
        return "the repo is gated: accept its conditions on the Hub and pass a token"
    if isinstance(err, RepositoryNotFoundError):
        return "no such repo on the Hub (or it is private and no valid token was given)"
    if isinstance(err, RevisionNotFoundError):
        return "the repo has no such revision"
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"
