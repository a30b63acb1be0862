"""`hf-decompose demo | decompose | verify | inspect`: parse, call the library, print the summary."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from . import artifact, resume
from .config import ANNEALING, TARGETS, DecomposedConfig
from .equivalence import check_disjoint, greedy_generate, load_prompts, verify_equivalence
from .errors import DecomposeError
from .model import DecomposedModel, decompose, decompose_to_disk
from .report import summary_table


def _load_reference(path: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _verify_into(model: DecomposedModel, reference, tokenizer, prompts, max_new_tokens: int, batch_size: int, reference_tokens=None) -> None:
    t0 = time.perf_counter()
    result = verify_equivalence(reference, model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                reference_tokens=reference_tokens)
    model.report["equivalence"] = result.to_dict()
    model.report.setdefault("timings", {})["verify_s"] = time.perf_counter() - t0


def _measure_floor(reference, tokenizer, prompts, base: str | Path, args: argparse.Namespace, reference_tokens=None) -> dict:
    from transformers import AutoModelForCausalLM

    from .floor import noise_floor

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    return noise_floor(reference, tokenizer, load_prompts(prompts), args.max_new_tokens, args.batch_size, base_model, reference_tokens=reference_tokens)


def cmd_demo(args: argparse.Namespace) -> None:
    from .pair import prepare_default_pair

    t0 = time.perf_counter()
    pair = prepare_default_pair(recipe=args.recipe)
    prepare_s = time.perf_counter() - t0
    check_disjoint(pair.calib_prompts, pair.eval_prompts)
    reference, tokenizer = _load_reference(pair.finetuned)
    reference_tokens = greedy_generate(reference, tokenizer, pair.eval_prompts, args.max_new_tokens, args.batch_size)
    out = Path(args.output)
    summary: dict = {}
    floor = None  # measured once, recorded in every mode's report
    for mode in args.modes.split(","):
        config = DecomposedConfig(mode=mode, q=args.q, annealing={"target": args.target})
        model = decompose(pair.finetuned, pair.base, config, calibration=pair.calib_prompts if mode == "anneal" else None)
        _verify_into(model, reference, tokenizer, pair.eval_prompts, args.max_new_tokens, args.batch_size, reference_tokens)
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
    config = DecomposedConfig.from_yaml(args.config) if args.config else DecomposedConfig()
    if args.mode:
        config.mode = args.mode
    if args.target:
        config.annealing["target"] = args.target
        config.validate()
    prompts = load_prompts(args.prompts) if args.prompts else None  # bad inputs fail before the long work
    calibration = load_prompts(args.calibration) if args.calibration else None
    if prompts and calibration:
        check_disjoint(calibration, prompts)
    out = artifact.check_target(args.output, args.overwrite)
    partial = None if args.no_resume else out.parent / f".{out.name}.partial"  # finished layers, kept until saved
    if config.mode == "anneal":
        model = decompose(args.finetuned, args.base, config, resume_dir=partial, calibration=calibration)
        if prompts:
            reference, tokenizer = _load_reference(model.source_dir)
            _verify_into(model, reference, tokenizer, prompts, args.max_new_tokens, args.batch_size)
        model.save_pretrained(out, overwrite=args.overwrite)
        report = model.report
    else:  # no model needed: stream the layers to disk (bounded memory), load the artifact only to verify it
        decompose_to_disk(args.finetuned, args.base, config, output_dir=out, overwrite=args.overwrite, resume_dir=partial)
        report = artifact.read_report(out)
        if prompts:
            model = DecomposedModel.from_pretrained(out)
            reference, tokenizer = _load_reference(model.source_dir)
            _verify_into(model, reference, tokenizer, prompts, args.max_new_tokens, args.batch_size)
            artifact.update_report(out, model.report)
            report = model.report
    print(summary_table(report))
    if args.push_to_hub:
        from .hub import push_artifact

        commit = push_artifact(out, args.push_to_hub, private=args.private or None)
        print(f"pushed {out} to {commit.commit_url}")


def cmd_verify(args: argparse.Namespace) -> None:
    model = DecomposedModel.from_pretrained(args.directory)
    finetuned = args.finetuned or model.index["finetuned_model"]["id"]
    reference, tokenizer = _load_reference(finetuned)
    _verify_into(model, reference, tokenizer, load_prompts(args.prompts), args.max_new_tokens, args.batch_size)
    if args.floor:
        model.report["noise_floor"] = _measure_floor(reference, tokenizer, args.prompts, args.base or model.index["base_model"]["id"], args)
    artifact.update_report(args.directory, model.report)
    print(summary_table(model.report))


def cmd_inspect(args: argparse.Namespace) -> None:
    from .figures import write_report

    print(f"wrote {write_report(args.directory, args.output, args.tensors, args.max_blocks)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-decompose", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def generation_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--batch-size", type=int, default=8)

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
    dec.add_argument("--calibration", help="anneal mode: calibration prompts (.txt or .jsonl), disjoint from --prompts")
    dec.add_argument("--prompts", help="verify on these prompts (.txt, one per line, or .jsonl)")
    dec.add_argument("--overwrite", action="store_true")
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
