"""`qlora-rft bench --suite gpu|cpu --deadline SECONDS --out DIR`: every measurement of the sampling paths in one
command that keeps what it measured.

First a smoke pass: one tiny step in each sampling mode and decoder on the tiny preset, on the suite's device, so a
failure only that device shows comes with its traceback in seconds. Then per preset, in priority order: the model
(real shapes: random weights built in bf16 on the GPU), TRL's GRPOTrainer once, ours in each sampling setting, and
greedy evaluation throughput with each decoder.
Each case is a process of its own with a timeout carved from what is left of the deadline, and is appended to
DIR/results.jsonl the moment it ends; DIR/results.md (the table) is rewritten after every case, so a killed suite
keeps both. A failed case is recorded with its last lines, and the suite goes on.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from qlora_rft.bench import BenchSettings, bandwidth_fraction, bench_settings, device_name, memory_bandwidth, versions
from qlora_rft.errors import UserError

RESULTS, TABLE, HEADER, LOGS = "results.jsonl", "results.md", "suite.json", "logs"
RESERVE = 5.0  # seconds kept back from the deadline to write the table
SMOKE_PRESET = "tiny"
# ours in each sampling setting: (grpo.sampling_weights, grpo.decode), in the order they run per preset
OURS = (("merged", "static"), ("adapters", "generate"), ("int8", "static"), ("fp8", "static"))
# the smoke pass: every sampling mode with every decoder
SMOKE = tuple((w, d) for w in ("adapters", "merged", "int8", "fp8") for d in ("generate", "static"))
EVAL_DECODERS = ("generate", "static")  # greedy evaluation throughput, eval.sampling_weights=auto


@dataclass(frozen=True)
class Suite:
    """What one suite measures."""

    name: str
    presets: tuple[str, ...]  # priority order: the deadline cuts from the end
    num_generations: int
    max_completion_length: int
    steps: int  # measured steps per side, after one warm-up step
    eval_batch: int  # prompts per greedy batch in the evaluation cases (3 batches: the first one a warm-up)
    build_on_device: bool  # real shapes: each preset's random model built on the GPU, deleted after its cases
    min_case_seconds: float  # a case is not started with less time than this left


SUITES = {
    "gpu": Suite("gpu", ("qwen2-vl-7b", "qwen2-vl-2b", "qwen2.5-vl-7b", "qwen3-vl-8b"), num_generations=8,
                 max_completion_length=256, steps=1, eval_batch=16, build_on_device=True, min_case_seconds=45),
    "cpu": Suite("cpu", ("tiny", "qwen2.5-vl-tiny", "qwen3-vl-tiny"), num_generations=4, max_completion_length=8,
                 steps=1, eval_batch=4, build_on_device=False, min_case_seconds=10),
}


@dataclass(frozen=True)
class Case:
    """One process of the suite."""

    kind: str  # smoke | build | trl | ours | eval
    preset: str
    sampling_weights: str = ""  # ours
    decode: str = ""  # ours, eval
    eval_batch: int = 0  # eval

    @property
    def name(self) -> str:
        if self.kind == "ours":
            return f"ours {self.sampling_weights}+{self.decode}"
        return f"eval {self.decode}" if self.kind == "eval" else self.kind


@dataclass
class Row:
    """One line of results.jsonl."""

    case: str
    kind: str
    preset: str
    status: str  # ok | failed | timeout | skipped
    seconds: float  # wall seconds of the case's process
    sampling_weights: str = ""
    decode: str = ""
    result: dict | None = None  # the side's figures (bench.run_side), the smoke checks, the build's folder, the
    # evaluation's throughput
    error: str = ""  # a failure's last lines, or why the case was skipped
    date: str = ""


# ----------------------------------------------------------------------------- the parent


def run_suite(suite: str, deadline: float, out: str | Path, presets: list[str] | None = None,
              steps: int | None = None) -> list[Row]:
    """Run `suite` (gpu | cpu) within `deadline` seconds into `out`; the rows written, in order."""
    import torch

    start = time.monotonic()
    if suite not in SUITES:
        raise UserError(f"bench --suite {suite!r}: choose one of {', '.join(SUITES)}")
    spec = SUITES[suite]
    if presets:
        unknown = [p for p in presets if p not in spec.presets]
        if unknown:
            raise UserError(f"bench --presets: {', '.join(unknown)} not in the {suite} suite "
                            f"({', '.join(spec.presets)})")
        spec = replace(spec, presets=tuple(p for p in spec.presets if p in presets))
    if steps is not None:
        if steps < 1:
            raise UserError("bench --steps must be >= 1")
        spec = replace(spec, steps=steps)
    cuda = torch.cuda.is_available()
    if suite == "gpu" and not cuda:
        raise UserError("bench --suite gpu needs a CUDA device; --suite cpu runs the same cases on the tiny presets")
    if deadline <= RESERVE + spec.min_case_seconds:
        raise UserError(f"bench --deadline {deadline:g}: give the suite more than "
                        f"{RESERVE + spec.min_case_seconds:g} seconds")
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"bench --out {out} is not empty: results.jsonl is appended to, so give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / LOGS).mkdir()
    device = "cuda" if cuda else "cpu"
    # the GPU's name comes from the cases (asking it here would hold a CUDA context in this process all along)
    header = {"suite": suite, "command": _command(suite, deadline, out, presets, steps),
              "device": "a CUDA GPU" if cuda else device_name(False),
              "versions": versions(), "spec": asdict(spec), "started": _now()}
    (out / HEADER).write_text(json.dumps(header, indent=2) + "\n")

    runner = _Runner(out, start, start + deadline - RESERVE, spec.min_case_seconds)
    previous = signal.signal(signal.SIGTERM, _interrupted)  # a terminated suite ends its running case too
    models = Path(tempfile.mkdtemp(prefix="qlora-rft-suite-models-"))  # real shapes: not under DIR (15 GB a 7B)
    try:
        _run_cases(runner, spec, device, models)
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(models, ignore_errors=True)
    write_table(out)
    return runner.rows


def _run_cases(runner: _Runner, spec: Suite, device: str, models: Path) -> None:
    smoke = runner.run(Case("smoke", SMOKE_PRESET), lambda: _smoke_settings(device))
    fp8 = bool(smoke.result and smoke.result.get("fp8"))
    for preset in spec.presets:
        folder = models / preset
        model, built = None, True  # None: the preset's cached model (the CPU sizes)
        if spec.build_on_device:
            model = folder
            built = runner.run(Case("build", preset), lambda: {"preset": preset, "folder": str(folder)}).status == "ok"
        for case in [Case("trl", preset), *(Case("ours", preset, w, d) for w, d in OURS if w != "fp8" or fp8),
                     *(Case("eval", preset, decode=d, eval_batch=spec.eval_batch) for d in EVAL_DECODERS)]:
            if not built:
                runner.record(case, "skipped", 0.0, error="the model could not be built (see the build row)")
                continue
            runner.run(case, lambda c=case: asdict(bench_settings(
                c.preset, spec.steps, num_generations=spec.num_generations,
                max_completion_length=spec.max_completion_length, model_path=model, device=device,
                sampling_weights=c.sampling_weights or "auto", decode=c.decode or "auto")))
        shutil.rmtree(folder, ignore_errors=True)  # the disk holds one real-shape model at a time


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _smoke_settings(device: str) -> dict:
    """The smoke pass's settings: one tiny step, G = 2, 4 tokens, on the suite's device."""
    return asdict(bench_settings(SMOKE_PRESET, steps=1, num_generations=2, max_completion_length=4, device=device))


class _Runner:
    """Runs cases as processes within the deadline, appending each row as it ends."""

    def __init__(self, out: Path, start: float, end: float, min_seconds: float):
        self.out, self.start, self.end, self.min_seconds = out, start, end, min_seconds
        self.rows: list[Row] = []

    def run(self, case: Case, payload) -> Row:
        """Run `case` with the settings `payload()` makes, if the deadline leaves it time enough."""
        if self.end - time.monotonic() < self.min_seconds:
            return self.skip(case)
        start = time.monotonic()
        try:
            settings = payload()
        except Exception as e:  # the data or the settings could not be made: recorded like a failed run
            return self.record(case, "failed", time.monotonic() - start, error=f"{type(e).__name__}: {e}")
        left = self.end - time.monotonic()
        if left < self.min_seconds:
            return self.skip(case)
        print(f"[{self._elapsed():5.0f} s] {case.preset}: {case.name} (up to {left:.0f} s)", flush=True)
        status, result, error = run_case_process(case, settings, self.out, left)
        return self.record(case, status, time.monotonic() - start, result=result, error=error)

    def skip(self, case: Case) -> Row:
        return self.record(case, "skipped", 0.0, error=f"deadline: {max(self.end - time.monotonic(), 0):.0f} s left")

    def record(self, case: Case, status: str, seconds: float, result: dict | None = None, error: str = "") -> Row:
        row = Row(case.name, case.kind, case.preset, status, round(seconds, 2), case.sampling_weights, case.decode,
                  result, error, _now())
        with open(self.out / RESULTS, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        write_table(self.out)
        line = f"[{self._elapsed():5.0f} s] {case.preset}: {case.name}: {status} ({seconds:.0f} s)"
        print(line if status in ("ok", "skipped") else f"{line}\n{_indent(error)}", flush=True)
        return row

    def _elapsed(self) -> float:
        return time.monotonic() - self.start


def run_case_process(case: Case, settings: dict, out: Path, timeout: float) -> tuple[str, dict | None, str]:
    """(status, result, error) of `python -m qlora_rft.bench_suite --case ...` run with a timeout, its whole
    process group killed when the time is up; its output goes to DIR/logs/PRESET-CASE.log."""
    slug = f"{case.preset}-{case.name}".replace(" ", "-").replace("+", "-")
    log = out / LOGS / f"{slug}.log"
    spec = json.dumps({"case": asdict(case), "settings": settings})
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory(prefix=f"qlora-rft-{slug}-") as tmp, open(log, "w", encoding="utf-8") as sink:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "qlora_rft.bench_suite", "--case", spec, "--result", str(result_file),
               "--workdir", str(Path(tmp) / "work")]
        # its own process group (a timeout kills the case's children too), ended with the suite if that is killed
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            code = None
        except BaseException:  # the suite itself interrupted: take the case down with it
            _kill(proc)
            raise
        result = json.loads(result_file.read_text()) if code == 0 and result_file.is_file() else None
    tail = _tail(log)
    if code is None:
        return "timeout", None, f"killed after {timeout:.0f} s\n{tail}"
    if result is None:
        return "failed", None, f"exit {code}\n{tail}"
    checks = result.get("checks") or []
    failed = [c for c in checks if c["status"] != "ok"]
    if failed:  # the smoke pass: every check must pass
        return "failed", result, "\n".join(f"{c['name']}: {c['error']}" for c in failed)
    return "ok", result, ""


def _die_with_parent() -> None:
    """In the case's process before it starts: on Linux, SIGKILL it when the suite's process ends."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _command(suite: str, deadline: float, out: Path, presets: list[str] | None, steps: int | None) -> str:
    parts = ["qlora-rft bench --suite", suite, "--deadline", f"{deadline:g}", "--out", shlex.quote(str(out))]
    if presets:
        parts += ["--presets", *presets]
    if steps is not None:
        parts += ["--steps", str(steps)]
    return " ".join(parts)


