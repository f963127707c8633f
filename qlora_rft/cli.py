"""`qlora-rft` command line: thin wrappers over library functions (every command is callable from Python too).

Bad input (config, paths, data) and file system failures end with a one-line error and exit code 2 (`--debug` shows
the traceback); any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from qlora_rft.errors import UserError
from qlora_rft.models import family_of, preset_names


def _quiet() -> None:
    """Library chatter off: our own progress bars and tables say what is happening."""
    import logging

    import torch

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():  # DeepSpeed (when installed) would announce its CPU fallback on every run
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore")
    for name in ("bitsandbytes", "accelerate", "peft", "datasets", "httpx", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    except ImportError:
        pass


def cmd_train(args) -> None:
    from qlora_rft.config import load_config
    from qlora_rft.trainer import fit

    overrides = [*args.overrides, "train.method=sft"] if args.command == "sft" else args.overrides
    result = fit(load_config(args.config, overrides), resume=args.resume, overwrite=args.overwrite)
    saved = "model" if result.adapter_dir.name == "model" else "adapter"
    if int(os.environ.get("RANK", "0")) == 0:  # under `accelerate launch`, the main process speaks
        print(f"{saved} saved to {result.adapter_dir}; metrics in {result.output_dir / 'metrics.jsonl'}")


def cmd_demo(args) -> None:
    from qlora_rft.demo import run_demo

    run_demo(args.config, args.overrides, out=args.out)


def cmd_eval(args) -> None:
    from qlora_rft.config import load_config
    from qlora_rft.evaluation.runner import run_eval

    run = run_eval(load_config(args.config, args.overrides))
    print(f"predictions in {run.predictions}; metrics in {run.output_dir / 'metrics.json'}")


def cmd_score(args) -> None:
    from rich.console import Console

    from qlora_rft.evaluation.runner import metrics_table, recorded_protocol
    from qlora_rft.evaluation.scoring import score_file, write_metrics
    from qlora_rft.tasks import get_task

    if get_task(args.task).needs_annotations and not args.annotations:
        raise UserError(f"score {args.task} needs --annotations: the COCO- or LVIS-format JSON of the images")
    protocol = args.protocol or recorded_protocol(args.predictions)
    metrics = score_file(args.task, args.predictions, args.annotations, args.classes, protocol)
    out = write_metrics(metrics, args.out, inputs=(args.predictions, *([args.annotations] if args.annotations else [])))
    Console().print(metrics_table(metrics, Path(args.predictions).name))
    print(f"metrics written to {out}")


def cmd_convert_classification(args) -> None:
    from qlora_rft.evaluation.classification_lists import convert

    done = convert(args.pth, args.image_root, args.out, classes=args.classes, problem=args.problem,
                   original_question=args.original_question, skip_missing=args.skip_missing,
                   overwrite=args.overwrite)
    if done.missing:
        print(f"left out {len(done.missing)} entries whose image is not under {args.image_root} "
              f"(first: {done.missing[0]})")
    print(f"wrote {done.rows} rows ({done.classes} classes) to {done.out}")


def cmd_report(args) -> None:
    from qlora_rft.evaluation.report import make_report

    report = make_report(args.run_dir, args.out)
    print(f"report in {report.folder}: {report.summary.name} and {len(report.files)} files")


def cmd_sweep(args) -> None:
    from qlora_rft.sweep import run_sweep

    result = run_sweep(args.config, args.grid, out=args.out, eval_config=args.eval, overrides=args.overrides)
    print(f"results in {result.table}, {result.csv.name} and {result.plot.name}")


def cmd_merge(args) -> None:
    from qlora_rft.export import merge_adapter

    report = merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model written to {report.out} ({report.dtype}, {report.lora_modules} LoRA modules merged)")
    print(f"max |logits(merged) - logits(base + adapter)| = {report.max_abs_diff_merged:.3g}; reloaded with plain "
          f"transformers: {report.max_abs_diff_reloaded:.3g} (tolerance {report.tolerance:.3g})")
    if not report.ok:
        raise UserError("the merged model's logits are outside the tolerance: do not use it")


def cmd_export(args) -> None:
    from qlora_rft.gguf_export import export_gguf

    result = export_gguf(args.base, args.out, quant=args.quant, adapter=args.adapter, overwrite=args.overwrite)
    check = result.check
    sizes = ", ".join(f"{name} ({size / 2**20:.2f} MiB)" for name, size in result.files.items())
    print(f"GGUF written to {result.out}: {sizes}, Modelfile, export_info.json")
    print(f"checked in llama.cpp against the merged model in float32 ({check.image_tokens} image tokens):")
    for c in check.comparisons:
        print(f"  {c.name:<24} max |difference| {c.max_abs_diff:.3g}  (tolerance {c.tolerance:.3g}, "
              f"largest reference value {c.scale:.3g})")
    print(f"  tokenizer                {'same token ids' if check.tokenizer_agrees else 'DIFFERENT token ids'}")
    eps = check.norm_epsilon
    if eps.differs:
        print(f"  llama.cpp computes the RMS norms with epsilon {eps.llama_cpp:g} (the model: {eps.model:g}; it reads "
              f"none from this architecture's file): compared above with the model at that epsilon; the gap alone "
              f"moves these logits by up to {eps.effect:.3g}")
    answers = check.answers
    print(f"  greedy answer, llama.cpp:    {answers.llama_cpp!r}")
    print(f"  greedy answer, transformers: {answers.transformers!r} (first {answers.same_leading_tokens} of "
          f"{answers.tokens} tokens the same)")


def cmd_bench(args) -> None:
    if args.suite:
        from qlora_rft.bench_suite import run_suite

        if not args.out or args.deadline is None:
            raise UserError("bench --suite needs --deadline SECONDS and --out DIR")
        rows = run_suite(args.suite, args.deadline, args.out, presets=args.presets, steps=args.steps)
        done = sum(r.status == "ok" for r in rows)
        print(f"{done} of {len(rows)} cases measured; table in {Path(args.out) / 'results.md'}")
        return
    from qlora_rft.bench import run_bench

    result = run_bench(args.preset, compare=args.compare, steps=args.steps or 3, out=args.out,
                       num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                       sampling_weights=args.sampling_weights, decode=args.decode)
    ours, theirs = result["ours"], result["trl"]
    print(f"step seconds: ours {ours['step_seconds']:.3f}, trl {theirs['step_seconds']:.3f} "
          f"(ratio {result['ratio']:.3f})")


def cmd_tiny_model(args) -> None:
    from qlora_rft.tiny import write_model

    path = write_model(args.out, preset=args.preset, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote a random {args.preset} ({family_of(path).name}) to {path}")


def cmd_env(args) -> None:
    from qlora_rft.environment import report

    text, same = report()
    if not (args.quiet and same):
        print(text)
    if not same:
        raise SystemExit(1)


def cmd_config(args) -> None:
    from qlora_rft.config import describe, load_config

    if args.config is None and not args.overrides:
        print(describe())
        return
    import yaml

    print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")


def build_parser() -> argparse.ArgumentParser:
    from qlora_rft.tasks import TASKS

    parser = argparse.ArgumentParser(prog="qlora-rft", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="GRPO fine-tuning from a YAML config (or train.method=sft)")
    p.add_argument("config", help="YAML file (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=10")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    p.add_argument("--overwrite", action="store_true", help="start afresh, removing a run already in train.output_dir")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("sft", help="the supervised baseline: same base, adapters and data (train.method=sft)")
    p.add_argument("config", help="YAML file (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    p.add_argument("--overwrite", action="store_true", help="start afresh, removing a run already in train.output_dir")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("demo", help="tiny model, synthetic task: warm-up, GRPO, before/after evaluation")
    p.add_argument("overrides", nargs="*", help="section.key=value over configs/tiny_demo.yaml")
    p.add_argument("--config", default=None, help="another config instead of configs/tiny_demo.yaml")
    p.add_argument("--out", default="runs/demo", help="where summary.json and the run go")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("eval", help="greedy evaluation of a base (+ eval.adapter): predictions.jsonl, metrics.json")
    p.add_argument("config", help="YAML file (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. eval.adapter=runs/x/adapter")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("score", help="recompute metrics from a predictions file alone (no model)")
    p.add_argument("task", help=" | ".join(TASKS))
    p.add_argument("--predictions", required=True, help="predictions.jsonl")
    p.add_argument("--annotations", default=None, help="detection: COCO- or LVIS-format JSON")
    p.add_argument("--classes", default=None, help="detection: named set, 'all', or comma-separated names")
    p.add_argument("--protocol", choices=("ours", "paper"), default=None,
                   help="how completions are read (eval.protocol); default: what eval_info.json beside the "
                        "predictions records, else ours")
    p.add_argument("--out", default="metrics.json", help="JSON file to write (an existing folder: metrics.json in it)")
    p.set_defaults(run=cmd_score)

    p = sub.add_parser("convert-classification", help="the original's classification evaluation list (.pth + .txt) "
                       "as a parquet eval set")
    p.add_argument("pth", help="the released <set>.pth: a list of {image path: {'label': ...}} (read weights-only)")
    p.add_argument("--image-root", required=True, help="local folder of the set's images; each path is matched by "
                   "its longest tail found there, down to the file name")
    p.add_argument("--out", required=True, help="parquet file to write (then data.eval=FILE)")
    p.add_argument("--classes", default=None, help="class names in label order, one a line (default: <set>.txt "
                   "beside the .pth)")
    p.add_argument("--problem", default=None, help="the question asked about each image (default: the original's "
                   "for fgvc_aircraft, oxford_flowers, pets, stanford_cars)")
    p.add_argument("--original-question", action="store_true", help="append the original's answer-format lines, "
                   "asking its evaluation question verbatim (default: our think/answer instruction, as in training)")
    p.add_argument("--skip-missing", action="store_true", help="leave out entries whose image is not found "
                   "(default: refuse, naming them)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(run=cmd_convert_classification)

    p = sub.add_parser("report", help="plots and markdown summaries of a run folder (training and evaluations)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="folder to write (default RUN_DIR/report; replaced whole, refused if it "
                   "holds other files than a report's)")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("sweep", help="train and evaluate every combination of a grid; results table and plot")
    p.add_argument("config", help="YAML file (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every setting")
    p.add_argument("--grid", nargs="+", required=True,
                   help="section.key=v1,v2 (several: the cartesian product; a train.seed axis is summarised as "
                        "mean and spread per setting)")
    p.add_argument("--eval", default=None, help="a config whose data/eval settings evaluate each setting")
    p.add_argument("--out", default=None, help="sweep folder (default runs/sweep-CONFIGNAME)")
    p.set_defaults(run=cmd_sweep)

    p = sub.add_parser("merge", help="merge a LoRA adapter into a full-precision copy of the base, verified")
    p.add_argument("--base", required=True, help="the base model folder (or tiny:PRESET)")
    p.add_argument("--adapter", required=True, help="a peft adapter folder (a run's adapter/)")
    p.add_argument("--out", required=True, help="the merged from_pretrained folder to write")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.set_defaults(run=cmd_merge)

    p = sub.add_parser("export", help="export base + adapter (or a merged folder) as GGUF for llama.cpp and "
                                      "Ollama, checked by llama.cpp")
    p.add_argument("--base", required=True, help="the base model folder (or tiny:PRESET), or an already merged one")
    p.add_argument("--adapter", default=None, help="a peft adapter folder to merge first (a run's adapter/)")
    p.add_argument("--format", default="gguf", choices=("gguf",))
    p.add_argument("--quant", default="q8_0", choices=("f16", "bf16", "q8_0", "q4_k_m"),
                   help="the language model's weights (the mmproj file is f16)")
    p.add_argument("--out", required=True, help="the folder to write (model-QUANT.gguf, mmproj-f16.gguf, Modelfile)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("bench", help="time our GRPO step against TRL's GRPOTrainer on identical settings")
    p.add_argument("--preset", default="cpu-small", help=f"one of: {', '.join(preset_names())}")
    p.add_argument("--compare", default="trl")
    p.add_argument("--steps", type=int, default=None, help="measured steps per side, after one warm-up step "
                   "(default 3; a suite's own: 1)")
    p.add_argument("--suite", choices=("gpu", "cpu"), default=None,
                   help="every sampling setting against TRL in one go, within --deadline: gpu (real shapes, "
                   "qwen2-vl-7b first) or cpu (the tiny presets); results.jsonl and results.md in --out DIR")
    p.add_argument("--deadline", type=float, default=None, help="--suite: seconds the whole suite may take")
    p.add_argument("--presets", nargs="+", default=None, help="--suite: only these of its presets")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--sampling-weights", default="auto", help="ours: grpo.sampling_weights "
                   "(auto | adapters | merged | int8 | fp8)")
    p.add_argument("--decode", default="auto", help="ours: grpo.decode (auto | generate | static)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/PRESET-DEVICE.json); with "
                   "--suite a new folder")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("tiny-model", help="write a locally built random from_pretrained folder of a preset")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--preset", default="tiny", help=f"one of: {', '.join(preset_names())}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    p.set_defaults(run=cmd_tiny_model)

    p = sub.add_parser("env", help="which installed packages differ from the versions the tests passed with (exit 1 "
                       "if any does)")
    p.add_argument("--quiet", action="store_true", help="print nothing when none differs")
    p.set_defaults(run=cmd_env)

    p = sub.add_parser("config", help="print every config field with its default and meaning, or a resolved config")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(run=cmd_config)
    return parser


def expected_failure(e: BaseException) -> str | None:
    """The message of a failure the user must act on (bad input, a file system problem, a damaged file); None for
    anything else, a bug, whose traceback must show.

    Library errors caught here are those that reach us without a UserError from the code that knows the file:
    OSError (says which path when it has one), a corrupt safetensors file, a file that is not UTF-8 or not JSON.
    """
    from safetensors import SafetensorError

    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError):
        if e.strerror and e.filename is not None:
            names = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
            return f"{e.strerror}: {names}"
        return _first_line(e)
    if isinstance(e, SafetensorError):
        return f"a safetensors weights file is corrupt or truncated ({_first_line(e)}): copy or download it again"
    if isinstance(e, UnicodeDecodeError):
        return f"a file that should be text is not UTF-8 ({_first_line(e)})"
    if _out_of_memory(e):
        return (f"out of memory ({_first_line(e)[:200]}): lower what one step holds at once (grpo.generation_chunk, "
                "grpo.backward_chunk, grpo.num_generations, grpo.max_completion_length, data.max_pixels, "
                "data.max_prompt_length, eval.batch_size, lora.r) or use a larger device")
    if isinstance(e, json.JSONDecodeError):
        return f"a JSON file is not valid JSON ({_first_line(e)})"
    return None


def _out_of_memory(e: BaseException) -> bool:
    """An allocation the device could not serve: torch's OutOfMemoryError (CUDA), the CPU allocator's failure, or
    Python's MemoryError."""
    import torch

    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        _quiet()
    try:
        args.run(args)
    except Exception as e:
        message = expected_failure(e)
        if args.debug or message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
