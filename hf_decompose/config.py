"""`DecomposedConfig`: every knob of a decomposition, validated, readable from YAML."""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import ConfigError
from .quantize import BITS, GRIDS

NOT_SAVED = {"saved": False}  # field metadata: run-time inputs, never written to a config or an artifact
HUB_OPTIONS = ("token", "cache_dir", "local_files_only")
DEFAULT_CALIBRATION = Path(__file__).parent / "data" / "calibration.txt"
QUANT_METHOD = "hf_decompose"  # the name transformers' quantization registry knows this config by

MODES = ("lossless", "criterion", "anneal")
TARGETS = ("exact", "tie", "floor", "identical", "top1", "kl")
SCHEDULES = ("knapsack", "ladder")
NULLS = ("reference", "init")
CORRECTIONS = ("bh", "bonferroni")
EXECUTIONS = ("merged", "split")
FIELD_TYPES = {
    "base_model": (str, type(None)), "base_revision": (str, type(None)), "mode": str, "null": str, "q": (int, float),
    "correction": str, "entry_test": bool, "group_test": bool, "spectral_test": bool, "max_rank": int, "execution": str,
    "dense_block_density": (int, float), "seed": int, "annealing": dict, "quant_method": str,
}  # fmt: skip


ANNEALING: dict[str, Any] = {
    "target": "tie",
    "tie_tolerance": 1e-3,
    "tolerance": 0.99,
    "expected_flips": 0.25,  # 0.5 let the step ladder flip 2 of 32 held-out prompts just above the tolerance (README)
    "positions": 2048,
    "levels": None,  # the target's (`TARGET_SCHEDULES`)
    "schedule": None,
    "calibration_prompts": 32,
    "calibration_tokens": 32,
    "max_time_s": 900,
    "precision": True,
    "keep_supported": False,
    "error_feedback": True,
    "grid": "signed",
    # 0.5 (steps per column): 4.76% / 9.40% of the float32 delta against 5.57% / 11.04% per row on the default / long
    # weight-decay pair, but 4 of 192 held-out prompts of the latter diverged outside the tie grade, against 1 (README)
    "column_steps": 0.0,
    # the default pair at 5.13% / 5.25% of the float32 delta with 3 / 4 against 5.62% without, 32 / 32 tie and none of 192
    # held-out prompts outside it; 2: 4.85%, but 31 / 32 and 2 of 192 (README)
    "head_row_steps": 3.0,
}


# `levels` and `schedule` where they are not set, per target: the floor target's budget goes by knapsack over
# low-bit low rank (`mix<bits>`: 0.82% of the float32 delta on the default pair, against 2.78% with one-bit
# residual levels and 3.45% with the ladder's; README), every other target climbs the ladder (it beat the
# knapsack at the tie target, over step levels too: 1.91 against 2.73 bits), whose low-bit rungs are step quantizers:
# at the bytes of 2-bit codes with absmax scales per 64 a layer of the default pair flipped 1.75x less (README).
# Their low rank keeps the weighted directions until 9% of the energy is left (`lr0.3`; `lr0.5`, 25%, stored 5.79% /
# 12.11% of the float32 delta on the default / long weight-decay pair, `lr0.3` 5.57% / 11.60%, all 32 / 32 tie), in
# 8-bit factors (`q8`: 4.63% / 10.60% against 5.13% / 10.69% in bfloat16, 32 / 32 tie; outside the tie grade on 672
# held-out prompts 5 against 3, the guard's design rate about 5; README); `int5` is where a sensitive tied embedding
# stops (the long weight-decay pair's: 4.90 bits, not `int6`'s 5.93).
LADDER = {"schedule": "ladder", "levels": ["int8", "int6", "int5", "int4g64", *(f"lr0.3q8+step{s}" for s in (0.8, 1.2, 1.5, 1.7, 2, 2.4, 3.4)), "lr0.3q8+int1"]}
TARGET_SCHEDULES: dict[str, dict[str, Any]] = {
    "floor": {"schedule": "knapsack", "levels": ["int6", "int4g64", "mix4", "mix2", "mix1.5", "lr0.5+int1", "mix1", "mix0.7", "mix0.5", "mix0.3", "lr1"]},
}


