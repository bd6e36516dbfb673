"""The results as Markdown tables (machine, one table per section with its ratios, the variants) and
the files ``benchmark.json`` + ``benchmark.md``, each written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_tissue_vit.fileio import atomic_write_json, atomic_write_text


def fmt(value: Any) -> str:
    """A table cell: ``n/a`` for None, thousands separators from 100 up, two decimals below."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 100 else f"{value:.2f}"
    return str(value)


def rows_table(rows: dict[str, dict[str, Any]], unit: str, extra: Sequence[str] = ()) -> list[str]:
    """Markdown lines of one table: label, ``extra`` columns, median / min / max and repeats."""
    head = ["what", *extra, f"median {unit}", "min", "max", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for item in rows.values():
        cells = [item["label"], *(fmt(item.get(e, "")) for e in extra)]
        cells += [fmt(item["median"]), fmt(item["min"]), fmt(item["max"]), str(item.get("repeats", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _header(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    shown_settings = {k: v for k, v in results["package_settings"].items() if not k.startswith("bf16_vs")}
    return [
        "# hf_tissue_vit speed benchmark",
        "",
        f"- date: {results['date']}",
        f"- command: `{results['command']}`",
        (
            f"- machine: {m['cpu_model']}, {m['cpu_count']} cores, torch threads {results['settings']['threads']}, "
            f"flags {', '.join(m['cpu_flags']) or 'none'}; load average at start {m['load_average_1_5_15']}, "
            f"end {m.get('load_average_end')}"
        ),
        (
            f"- versions: torch {m['torch']}, transformers {m['transformers']}, datasets {m['datasets']}, "
            f"python {m['python']}"
        ),
        f"- tiles: {results['data_source']}",
        f"- package settings (measured): {json.dumps(shown_settings)}",
        "",
    ]


def _section(name: str, section: dict[str, Any]) -> list[str]:
    out = [f"## {name}: {section['title']}", ""]
    out += rows_table(section["rows"], section["unit"], ("model", "batch_size") if name == "train" else ())
    out += ["", "| ratio (medians) | value | goal | met |", "|---|---|---|---|"]
    for r in section["ratios"]:
        goal = f"≥ {r['goal']}x" if "goal" in r else ""
        met = ("yes" if r["met"] else "no") if "met" in r else ""
        out.append(f"| {r['name']} | {r['ratio']:.2f}x | {goal} | {met} |")
    if name == "infer":
        out += [
            "",
            (
                f"Model: {section['model']} ({section['model_state']}); top-1 agreement TilePredictor vs "
                f"pipeline: {section['top1_agreement_package_vs_pipeline']:.3f}; goals judged on "
                f"`{section['package_setting_for_goals']}`."
            ),
        ]
    return [*out, ""]


def _variants(variants: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    out = ["## variants: " + variants["title"], "", *rows_table(variants["rows"], variants["unit"])]
    for key in ("bf16_vs_fp32", "bf16_vs_fp32_trained"):
        if settings.get(key):
            a = settings[key]
            which = key.replace("bf16_vs_fp32", "").strip("_") or "random-init model"
            out.append(
                f"\nbf16 weights vs fp32 ({which}): "
                f"top-1 agreement {a['top1_agreement']:.3f}, max |Δprob| {a['max_abs_prob_diff']:.4f}"
            )
    return [*out, ""]


def to_markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: machine, one table per section with its ratios, the variants."""
    out = _header(results)
    for name, section in results["sections"].items():
        out += _section(name, section)
    if "variants" in results:
        out += _variants(results["variants"], results["package_settings"])
    out.append(f"Total benchmark time: {results.get('elapsed_seconds')} s ({results.get('section_seconds')}).")
    return "\n".join(out) + "\n"


def write_results(results: dict[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``benchmark.json`` and ``benchmark.md`` into ``output_dir`` (each atomically)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "benchmark.json", "markdown": out / "benchmark.md"}
    atomic_write_json(paths["json"], results, default=str)
    atomic_write_text(paths["markdown"], to_markdown(results))
    return paths
