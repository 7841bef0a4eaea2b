"""The Markdown, JSON and PNG report of ``tools/reproduce.py`` (kept apart so that it can be re-run
on a saved ``.json`` without training: ``python tools/reproduce_report.py docs/results/NAME.json``)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROUGE, BPB = "eval/rouge_lsum", "eval/bits_per_byte"
ANALYSIS_HEADING = "## Analysis"


def summarise(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """``(setting, method) -> {metric: (mean, std or None, n)}`` over the runs that finished."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["method"]), []).append(row)
    summary = {}
    for key, members in groups.items():
        done = [r for r in members if r["exit"] == 0]
        stats = {"runs": len(members), "failed": len(members) - len(done)}
        for metric in (ROUGE, BPB):
            values = [r[metric] for r in done if r.get(metric) is not None]
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else None
                stats[metric] = (statistics.fmean(values), spread, len(values))
        stats["seconds"] = statistics.fmean(r["seconds"] for r in members)
        summary[key] = stats
    return summary


def _cell(stats: dict, metric: str) -> str:
    if metric not in stats:
        return "n/a"
    mean, spread, _ = stats[metric]
    digits = 3 if metric == BPB else 2
    return f"{mean:.{digits}f}" if spread is None else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def gap_closed(value: float, sft: float, teacher: float) -> float | None:
    """Share of the SFT-to-teacher difference a method closes, in percent (negative: worse than SFT)."""
    if teacher == sft:
        return None
    return 100.0 * (value - sft) / (teacher - sft)


def _difference_cell(difference: tuple | None) -> str:
    if difference is None:
        return "n/a"
    mean, spread, _ = difference
    return f"{mean:+.4f}" if spread is None else f"{mean:+.4f} ± {spread:.4f}"


def _gap_cell(stats: dict, metric: str, sft: dict | None, teacher: dict | None) -> str:
    if sft is None or teacher is None or metric not in stats or metric not in sft or metric not in teacher:
        return "n/a"
    share = gap_closed(stats[metric][0], sft[metric][0], teacher[metric][0])
    return "n/a" if share is None else f"{round(share):+d}%"


def paired_differences(rows: list[dict], metric: str, baseline: str = "sft") -> dict[tuple[str, str], tuple]:
    """``(setting, method) -> (mean, std or None, n)`` of ``method - labeled baseline`` on the same seed.

    Every method sees the same records in the same order for a given seed, so these differences are
    much less noisy than the spread of either method across seeds.
    """
    base = {r["seed"]: r[metric] for r in rows
            if r["setting"] == "labeled" and r["method"] == baseline and r["exit"] == 0 and r.get(metric) is not None}
    groups: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        if row["setting"] == "reference" or row["exit"] != 0 or row.get(metric) is None or row["seed"] not in base:
            continue
        if (row["setting"], row["method"]) != ("labeled", baseline):
            groups.setdefault((row["setting"], row["method"]), []).append(row[metric] - base[row["seed"]])
    return {key: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None, len(v)) for key, v in groups.items()}