# ----------------------------------------------------------------------------- the table


def write_table(out: Path) -> Path:
    """DIR/results.md from suite.json and results.jsonl (what a killed suite wrote, too)."""
    header = json.loads((out / HEADER).read_text())
    rows = read_rows(out)
    device = next((r.result["device"] for r in rows if r.result and r.result.get("device")), header["device"])
    trl = {r.preset: r.result["step_seconds"] for r in rows if r.kind == "trl" and r.status == "ok"}
    memory = next((r.result["peak_memory_kind"] for r in rows if r.result and "peak_memory_kind" in r.result), "")
    lines = [
        f"# Bench suite: {header['suite']}",
        "",
        f"`{header['command']}`, started {header['started']} on {device}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()) + ".",
        f"Settings: G = {header['spec']['num_generations']}, {header['spec']['max_completion_length']} completion "
        f"tokens (EOS ignored), 1 warm-up + {header['spec']['steps']} measured step(s) per side; peak memory is "
        f"{memory or 'per process'}. Ratio: our step seconds over TRL's GRPOTrainer's on the same preset.",
        "",
        "Evaluation rows: greedy batches of the evaluation's prompts through the sampler, EOS ignored; step s is a "
        "batch's, first-step extra the first batch's (compilation), and eval prompts/s excludes it.",
        "",
        "| preset | case | status | ratio to TRL | step s | peak GiB | gen tok/s | bandwidth fraction "
        "| first-step extra s | decode builds / compiles | eval prompts/s | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append("| " + " | ".join([r.preset, r.case, _status(r), *_figures(r, trl.get(r.preset)),
                                         f"{r.seconds:.0f}"]) + " |")
    path = out / TABLE
    path.write_text("\n".join(lines) + "\n")
    return path


