"""`hf-decompose demo | decompose | verify | inspect`: parse, call the library, print the summary."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from . import artifact, locks, resume
from .checkpoints import CONFIG_PATTERNS
from .config import ANNEALING, TARGETS, DecomposedConfig
from .decomposed import DecomposedModel
from .equivalence import bound_prompts, check_disjoint, context_length, greedy_generate, load_prompts, verify_equivalence
from .errors import CheckpointError, DecomposeError
from .hub import resolve
from .model import decompose, decompose_to_disk
from .report import summary_table


def _load_reference(path: str | Path):
    """The fine-tune itself (never an artifact) and its tokenizer: what a decomposition is checked against."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()  # in its own dtype, as people run it
    if isinstance(model, DecomposedModel):
        raise DecomposeError(f"{path} is a decomposed artifact: verify against the fine-tune it was made from (--finetuned)")
    return model, AutoTokenizer.from_pretrained(path)


def _bound_early(finetuned: str, prompts: list[str], args: argparse.Namespace) -> None:
    """`bound_prompts` with the fine-tune's tokenizer and config, before the long work."""
    from transformers import AutoConfig, AutoTokenizer

    directory = resolve(finetuned, allow_patterns=CONFIG_PATTERNS)
    try:
        tokenizer, config = AutoTokenizer.from_pretrained(directory), AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{finetuned}: cannot load its tokenizer and config ({err})") from err
    bound_prompts(tokenizer, prompts, args.max_new_tokens, context_length(config), args.max_prompt_tokens)


def _verify_into(model: DecomposedModel, reference, tokenizer, prompts, max_new_tokens: int, batch_size: int, reference_tokens=None,
                 max_prompt_tokens: int | None = None) -> None:
    t0 = time.perf_counter()
    result = verify_equivalence(reference, model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                reference_tokens=reference_tokens, max_prompt_tokens=max_prompt_tokens)
    model.report["equivalence"] = result.to_dict()
    model.report.setdefault("timings", {})["verify_s"] = time.perf_counter() - t0


def _verify_artifact(directory: Path, finetuned: str | Path, prompts: list[str], args: argparse.Namespace, floor_base: str | None = None) -> dict:
    """Load the artifact, check it against the fine-tune `finetuned` on `prompts` (with `floor_base`, the fine-tune's
    own noise floor too), record the result in its report."""
    model = DecomposedModel.from_pretrained(directory)
    reference, tokenizer = _load_reference(resolve(finetuned))
    _verify_into(model, reference, tokenizer, prompts, args.max_new_tokens, args.batch_size, max_prompt_tokens=args.max_prompt_tokens)
    if floor_base is not None:
        model.report["noise_floor"] = _measure_floor(reference, tokenizer, prompts, floor_base, args)
    artifact.update_report(directory, model.report)
    return model.report


def _measure_floor(reference, tokenizer, prompts, base: str | Path, args: argparse.Namespace, reference_tokens=None) -> dict:
    from transformers import AutoModelForCausalLM

    from .floor import noise_floor

    base_model = AutoModelForCausalLM.from_pretrained(resolve(base), dtype=torch.float32).eval()
    return noise_floor(reference, tokenizer, load_prompts(prompts), args.max_new_tokens, args.batch_size, base_model, reference_tokens=reference_tokens)


def cmd_demo(args: argparse.Namespace) -> None:
    from .pair import prepare_default_pair

    t0 = time.perf_counter()
    pair = prepare_default_pair(recipe=args.recipe)
    prepare_s = time.perf_counter() - t0
    check_disjoint(pair.calib_prompts, pair.eval_prompts)
    reference, tokenizer = _load_reference(pair.finetuned)
    reference_tokens = greedy_generate(reference, tokenizer, pair.eval_prompts, args.max_new_tokens, args.batch_size,
                                       max_prompt_tokens=args.max_prompt_tokens)
    out = Path(args.output)
    summary: dict = {}
    floor = None  # measured once, recorded in every mode's report
    for mode in args.modes.split(","):
        config = DecomposedConfig(mode=mode, q=args.q, annealing={"target": args.target},
                                  calibration=pair.calib_prompts if mode == "anneal" else None)
        model = decompose(pair.finetuned, pair.base, config)
        _verify_into(model, reference, tokenizer, pair.eval_prompts, args.max_new_tokens, args.batch_size, reference_tokens, args.max_prompt_tokens)
        floor = floor or _measure_floor(reference, tokenizer, pair.eval_prompts, pair.base, args, reference_tokens)
        model.report["noise_floor"] = floor
        model.report["timings"]["prepare_pair_s"] = prepare_s
        model.save_pretrained(out / mode, overwrite=True)
        print(f"\n== {mode} ==\n{summary_table(model.report)}")
        summary[mode] = model.report
        del model
    first = args.modes.split(",")[0]
    top = dict(summary[first], default_mode=first, modes={m: {k: r[k] for k in ("kept_fraction", "stored_fraction", "size_bytes", "equivalence")} for m, r in summary.items()})
    (out / artifact.REPORT).write_text(json.dumps(top, indent=2, sort_keys=True))
    print(f"\nwrote {out}/ ({', '.join(summary)}) in {time.perf_counter() - t0:.0f} s")


def cmd_decompose(args: argparse.Namespace) -> None:
    with locks.owning(args.output):  # one run per output (and its layer cache), until the artifact is verified and pushed
        _decompose(args)