MIX = re.compile(r"^mix(?P<bits>[0-9]+(?:\.[0-9]+)?)$")
LEVEL = re.compile(r"^(?:lr(?P<eps>[0-9.]+)(?:q(?P<factor_bits>\d+))?(?:$|\+(?=[is])))?(?:int(?P<bits>\d+)(?:g(?P<group>\d+))?|step(?P<step>[0-9.]+))?$")
STEP_BITS = 4  # a step level's code width: +-7, what the fused 4-bit kernels run


@dataclass(frozen=True)
class Level:
    """One annealing level: keep the activation-weighted singular directions until at most `eps`
    of the delta's (weighted) norm is left out (`eps=None`: none), and store what they leave in
    `bits`-bit integers with one scale per `group` inputs (`bits=None`: drop it; `group=0`: per row; a
    `group` that does not divide the row: its largest divisor below `group`, `quantize.group_size`), or
    with a `step` of that many times each row's RMS (`quantize`'s step quantizer: its Huffman-coded
    size follows the step, about ``2.05 - log2(step)`` bits per Gaussian entry).

    Written ``"lr0.5+int3g64"``, ``"int8"`` (every entry in 8 bits), ``"lr0.05"`` (low rank only),
    ``"lr0.5+step1.7"``, ``"lr0.5q8+step1.7"`` (`factor_bits`: the kept directions' factors in 8-bit codes with a scale
    per direction, rounded before the rest, whose codes absorb their rounding; without ``q``, bfloat16 factors);
    a bare number ``0.05`` means ``"lr0.05"``. ``"mix1.5"`` (`mix`): Delta-CoMe's mixed precision at 1.5
    bits per entry, the weighted directions in 2- to 8-bit factors as their energies earn the bits
    (`annealing.mixed_widths`), the rest dropped.
    """

    eps: float | None
    bits: int | None
    group: int = 0
    mix: float | None = None
    step: float | None = None
    factor_bits: int | None = None

    @classmethod
    def parse(cls, spec: str | float) -> Level:
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            spec = f"lr{spec}"
        mix = MIX.match(spec) if isinstance(spec, str) else None
        if mix:
            if not 0 < float(mix["bits"]) <= 32:
                raise ConfigError(f"annealing level {spec!r}: a mixed-precision budget must lie in (0, 32] bits per entry")
            return cls(None, None, 0, float(mix["bits"]))
        match = LEVEL.match(spec) if isinstance(spec, str) and spec else None
        try:
            step = None if match["step"] is None else float(match["step"])
            bits = STEP_BITS if step is not None else None if match["bits"] is None else int(match["bits"])
            factor_bits = None if match["factor_bits"] is None else int(match["factor_bits"])
            level = cls(None if match["eps"] is None else float(match["eps"]), bits, int(match["group"] or 0), step=step, factor_bits=factor_bits)
        except (TypeError, ValueError):
            raise ConfigError(f"annealing level {spec!r} is not of the form 'lr<eps>', 'int<bits>[g<group>]', 'step<step>', 'lr<eps>[q<bits>]+' one of those two, or 'mix<bits>'") from None
        if (level.eps is None and level.bits is None) or (level.eps is not None and not 0 < level.eps <= 1) or (level.bits is not None and level.bits not in BITS):
            raise ConfigError(f"annealing level {spec!r}: eps must lie in (0, 1] and bits in {BITS}")
        if factor_bits is not None and (level.bits is None or not 2 <= factor_bits <= 8):
            raise ConfigError(f"annealing level {spec!r}: factors in q<bits> take 2 to 8 bits, beside codes (low rank alone in low bits: 'mix<bits>')")
        if step is not None and not 0 < step <= 64:
            raise ConfigError(f"annealing level {spec!r}: a step must lie in (0, 64] row RMS")
        return level


