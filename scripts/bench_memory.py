"""Memory proof: the peak memory of `finetune run lora_sft` against the reference loop and TRL's
SFTTrainer on a model with Llama-3's vocabulary, with gradient checkpointing off and on.

    python scripts/bench_memory.py                     # rows of 2048 and 512 tokens
    python scripts/bench_memory.py --seq-lens 2048 --no-trl --repeats 3
    python scripts/bench_memory.py --smoke             # tiny shapes, for tests
    python scripts/bench_memory.py --summarize WORKDIR # the figures of a run kept with --keep

The model is bench_workload's `llama3_head`: Llama-3's 128,256-token vocabulary and proportions
at hidden 256 and 2 layers, random init, so the LM head and the loss hold most of a step's
memory, as they do for a real 8B model at long rows. Every side trains packed rows of
`seq_len` tokens, micro-batch 1, LoRA r16 on every linear layer, with the kernel plan's
precision, the same model, data, learning rate and checkpointing setting (bench_workload,
bench_runner, bench_reference.py, bench_trl.py). For each row length and checkpointing setting
it runs, each in a fresh process so that no two peaks mix: finetune, the reference loop on
finetune's batches, TRL with its packing, and finetune with the unchunked loss head
(kernels.fused_linear_cross_entropy=off, everything else equal). Peak memory is the process's
peak RSS from wait4 on the CPU, peak allocated device memory on a GPU; tokens/s and the loss at
equal tokens are counted as scripts/bench.py counts them.

`loss_head_mb_saved` is the unchunked run's peak minus finetune's (checkpointing off); the
share of the head's memory that is gone divides it by what the unchunked head holds at its
peak: the fp32 log-softmax it keeps for the backward plus the two gradients of that size the
backward makes (3 x positions x vocabulary x 4 bytes, for the step with the most trained
positions).

Prints a table per setting, the targets of the memory issue, writes the figures to
docs/benchmarks.md (section `memory`, or --doc), and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import bench_report as report
import bench_runner as runner
import bench_workload as workload

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
SIDES = [("ours", "packed"), ("reference", "packed"), ("trl", "packed")]
UNCHUNKED = ["kernels.fused_linear_cross_entropy=off"]
SETTINGS = {"off": False, "on": True}  # gradient checkpointing
PRESETS = {
    "full": workload.Settings(size="llama3_head", max_seq_len=2048, micro_batch_size=1,
                              steps=6, timing_warmup=2, rows=400),
    # For tests of this script: the small model, seconds per side.
    "smoke": workload.Settings(size="small", max_seq_len=64, micro_batch_size=1, steps=3,
                               timing_warmup=1, rows=40),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=_lengths, default=None,
                        help="row lengths, comma-separated (default 2048,512)")
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int, help="steps left out of tokens/s")
    parser.add_argument("--no-trl", action="store_true", help="leave TRL out (its keys: null)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--no-doc", action="store_true", help="do not write the doc")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("--summarize", type=Path, metavar="WORKDIR",
                        help="print and record the figures of the finished runs of a folder "
                             "kept with --keep (also one stopped early), running nothing")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.seq_lens is None:
        args.seq_lens = [64] if args.smoke else [2048, 512]
    return args


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: give row lengths of 16 tokens or more, "
                                         "comma-separated, e.g. 2048,512")
    return lengths


def settings_for(args: argparse.Namespace, seq_len: int) -> workload.Settings:
    changes = {name: value for name, value in (("steps", args.steps),
                                               ("timing_warmup", args.warmup)) if value}
    return replace(PRESETS["smoke" if args.smoke else "full"], max_seq_len=seq_len, **changes)


def trl_missing() -> str | None:
    """Why TRL cannot run here (None: it can). Looked up, not imported: this process stays
    small (see bench_runner.prepare)."""
    if importlib.util.find_spec("trl") is None:
        return "TRL is not installed (pip install -e '.[bench]'): its figures are left out"
    return None


def chunked_available() -> bool:
    """Whether this finetune has the chunked loss head (kernels.fused_linear_cross_entropy)."""
    from finetune.config.kernels import FusedLinearCrossEntropy

    return "chunked" in {member.value for member in FusedLinearCrossEntropy}


def peak_mb(result: report.RunResult, device: str) -> float:
    """Peak memory of one run: allocated device memory on a GPU (the side's own record), the
    process's peak RSS elsewhere."""
    if device != "cuda":
        return result.peak_rss_mb
    if result.side[0] != "ours":
        return result.clock["peak_mem_gb"] * 1024
    path = result.run_dir / "run" / "metrics.jsonl"
    peaks = [json.loads(line).get("peak_mem_gb") for line in path.read_text().splitlines()]
    return max(p for p in peaks if p is not None) * 1024


def head_mb(stats: list[dict], vocab: int) -> float:
    """What the unchunked loss head holds at its peak: 3 fp32 [positions, vocab] tensors for
    the step with the most trained positions (see the module docstring)."""
    return 3 * max(s["trained"] for s in stats) * vocab * 4 / 2**20


def figures(results: list[report.RunResult], unchunked: list[report.RunResult],
            device: str) -> dict:
    """One (row length, checkpointing) cell: medians per side, loss at equal tokens."""
    summary = report.summarize(results)

    def side(who: str) -> dict | None:
        s = summary.get((who, "packed"))
        if s is None:
            return None
        runs = [r for r in results if r.side == (who, "packed")]
        return {"peak_mb": round(statistics.median(peak_mb(r, device) for r in runs), 1),
                "tokens_per_s": round(s.tokens_per_s, 1),
                "loss": round(s.loss_at_budget, 4) if s.loss_at_budget is not None else None}

    cell = {who: side(who) for who, _ in SIDES}
    cell["unchunked"] = ({"peak_mb": round(statistics.median(peak_mb(r, device)
                                                             for r in unchunked), 1)}
                         if unchunked else None)
    return cell


def json_line(cells: dict[int, dict[str, dict]], head: dict[int, float]) -> dict:
    """The JSON line: per checkpointing setting peak_mb, trl_peak_mb, reference_peak_mb,
    tokens_per_s, trl_tokens_per_s (and the ratios) at the longest row length, plus
    loss_head_mb_saved; the other lengths under `by_seq_len`."""

    def get(cell: dict, who: str, key: str) -> float | None:
        return (cell.get(who) or {}).get(key)

    def setting(cell: dict) -> dict:
        out = {"peak_mb": get(cell, "ours", "peak_mb"),
               "trl_peak_mb": get(cell, "trl", "peak_mb"),
               "reference_peak_mb": get(cell, "reference", "peak_mb"),
               "tokens_per_s": get(cell, "ours", "tokens_per_s"),
               "trl_tokens_per_s": get(cell, "trl", "tokens_per_s"),
               "reference_tokens_per_s": get(cell, "reference", "tokens_per_s")}
        out["peak_vs_trl"] = _ratio(out["peak_mb"], out["trl_peak_mb"])
        out["tokens_per_s_vs_trl"] = _ratio(out["tokens_per_s"], out["trl_tokens_per_s"])
        return out

    def length(seq_len: int) -> dict:
        by_setting = cells[seq_len]
        out: dict = {name: setting(cell) for name, cell in by_setting.items()}
        off = by_setting.get("off", {})
        saved = (None if not off.get("unchunked") or not off.get("ours")
                 else round(off["unchunked"]["peak_mb"] - off["ours"]["peak_mb"], 1))
        out["loss_head_mb_saved"] = saved
        out["loss_head_fall"] = _ratio(saved, head.get(seq_len))
        return out

    longest = max(cells)
    line = {"seq_len": longest, **length(longest)}
    line["by_seq_len"] = {str(n): length(n) for n in sorted(cells) if n != longest}
    return line


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def targets(line: dict) -> list[report.Target]:
    """The memory issue's targets at the longest row length."""
    found = []
    for name in ("off", "on"):
        if name in line:
            found.append(report.Target(f"peak memory vs TRL, checkpointing {name}",
                                       line[name]["peak_vs_trl"], 0.5, higher_is_better=False))
            found.append(report.Target(f"real tokens/s vs TRL, checkpointing {name}",
                                       line[name]["tokens_per_s_vs_trl"], 1.0))
    found.append(report.Target("loss-head memory gone (chunked vs unchunked)",
                               line["loss_head_fall"], 0.9))
    return found


def markdown(cells: dict[int, dict[str, dict]]) -> str:
    lines = ["| rows | checkpointing | side | peak memory (MB) | real tokens/s | "
             "train loss at equal tokens |", "|---:|---|---|---:|---:|---:|"]
    names = {"ours": "finetune", "reference": "reference loop", "trl": "TRL SFTTrainer",
             "unchunked": "finetune, unchunked loss head"}
    for seq_len in sorted(cells, reverse=True):
        for setting, cell in cells[seq_len].items():
            for who, figures_ in cell.items():
                if figures_ is None:
                    continue
                speed = figures_.get("tokens_per_s")
                loss = figures_.get("loss")
                lines.append(f"| {seq_len} | {setting} | {names[who]} | "
                             f"{figures_['peak_mb']:,.0f} | "
                             f"{'' if speed is None else f'{speed:,.0f}'} | "
                             f"{'' if loss is None else f'{loss:.4f}'} |")
    return "\n".join(lines)


def doc_section(argv: list[str], cells: dict, line: dict, found: list[report.Target],
                notes: list[str], plan: dict, load: tuple[float, float]) -> str:
    kept, skip = [], False
    for arg in argv:  # without the options that only say where files go
        if skip:
            skip = False
        elif arg in ("--doc", "--keep", "--summarize"):
            skip = True
        elif arg != "--no-doc":
            kept.append(arg)
    command = " ".join(["python", "scripts/bench_memory.py", *kept])
    cores = os.cpu_count() or 1
    shared = ("above the core count: the machine was shared with other jobs, so tokens/s are "
              "noisy; compare the ratios, measured in the same run" if max(load) > cores
              else "at or below the core count")
    lines = [
        "### memory: Llama-3 vocabulary, gradient checkpointing off and on", "",
        f"Measured {datetime.date.today().isoformat()} with `{command}`.", "",
        f"- Device: {plan['hardware']['name']} ({plan['device']}), {cores} cores; precision "
        f"{plan['precision']}, attention {plan['attention']}, optimizer {plan['optimizer']}. "
        f"Load average {load[0]:.1f} at the start, {load[1]:.1f} at the end ({shared}).",
        "- Peak memory: " + ("peak allocated device memory." if plan["device"] == "cuda"
                             else "each process's peak RSS (wait4), model and runtime included."),
        *(f"- {note}" for note in notes), "",
        markdown(cells), "",
        "Targets (longest rows):", "",
        *(f"- {t.line()}" for t in found), "",
        "JSON line:", "", "```json", json.dumps(line), "```",
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, workdir: Path, env: dict[str, str], *, compare_head: bool
        ) -> tuple[dict, dict, dict]:
    """Every run (with `compare_head`, the unchunked loss head's too); returns (cells by row
    length and setting, head MB by row length, plan)."""
    sides = [s for s in SIDES if not (s[0] == "trl" and args.no_trl)]
    settings_names = ["off", "on"] if args.checkpointing == "both" else [args.checkpointing]
    cells: dict[int, dict[str, dict]] = {}
    head: dict[int, float] = {}
    plan: dict = {}
    for seq_len in args.seq_lens:
        base = settings_for(args, seq_len)
        folder = workdir / f"seq{seq_len}"
        print(f"preparing the {base.size} model, data and batches of {seq_len}-token rows in "
              f"{folder}", flush=True)
        prepared = runner.prepare(base, folder, env=env, timeout=args.timeout)
        plan = json.loads((folder / "plan.json").read_text(encoding="utf-8"))["packed"]
        stats = prepared["stats"]
        vocab = workload.model_config(base.size).vocab_size
        head[seq_len] = head_mb(stats["packed"], vocab)
        cells[seq_len] = {}
        for name in settings_names:
            settings = replace(base, gradient_checkpointing=SETTINGS[name])
            # Every side reads the workdir's settings.json: this setting's checkpointing.
            (folder / "settings.json").write_text(json.dumps(settings.to_json()),
                                                  encoding="utf-8")
            results, unchunked = [], []
            for rep, side in runner.run_order(sides, args.repeats):
                result = runner.run_side_retrying(side, settings, folder, rep, stats, env,
                                                  args.timeout, name=f"{side[0]}-{name}")
                _say(seq_len, name, report.SIDE_NAMES[side], result, plan)
                results.append(result)
            if name == "off" and compare_head:
                for rep in range(args.repeats):
                    result = runner.run_side_retrying(
                        ("ours", "packed"), settings, folder, rep, stats, env, args.timeout,
                        extra_overrides=UNCHUNKED, name="ours-unchunked")
                    _say(seq_len, name, "finetune, unchunked loss head", result, plan)
                    unchunked.append(result)
            cells[seq_len][name] = figures(results, unchunked, plan["device"])
    return cells, head, plan


def read_kept(workdir: Path) -> tuple[dict, dict, dict]:
    """`run`'s result from the runs finished in a kept workdir (seq<N>/runs/<side>-<setting>-
    <rep>/, each with launch.json and result.json; a row length or setting without a finished
    run is left out)."""
    cells: dict[int, dict[str, dict]] = {}
    head: dict[int, float] = {}
    plan: dict = {}
    for folder in sorted(workdir.glob("seq*"), key=lambda f: int(f.name[3:])):
        settings = workload.Settings.from_json(
            json.loads((folder / "settings.json").read_text(encoding="utf-8")))
        stats = json.loads((folder / "prepared.json").read_text(encoding="utf-8"))["stats"]
        plan = json.loads((folder / "plan.json").read_text(encoding="utf-8"))["packed"]
        groups: dict[str, list[report.RunResult]] = {}
        for run_dir in sorted((folder / "runs").iterdir()):
            if (run_dir / "launch.json").is_file() and (run_dir / "result.json").is_file():
                name = run_dir.name.rsplit("-", 1)[0].removesuffix("-again")
                groups.setdefault(name, []).append(runner.read_run(run_dir, settings, stats))
        seq_len = int(folder.name[3:])
        vocab = workload.model_config(settings.size).vocab_size
        head[seq_len] = head_mb(stats["packed"], vocab)
        for setting in SETTINGS:
            results = [r for who, _ in SIDES for r in groups.get(f"{who}-{setting}", [])]
            if results:
                unchunked = groups.get("ours-unchunked", []) if setting == "off" else []
                cells.setdefault(seq_len, {})[setting] = figures(results, unchunked,
                                                                 plan["device"])
    return cells, head, plan


def _say(seq_len: int, setting: str, name: str, result: report.RunResult, plan: dict) -> None:
    print(f"{seq_len} tokens, checkpointing {setting}: {name}: peak "
          f"{peak_mb(result, plan['device']):,.0f} MB, {result.tokens_per_s:,.0f} real "
          f"tokens/s", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.summarize:
        cells, head, plan = read_kept(args.summarize)
        kept = args.summarize / "run.json"
        started = json.loads(kept.read_text(encoding="utf-8")) if kept.is_file() else {}
        load = (started.get("load", os.getloadavg()[0]), os.getloadavg()[0])
        return publish(args, started.get("argv", argv), cells, head, plan, load,
                       started.get("notes", []))
    notes = []
    missing = None if args.no_trl else trl_missing()
    if missing:
        print(f"note: {missing}", flush=True)
        notes.append(missing)
        args.no_trl = True
    compare_head = chunked_available()
    if not compare_head:
        notes.append("this finetune has no chunked loss head: its loss head is the unchunked "
                     "one, so loss_head_mb_saved is not measured")
    env = runner.side_environment(os.environ, "passive")
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="finetune-bench-memory-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "run.json").write_text(json.dumps(
            {"argv": argv, "load": load_start, "notes": notes}), encoding="utf-8")
        cells, head, plan = run(args, workdir, env, compare_head=compare_head)
    load = (load_start, os.getloadavg()[0])
    return publish(args, argv, cells, head, plan, load, notes)


def publish(args: argparse.Namespace, argv: list[str], cells: dict, head: dict, plan: dict,
            load: tuple[float, float], notes: list[str]) -> int:
    """Print the table and the targets, update the doc, print the JSON line last."""
    line = json_line(cells, head)
    found = targets(line)
    print(markdown(cells))
    for target in found:
        print(target.line())
    if not args.no_doc:
        doc = args.doc.read_text(encoding="utf-8") if args.doc.is_file() else ""
        section = doc_section(argv, cells, line, found, notes, plan, load)
        args.doc.write_text(report.replace_section(doc, "memory", section), encoding="utf-8")
        print(f"wrote the memory section of {args.doc}")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