def _decompose(args: argparse.Namespace) -> None:
    config = DecomposedConfig.from_yaml(args.config) if args.config else DecomposedConfig()
    if args.mode:
        config.mode = args.mode
    if args.target:
        config.annealing["target"] = args.target
        config.validate()
    prompts = load_prompts(args.prompts) if args.prompts else None  # bad inputs fail before the long work
    artifact.shard_bytes(args.max_shard_size)
    if args.calibration:
        config.calibration = args.calibration
    if config.mode == "anneal":
        calibration, _ = config.calibration_prompts()
        if prompts:
            check_disjoint(calibration, prompts)
    if prompts:
        _bound_early(args.finetuned, prompts, args)
    out = artifact.check_target(args.output, args.overwrite)
    partial = None if args.no_resume else out.parent / f".{out.name}.partial"  # finished layers, kept until written
    decompose_to_disk(args.finetuned, args.base, config, output_dir=out, overwrite=args.overwrite, resume_dir=partial,
                      max_shard_size=args.max_shard_size)
    report = _verify_artifact(out, args.finetuned, prompts, args) if prompts else artifact.read_report(out)
    print(summary_table(report))
    if args.push_to_hub:
        from .hub import push_artifact

        commit = push_artifact(out, args.push_to_hub, private=args.private or None)
        print(f"pushed {out} to {commit.commit_url}")


def cmd_verify(args: argparse.Namespace) -> None:
    prompts = load_prompts(args.prompts)  # bad prompts fail before any checkpoint is read
    index = artifact.read_index(args.directory)
    finetuned = args.finetuned or index["finetuned_model"]["id"]
    floor_base = (args.base or index["base_model"]["id"]) if args.floor else None
    print(summary_table(_verify_artifact(Path(args.directory), finetuned, prompts, args, floor_base)))


def cmd_inspect(args: argparse.Namespace) -> None:
    from .figures import write_report

    print(f"wrote {write_report(args.directory, args.output, args.tensors, args.max_blocks)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-decompose", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def generation_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--max-prompt-tokens", type=int, help="truncate longer prompts to this many tokens (with a warning); "
                       "by default a prompt that does not fit the model's context is refused")

    demo = sub.add_parser("demo", help="the main job on the embedded default pair (SmolLM2 + its Shakespeare fine-tune)")
    demo.add_argument("--output", default="out/demo")
    demo.add_argument("--recipe", default=None, help="YAML recipe of the pair (default: recipes/default_pair.yaml)")
    demo.add_argument("--modes", default="anneal", help="comma-separated: anneal, lossless, criterion; the first is the default artifact")
    demo.add_argument("--q", type=float, default=0.05)
    demo.add_argument("--target", choices=TARGETS, default=ANNEALING["target"], help="anneal mode: the equivalence target (exact = lossless, tie, floor)")
    generation_args(demo)
    demo.set_defaults(func=cmd_demo)

    dec = sub.add_parser("decompose", help="decompose FINETUNED against BASE (local dirs or Hub ids)")
    dec.add_argument("base")
    dec.add_argument("finetuned")
    dec.add_argument("--output", required=True)
    dec.add_argument("--config", help="YAML recipe with a `decomposition:` section")
    dec.add_argument("--mode", choices=["lossless", "criterion", "anneal"])
    dec.add_argument("--target", choices=TARGETS, help="anneal mode: the equivalence target (exact = lossless, tie, floor; default tie)")
    dec.add_argument("--calibration", help="anneal mode: calibration prompts (.txt or .jsonl), disjoint from --prompts (default: a built-in set)")
    dec.add_argument("--prompts", help="verify on these prompts (.txt, one per line, or .jsonl)")
    dec.add_argument("--overwrite", action="store_true")
    dec.add_argument("--max-shard-size", default=artifact.MAX_SHARD_SIZE, help="shard weights above this size (default 50GB, the Hub's largest file; e.g. 5GB)")
    dec.add_argument("--no-resume", action="store_true", help="do not cache finished layers in .OUTPUT.partial/ for a re-run")
    dec.add_argument("--push-to-hub", metavar="REPO", help="also upload the artifact, with its model card, to this Hub repo")
    dec.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    generation_args(dec)
    dec.set_defaults(func=cmd_decompose)

    ver = sub.add_parser("verify", help="check an artifact generates what its fine-tune generates")
    ver.add_argument("directory")
    ver.add_argument("--prompts", required=True)
    ver.add_argument("--finetuned", help="the fine-tune to compare against (default: the one recorded)")
    ver.add_argument("--floor", action="store_true", help="also measure the noise floor: the fine-tune in bfloat16, at another batch size / thread count, with its delta in bfloat16")
    ver.add_argument("--base", help="with --floor: the base (default: the one recorded)")
    generation_args(ver)
    ver.set_defaults(func=cmd_verify)

    ins = sub.add_parser("inspect", help="write a report with figures (DIR/report/report.md) for an artifact or a demo output")
    ins.add_argument("directory")
    ins.add_argument("--output", help="report folder (default: DIRECTORY/report)")
    ins.add_argument("--tensors", nargs="*", help="block pictures of the tensors whose names contain these strings")
    ins.add_argument("--max-blocks", type=int, default=3, help="at most this many block pictures")
    ins.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("hf_decompose")
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
        logger.setLevel(logging.INFO)
    try:
        with resume.sigterm_as_exit():  # SIGTERM cleans up temporary files as Ctrl-C does
            args.func(args)
    except DecomposeError as err:
        print(f"hf-decompose: error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