@dataclass
class DecomposedConfig(QuantizationConfigMixin):
    """How to decompose a fine-tune against its base.

    Args:
        base_model: Hub id or local directory of the checkpoint training started from.
        base_revision: Hub revision of the base (ignored for local directories).
        mode: ``"lossless"`` removes only exactly-zero deltas (rebuilds the fine-tune bit for bit);
            ``"criterion"`` removes every dependency the statistical criterion calls unsupported;
            ``"anneal"`` removes structure layer by layer under an equivalence guard (see `annealing`).
        null: ``"reference"`` tests deltas against the base with a noise scale estimated from the
            data; ``"init"`` tests weights against N(0, initializer_range^2) (the paper's literal form).
        q: significance level (FDR level for ``"bh"``, family-wise level for ``"bonferroni"``).
        correction: multiple-testing control, ``"bh"`` (Benjamini-Hochberg) or ``"bonferroni"``.
        entry_test / group_test / spectral_test: which tests contribute to the support.
        max_rank: at most this many spectral directions are tested per matrix.
        execution: ``"merged"`` (one dense weight per module) or ``"split"`` (base plus substructures).
        dense_block_density: components at least this dense are stored as dense blocks.
        seed: seed for anything random (prompt sampling, randomized solvers).
        annealing: the schedule and guard of ``mode="anneal"``, merged over `ANNEALING`:
            ``target``, a level of one guard (`annealing.guard`, teacher-forced on calibration):
            ``"exact"`` (lossless: nothing is annealed); ``"tie"`` (the default: every position
            tie-equivalent, i.e. top-1 kept or a near-tie of margin below ``tie_tolerance`` logits
            swapped, and at most ``expected_flips`` greedy flips expected at margins above it over
            ``positions`` unseen positions, the margin criterion `annealing.expected_flips`);
            ``"floor"`` (no more flips expected above ``tie_tolerance`` and no higher mean KL than
            the fine-tune served in bfloat16 on the same prompts); ``"identical"`` (every top-1
            kept and at most ``expected_flips`` flips expected at any margin); ``"top1"``: agreement
            >= ``tolerance``; ``"kl"``: mean KL <= ``tolerance``, ``schedule`` (``"ladder"``: one temperature by bisection,
            then the layers heated in rounds, one level each per round; ``"knapsack"``: a level per layer from its
            probed sensitivity, `hf_decompose.allocation`, for the tie / identical / floor targets), ``levels`` (the temperature: `Level` specs such as
            ``"int8"``, ``"lr0.5+int3g64"`` or ``"lr0.5+step1.7"``, least aggressive first; ``levels`` and ``schedule`` left None are
            the target's, `TARGET_SCHEDULES`: the knapsack over fine one-bit levels for ``floor``, else the
            ladder of `LADDER`), ``calibration_prompts``,
            ``calibration_tokens``, ``max_time_s``, ``precision`` (try bfloat16 storage of kept
            factors), ``keep_supported`` (never drop the criterion's supported singular directions),
            ``error_feedback`` (round with the calibration Gram's compensation, GPTQ-style), ``grid``
            (``"signed"``, the default: the symmetric grid with a zero; ``"full"``: codes of 2 bits
            and more use all their levels, `hf_decompose.quantize`; it lost on the default pair),
            ``column_steps`` (step levels: each column's step times ``H_jj^(-column_steps / 2)``, ``H_jj`` the
            calibration inputs' second moment, coarser where an input is small, `quantize.column_steps`; 0: one
            step per row), ``head_row_steps`` (levels of the output head on the signed grid, a tied embedding's too: each
            token's row step times ``min(4, max(1, d / head_row_steps))``, ``d`` the least distance in logits of the token below the
            top-1 on the calibration positions, `annealing.head_row_steps`; 0: off).
        calibration: ``mode="anneal"``: the prompts the guard runs on (a list of strings, a prompts
            file, or a `datasets.Dataset`; keep them disjoint from evaluation prompts); None uses the
            built-in default set (`DEFAULT_CALIBRATION`) and the report says so. Not saved.
        calibration_column: the column of a dataset given as `calibration` (default ``prompt`` or ``text``).
        hub_options: ``token`` / ``cache_dir`` / ``local_files_only`` for the downloads a load makes
            besides transformers' own (the base checkpoint). Not saved.
        device: where the per-layer work runs (deltas, the criterion's tests and SVDs; annealing's guard:
            its forward passes a decoder layer at a time and the Gram matrices; annealing's candidates, low
            rank and rounding, are made on CPU): ``"auto"`` (CUDA when present, else CPU), ``"cpu"``,
            ``"cuda"``, ``"cuda:1"``... Layers stream from the files to it and their results back to CPU.
            Not saved: the result is the same on every device up to float tolerance.
        quant_method: always ``"hf_decompose"``: as a transformers ``quantization_config``
            (``from_pretrained(..., quantization_config=DecomposedConfig(base_model=...))``), this
            config makes loading decompose the checkpoint against ``base_model`` (see `hf_decompose.quantizer`).
    """

    base_model: str | None = None
    base_revision: str | None = None
    mode: str = "lossless"
    null: str = "reference"
    q: float = 0.05
    correction: str = "bh"
    entry_test: bool = True
    group_test: bool = True
    spectral_test: bool = True
    max_rank: int = 64
    execution: str = "merged"
    dense_block_density: float = 0.5
    seed: int = 0
    annealing: dict[str, Any] = field(default_factory=dict)
    calibration: Any = field(default=None, repr=False, metadata=NOT_SAVED)
    calibration_column: str | None = field(default=None, metadata=NOT_SAVED)
    hub_options: dict[str, Any] = field(default_factory=dict, repr=False, metadata=NOT_SAVED)
    device: str = field(default="auto", metadata=NOT_SAVED)
    quant_method: str = field(default=QUANT_METHOD, kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.annealing, dict):
            raise ConfigError(f"annealing must be a mapping, got {type(self.annealing).__name__}")
        unknown = sorted(set(self.annealing) - set(ANNEALING))
        if unknown:
            raise ConfigError(f"unknown annealing field(s): {', '.join(unknown)}")
        self.annealing = {**ANNEALING, **self.annealing}
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first field of a wrong type or out of range."""
        for name, kind in FIELD_TYPES.items():
            value = getattr(self, name)
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                raise ConfigError(f"{name}={value!r} has type {type(value).__name__}, expected {expected}")
        if self.quant_method != QUANT_METHOD:
            raise ConfigError(f"unknown quant_method {self.quant_method!r}: a DecomposedConfig is quant_method={QUANT_METHOD!r}")
        for name, allowed in (("mode", MODES), ("null", NULLS), ("correction", CORRECTIONS), ("execution", EXECUTIONS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is not one of {allowed}")
        if not 0 < self.q < 1:
            raise ConfigError(f"q={self.q!r} must lie strictly between 0 and 1")
        if self.max_rank < 0:
            raise ConfigError(f"max_rank={self.max_rank!r} must be a non-negative integer")
        if not 0 <= self.dense_block_density <= 1:
            raise ConfigError(f"dense_block_density={self.dense_block_density!r} must lie in [0, 1]")
        if self.calibration_column is not None and not isinstance(self.calibration_column, str):
            raise ConfigError(f"calibration_column={self.calibration_column!r} must be a column name")
        if not isinstance(self.hub_options, dict) or set(self.hub_options) - set(HUB_OPTIONS):
            raise ConfigError(f"hub_options must be a mapping with keys among {HUB_OPTIONS}")
        self.torch_device()
        a = self.annealing
        if a["target"] not in TARGETS:
            raise ConfigError(f"annealing.target={a['target']!r} is not one of {TARGETS}")
        if a["grid"] not in GRIDS:
            raise ConfigError(f"annealing.grid={a['grid']!r} is not one of {GRIDS}")
        if a["schedule"] is not None and a["schedule"] not in SCHEDULES:
            raise ConfigError(f"annealing.schedule={a['schedule']!r} is not one of {SCHEDULES} (or None: the target's)")
        if a["levels"] is not None and (not isinstance(a["levels"], list) or not a["levels"]):
            raise ConfigError(f"annealing.levels={a['levels']!r} must be a non-empty list, least aggressive first (or None: the target's)")
        for level in a["levels"] or []:
            Level.parse(level)
        if isinstance(a["column_steps"], bool) or not isinstance(a["column_steps"], (int, float)) or not 0 <= a["column_steps"] <= 2:
            raise ConfigError(f"annealing.column_steps={a['column_steps']!r} must be a number in [0, 2] (0: one step per row)")
        if isinstance(a["head_row_steps"], bool) or not isinstance(a["head_row_steps"], (int, float)) or not 0 <= a["head_row_steps"] < float("inf"):
            raise ConfigError(f"annealing.head_row_steps={a['head_row_steps']!r} must be a non-negative number of logits (0: off)")
        for key in ("calibration_prompts", "calibration_tokens", "max_time_s", "expected_flips", "positions", "tolerance", "tie_tolerance"):
            if isinstance(a[key], bool) or not isinstance(a[key], (int, float)) or a[key] <= 0:
                raise ConfigError(f"annealing.{key}={a[key]!r} must be a positive number")

    def annealing_options(self) -> dict[str, Any]:
        """`annealing` with the target's `levels` and `schedule` where they are None (`TARGET_SCHEDULES`)."""
        a = self.annealing
        return a | {k: v for k, v in TARGET_SCHEDULES.get(a["target"], LADDER).items() if a[k] is None}

    def annealing_levels(self) -> list[Level]:
        """The levels `annealing_options` gives, parsed, least aggressive first."""
        return [Level.parse(x) for x in self.annealing_options()["levels"]]

    def torch_device(self) -> torch.device:
        """The device `device` names (``"auto"`` resolved); `ConfigError` if it is not available here."""
        return resolve_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        """The saved fields (run-time inputs such as `calibration` are left out)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.metadata.get("saved", True)}

    def calibration_prompts(self) -> tuple[list[str], str]:
        """The annealing guard's prompts and where they come from; a bad source raises `PromptError`."""
        from .equivalence import load_prompts

        source = DEFAULT_CALIBRATION if self.calibration is None else self.calibration
        prompts = load_prompts(source, column=self.calibration_column)
        described = "built-in default set" if self.calibration is None else _describe(self.calibration)
        return prompts[: int(self.annealing["calibration_prompts"])], described

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecomposedConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a decomposition config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(repr, set(data) - known))
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(str(err)) from err

    @classmethod
    def from_yaml(cls, path: str | Path) -> DecomposedConfig:
        """Read a recipe; its ``decomposition:`` section if present, else the whole file."""
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, ValueError, OverflowError, RecursionError, yaml.YAMLError) as err:  # PyYAML: OverflowError on a huge \U escape
            raise ConfigError(f"cannot read config {path}: {err}") from err
        if isinstance(data, dict) and "decomposition" in data:
            data = data["decomposition"]
        return cls.from_dict({} if data is None else data)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump({"decomposition": self.to_dict()}, sort_keys=False))


def resolve_device(spec: Any) -> torch.device:
    """``"auto"`` -> the first CUDA device when present, else CPU; ``"cpu"`` / ``"cuda[:N]"`` checked to exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec) if isinstance(spec, str) else None
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={spec!r} is not 'auto', 'cpu', 'cuda' or 'cuda:<index>'")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise ConfigError(f"device={spec!r} is not available: this machine has {have}")
    return device


def _describe(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return f"file {Path(source).name}"
    if isinstance(source, (list, tuple)):
        return f"{len(source)} prompts given"
    return f"{type(source).__name__} ({len(source) if hasattr(source, '__len__') else '?'} rows)"