def read_rows(out: Path) -> list[Row]:
    """The rows of DIR/results.jsonl; a last line cut by a kill is left out."""
    rows = []
    for line in (out / RESULTS).read_text(encoding="utf-8").splitlines() if (out / RESULTS).exists() else []:
        try:
            rows.append(Row(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue
    return rows


def _status(r: Row) -> str:
    if r.kind == "smoke" and r.result:
        checks = r.result.get("checks", [])
        failed = [c["name"] for c in checks if c["status"] != "ok"]
        return f"{r.status}: {len(checks) - len(failed)}/{len(checks)} checks" + \
            (f" (failed: {', '.join(failed)})" if failed else "")
    if r.status in ("skipped", "timeout", "failed"):
        first = r.error.splitlines()[0] if r.error else ""
        return f"{r.status} ({first[:80]})" if r.status == "skipped" else r.status
    return r.status


def _figures(r: Row, trl_seconds: float | None) -> list[str]:
    """ratio, step s, peak GiB, gen tok/s, bandwidth fraction, first-step extra s, builds / compiles, prompts/s."""
    x = r.result or {}
    if r.kind not in ("trl", "ours", "eval") or r.status != "ok":
        return [""] * 8
    step = x["step_seconds"]
    counters = x.get("decode_counters") or {}
    return [
        f"{step / trl_seconds:.3f}" if r.kind == "ours" and trl_seconds else ("1" if r.kind == "trl" else ""),
        f"{step:.2f}",
        f"{x['peak_memory_bytes'] / 2**30:.2f}",
        f"{x['generation_tokens_per_second']:.0f}",
        f"{x['bandwidth_fraction']:.2f}" if x.get("bandwidth_fraction") is not None else "",
        f"{round(x['step_seconds_all'][0] - step, 1) + 0.0:.1f}",  # + 0.0: never "-0.0"
        f"{counters['decode_builds']} / {counters['decode_compiles']}" if counters else "",
        f"{x['prompts_per_second']:.2f}" if r.kind == "eval" else "",
    ]


# ----------------------------------------------------------------------------- a case, in its own process


def run_case(case: Case, settings: dict, workdir: Path) -> dict:
    """What one case measures (this process is the case's own)."""
    import torch

    cuda = torch.cuda.is_available()
    if case.kind == "build":
        return build(settings["preset"], Path(settings["folder"]), cuda)
    bench = _bench_settings(settings)
    if case.kind == "smoke":
        result = smoke(bench, workdir)
    elif case.kind == "eval":
        result = eval_throughput(bench, case.decode, case.eval_batch, batches=3)
        result["bandwidth_fraction"] = bandwidth_fraction(result, memory_bandwidth(device_name(cuda)))
    else:
        from qlora_rft.bench import run_side

        result = run_side(case.kind, bench, workdir)
        result["bandwidth_fraction"] = bandwidth_fraction(result, memory_bandwidth(device_name(cuda)))
    result["device"] = device_name(cuda)
    return result


def smoke(settings: BenchSettings, workdir: Path) -> dict:
    """One tiny training step in each sampling mode with each decoder (fp8 where the device has it); each failure's
    traceback printed (the case's log) and its last lines kept."""
    import traceback

    import torch

    from qlora_rft.bench import side_ours
    from qlora_rft.sampling.weights import fp8_supported

    fp8 = fp8_supported(torch.device(settings.device))
    runs = [(f"ours {w}+{d}", lambda w=w, d=d: side_ours(replace(settings, sampling_weights=w, decode=d),
                                                          workdir / f"{w}-{d}"))
            for w, d in SMOKE if w != "fp8" or fp8]
    runs += [(f"eval {d}", lambda d=d: eval_throughput(settings, d, batch_size=2, batches=1)) for d in EVAL_DECODERS]
    checks = []
    for name, run in runs:
        start = time.monotonic()
        try:
            run()
            checks.append({"name": name, "status": "ok", "seconds": round(time.monotonic() - start, 2), "error": ""})
        except Exception:
            error = "\n".join(traceback.format_exc().splitlines()[-12:])
            checks.append({"name": name, "status": "failed", "seconds": round(time.monotonic() - start, 2),
                           "error": error})
            print(f"{name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    return {"checks": checks, "fp8": fp8}


def eval_throughput(s: BenchSettings, decode: str, batch_size: int, batches: int) -> dict:
    """Greedy decoding of `batches` batches of the evaluation's prompts (the bench's rows and images) through the
    sampler `qlora-rft eval` makes (eval.decode, eval.sampling_weights=auto), on the base with fresh adapters, EOS
    ignored so every answer is `max_completion_length` tokens. The first batch is a warm-up (compilation)."""
    import torch

    from qlora_rft.bench import peak_memory
    from qlora_rft.config import load_config
    from qlora_rft.data import load_split
    from qlora_rft.model import load_policy
    from qlora_rft.models import family_of
    from qlora_rft.prompts import encode_prompts
    from qlora_rft.sampling import Settings, make_sampler
    from qlora_rft.tasks import get_task

    cfg = load_config(None, [f"model.name_or_path={s.model_path}", "model.mode=qlora", f"model.device={s.device}",
                             "model.gradient_checkpointing=false", f"lora.r={s.lora_r}", f"lora.alpha={s.lora_alpha}",
                             f"eval.decode={decode}", "eval.sampling_weights=auto"])
    task = get_task(s.task)
    rows = load_split(s.data, s.split, task, min_pixels=s.min_pixels, max_pixels=s.max_pixels,
                      factor=family_of(s.model_path).factor).examples[: batch_size * batches]
    cuda = s.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    policy = load_policy(cfg.model, cfg.lora)
    policy.model.eval()
    sampler = make_sampler(cfg.eval, policy)
    settings = Settings(max_new_tokens=s.max_completion_length, do_sample=False,
                        min_new_tokens=s.max_completion_length)
    seconds = []
    with sampler.synced():
        for start in range(0, len(rows), batch_size):
            batch, _ = encode_prompts(sampler.processor, task, rows[start : start + batch_size], s.min_pixels,
                                      s.max_pixels, s.max_prompt_length, sampler.device)
            if cuda:
                torch.cuda.synchronize()
            began = time.perf_counter()
            sampler.greedy(batch, settings)
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - began)
    measured = seconds[1:] or seconds
    step = sum(measured) / len(measured)
    memory, kind = peak_memory()
    return {"step_seconds": step, "step_seconds_all": seconds, "prompts_per_second": batch_size / step,
            "generation_tokens_per_second": batch_size * s.max_completion_length / step,
            "rows_per_decode_step": batch_size, "batch_size": batch_size, "sampling": sampler.describe(),
            "decode_weight_bytes": sampler.describe().get("decode_weight_bytes"),
            "decode_counters": sampler.counters(), "peak_memory_bytes": memory, "peak_memory_kind": kind}


def build(preset: str, folder: Path, cuda: bool) -> dict:
    """The preset's random model written to `folder`: in bf16 on the GPU, or in fp32 on the CPU."""
    import torch

    from qlora_rft.tiny import write_model

    start = time.monotonic()
    write_model(folder, preset, dtype=torch.bfloat16 if cuda else torch.float32, device="cuda" if cuda else "cpu")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"folder": str(folder), "bytes": size, "build_seconds": round(time.monotonic() - start, 2)}


def _bench_settings(raw: dict) -> BenchSettings:
    return BenchSettings(**{**raw, "rewards": tuple(raw["rewards"])})


def main(argv: list[str] | None = None) -> int:
    """`python -m qlora_rft.bench_suite --case JSON --result FILE --workdir DIR`: one case, its result as JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qlora_rft.bench_suite", description=main.__doc__)
    parser.add_argument("--case", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    spec = json.loads(args.case)
    result = run_case(Case(**spec["case"]), spec["settings"], Path(args.workdir))
    Path(args.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