def markdown(run: dict, summary: dict, chart_name: str) -> str:
    scale, labels, teacher = run["scale"], run["methods"], run["teacher"]
    sft = summary.get(("labeled", "sft"))
    teacher_row = summary.get(("reference", f"Teacher {teacher}"))
    lines = [f"# Reproduction: {run['name']}", "",
             "Produced by `tools/reproduce.py`; every number below comes from the runs listed in "
             f"`{run['name']}.json`.", "",
             f"Command: `{run['command']}`  ", f"Wall time: {run['wall_minutes']:.1f} min on this machine "
             f"(load average {run['load_average']['start'][0]:.1f} at the start, {run['load_average']['end'][0]:.1f} "
             "at the end; other engineers' jobs shared the 2 cores).", "",
             "## Scale", "",
             f"- Zoo profile `{scale['zoo_profile']}` (fingerprint `{scale.get('zoo_fingerprint', '?')}`, members below), "
             "world size 1 on the CPU, float32.",
             f"- {scale['seeds']} seed(s); {scale['steps']} optimizer steps of {scale['micro_batch']} records "
             f"(lr {scale['lr']:g}, linear warmup then decay as the engine does); the first {scale['train_records']} "
             "records of the bundled DialogSum train sample.",
             f"- Evaluation: the first {scale['eval_records']} records of the bundled DialogSum test sample "
             f"(3 references each), greedy, at most {scale['max_new_tokens']} new tokens, {scale['max_length']} "
             "positions; ROUGE-LSum (best of the references, 0-100) and bits per byte of the first reference.",
             f"- Single-teacher methods and the generated (unlabeled / SeqKD) data use teacher `{teacher}`.", "",
             "| member | vocab | hidden | layers | pretrain steps | tune steps |", "|---|---|---|---|---|---|"]
    for name, spec in scale["zoo_members"].items():
        lines.append(f"| {name} | {spec['vocab_size']} | {spec['hidden_size']} | {spec['num_layers']} | "
                     f"{spec['pretrain_steps']} | {spec['tune_steps']} |")
    lines += ["", "## Results", "",
              "Mean ± sample standard deviation over seeds. Gap closed = (method - SFT) / (teacher - SFT), "
              f"with labeled SFT and teacher `{teacher}`; for bits per byte lower is better, and the same "
              "formula gives a positive share when a method moves towards the teacher. Δ bits/byte vs SFT is "
              "the mean ± std over seeds of (method - labeled SFT) on the same seed (same records, same order).", ""]
    header = ["| setting | method | runs | ROUGE-LSum ↑ | bits/byte ↓ | Δ bits/byte vs SFT | gap closed (ROUGE) | "
              "gap closed (bpb) | s/run |", "|---|---|---|---|---|---|---|---|---|"]
    differences = paired_differences(run["rows"], BPB)
    lines += header
    order = [("reference", r) for r in ["Origin"] + [f"Teacher {t}" for t in ("llama", "qwen", "opt")]]
    order += [(setting, key) for setting, keys in run["plan"].items() for key in keys]
    for setting, key in order:
        stats = summary.get((setting, key))
        if stats is None:
            continue
        name = labels.get(key, key)
        failed = f" ({stats['failed']} failed)" if stats["failed"] else ""
        lines.append(f"| {setting} | {name} | {stats['runs']}{failed} | {_cell(stats, ROUGE)} | {_cell(stats, BPB)} | "
                     f"{_difference_cell(differences.get((setting, key)))} | "
                     f"{_gap_cell(stats, ROUGE, sft, teacher_row)} | {_gap_cell(stats, BPB, sft, teacher_row)} | "
                     f"{stats['seconds']:.0f} |")
    ranked = sorted(((s[ROUGE][0], labels.get(k, k)) for (setting, k), s in summary.items()
                     if setting == "labeled" and ROUGE in s), reverse=True)
    if ranked:
        lines += ["", "Labeled ranking by mean ROUGE-LSum: " + " > ".join(f"{name} ({value:.2f})" for value, name in ranked)]
    lines += ["", f"![ROUGE-LSum and bits per byte per method]({chart_name})", "",
              "## How each method is run", "",
              "- SFT and SeqKD: cross-entropy only: one teacher with ULD at loss weight 0 (`loss.weights: "
              "{uld: 0}`; its forward still runs and costs time). SeqKD trains on the teacher's greedy summaries.",
              "- ULD: position pairing (the ULD rule), `CE + 1.5 ULD`. MinED: DTW pairing, `CE + KL`. "
              "MultiLevelOT: offsets pairing with the named preset.",
              "- 3 teachers: llama, qwen, opt with weights 1/3 each (static) or the engine's softmin of each "
              "teacher's gold CE (dynamic).",
              "- Ablation (default preset, the paper's Table 3): the recipe's `loss.weights` switch terms off "
              "(HAD only = (1.5, 0, 0), HAD + SL = (1.5, 0.15, 0), HAD + SD = (1.5, 0, 7.5e-3), SL + SD = "
              "(0, 0.15, 7.5e-3); HAD + SL + SD is the MLOT (default) row). AD = HAD's absolute difference; "
              "SR / TR = sequence ranking (the paper's) / token ranking (each token sorted on its own, as "
              "ULD; `loss.overrides.ranking: token`); without Tr, k is the smaller of the two vocabularies "
              "instead of 50. Weight probes (not in the paper): SD x100 (7.5e-3 -> 0.75), all three / 3.",
              "- Labeled SeqKD and unlabeled SFT are the same job (CE on the teacher's generations, same seeds); "
              "both rows are listed so that each table is complete, and their equal numbers show that runs are "
              "deterministic per seed."]
    return "\n".join(lines) + "\n"


def chart_panels(run: dict, summary: dict):
    from mlot_ds.eval.chart import Bar, Panel

    labels = run["methods"]
    panels = []
    for metric, title in ((ROUGE, "ROUGE-LSum, labeled (higher is better)"), (BPB, "Bits per byte, labeled (lower is better)")):
        bars = []
        for (setting, key), stats in summary.items():
            if metric not in stats or setting not in ("reference", "labeled"):
                continue
            mean, spread, _ = stats[metric]
            group = 2 if setting == "reference" else (1 if key.startswith(("mlot", "ablation")) else 0)
            bars.append(Bar(_chart_label(labels, key), mean, spread or 0.0, group))
        if bars:
            panels.append(Panel(title, bars, decimals=3 if metric == BPB else 2))
    bars = [Bar(_chart_label(labels, key), mean, spread or 0.0, 1 if key.startswith(("mlot", "ablation")) else 0)
            for (setting, key), (mean, spread, _) in paired_differences(run["rows"], BPB).items() if setting == "labeled"]
    if bars:
        panels.append(Panel("Bits per byte minus SFT, same seed (below 0 is better)", bars, decimals=4))
    return panels


def _chart_label(labels: dict, key: str) -> str:
    return labels.get(key, key).replace("Ablation: ", "").replace("teachers", "T").replace(", ", " ")


def write_report(out_dir: Path, run: dict) -> list[Path]:
    from mlot_ds.eval.chart import write_bar_chart

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(run["rows"])
    json_path, md_path, png_path = (out_dir / f"{run['name']}{suffix}" for suffix in (".json", ".md", ".png"))
    json_path.write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    text = markdown(run, summary, png_path.name)
    if md_path.is_file():
        previous = md_path.read_text(encoding="utf-8")
        if ANALYSIS_HEADING in previous:
            text += "\n" + previous[previous.index(ANALYSIS_HEADING):]
    md_path.write_text(text, encoding="utf-8")
    panels = chart_panels(run, summary)
    written = [md_path, json_path]
    if panels:
        written.append(write_bar_chart(png_path, panels))
    return written


if __name__ == "__main__":
    saved = Path(sys.argv[1])
    for path in write_report(saved.parent, json.loads(saved.read_text(encoding="utf-8"))):
        print(path)
