"""Tables and charts of the "Results" pages, generated from the benchmark outputs in
benchmarks/results/ (the JSON files that `medsr benchmark` and `benchmarks/bench_frontier.py`
write). Rerun a benchmark and rebuild the site: the tables and charts follow.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: names the benchmark outputs use, and what the pages call them
METHOD_LABELS = {
    "today (edsr_lite + averaging)": "in-plane edsr_lite on coronal + sagittal planes, averaged",
    "baseline through-plane": "previous through-plane network (the baseline)",
    "MedSR through-plane": "MedSR through-plane",
    "MedSR adapted": "MedSR through-plane, adapted to the volume",
    "cubic-z": "cubic along z",
}
#: the benchmark pictures shown on the pages: (file under benchmarks/results, site name)
EXAMPLE_IMAGES = (
    ("ct/figure_x2.png", "ct_x2.png"),
    ("ct/figure_x4.png", "ct_x4.png"),
    ("mr/figure_x2.png", "mr_x2.png"),
    ("mr/figure_x4.png", "mr_x4.png"),
    ("xr/figure_x4.png", "xr_x4.png"),
    ("through_plane/sagittal_CT_head-cta-avm_x5.png", "through_plane_ct_x5.png"),
    ("through_plane/sagittal_MR_T1c_subtrMeanDivStd_x5.png", "through_plane_mr_t1c_x5.png"),
    ("through_plane/sagittal_MR_Flair_subtrMeanDivStd_x3.png", "through_plane_mr_flair_x3.png"),
)
#: models drawn in the per-volume bar charts (the default first)
BAR_MODELS = ("edsr_lite", "edsr_multiscale", "fmen", "vdsr", "srcnn")


def _load(results: Path, name: str) -> dict:
    path = results / name
    if not path.is_file():
        raise FileNotFoundError(f"benchmark output missing: {path} (run the command on the page)")
    return json.loads(path.read_text(encoding="utf-8"))


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def command(results: Path, subdir: str) -> str:
    """The command recorded in a benchmark output folder's results.json."""
    return _load(results, f"{subdir}/results.json")["command"]


def gain_table(results: Path, subdir: str) -> str:
    """Mean whole-slice PSNR gain over bicubic, method x scale, with images won / images."""
    data = _load(results, f"{subdir}/results.json")
    scales = list(data["scales"])
    methods: list[str] = []
    for scale in scales:
        for method in data["scales"][scale]["psnr_gain_over_bicubic"]["whole"]:
            if method not in methods:
                methods.append(method)
    lines = ["| model | " + " | ".join(scales) + " |", "|---|" + "---|" * len(scales)]
    for method in methods:
        cells = []
        for scale in scales:
            gain = data["scales"][scale]["psnr_gain_over_bicubic"]["whole"].get(method)
            cells.append("-" if gain is None else
                         f"{gain['psnr_gain_db']:+.2f} dB ({gain['images_better']}/{gain['images']})")
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    inputs = ", ".join(f"`{Path(p).parent.name}/{Path(p).name}`" if "sarcoma" in p or "brats" in p
                       else f"`{Path(p).name}`" for p in data["inputs"])
    return "\n".join(lines) + (f"\n\nImages: {len(data['images'])} slices of {inputs}. "
                               f"Command: `{data['command']}`")


def xr_table(results: Path) -> str:
    data = _load(results, "xr/results.json")
    scale = next(iter(data["scales"]))
    block = data["scales"][scale]
    gains = block["psnr_gain_over_bicubic"]["whole"]
    lines = ["| method | PSNR dB | gain over bicubic | SSIM | MS-SSIM | UQI |", "|---|---|---|---|---|---|"]
    for method, mean in block["mean"].items():
        gain = gains.get(method)
        lines.append("| `{}` | {:.2f} | {} | {:.3f} | {:.3f} | {:.3f} |".format(
            method, mean["psnr_whole"],
            "-" if gain is None else f"{gain['psnr_gain_db']:+.2f} ({gain['images_better']}/{gain['images']})",
            mean["ssim_whole"], mean["ms_ssim_whole"], mean["uqi_whole"]))
    return "\n".join(lines) + f"\n\nCommand: `{data['command']}`"


def frontier_table(results: Path) -> str:
    data = _load(results, "frontier/frontier.json")
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in data["rows"]:
        groups[(row["modality"], row["scale"])].append(row)
    lines = ["| input | on the frontier, fastest first (gain / ms per slice) | default |", "|---|---|---|"]
    for (modality, scale), rows in groups.items():
        front = sorted((r for r in rows if r["frontier"]), key=lambda r: r["ms"])
        default = [r["model"] for r in rows if r["default"]]
        cells = ", ".join(f"`{r['model']}` {r['gain_db']:+.2f} dB / {r['ms']:.0f} ms" for r in front)
        lines.append(f"| {modality} x{scale} | {cells} | `{default[0] if default else '-'}` |")
    return "\n".join(lines) + (
        f"\n\nCPU: {data['cpu']}. Reference in the same rounds: plain torch fp32 `edsr_lite` x2, "
        f"{data['plain_ms']:.0f} ms per slice. Command: `python benchmarks/bench_frontier.py "
        f"--rounds {data['rounds']}`")


def _log_ms_axis(axis) -> None:
    from matplotlib.ticker import FixedLocator, NullFormatter
    axis.set_xscale("log")
    axis.xaxis.set_major_locator(FixedLocator([200, 500, 1000, 2000, 5000, 10000]))
    axis.xaxis.set_major_formatter(plt.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(NullFormatter())


def frontier_chart(results: Path) -> bytes:
    """Gain over bicubic against ms per 512 x 512 slice, one panel per modality, by scale;
    frontier models joined by a line and named, defaults drawn as stars."""
    data = _load(results, "frontier/frontier.json")
    modalities = sorted({r["modality"] for r in data["rows"]})
    fig, axes = plt.subplots(1, len(modalities), figsize=(4.8 * len(modalities), 4.4), squeeze=False)
    colours = {2: "tab:blue", 3: "tab:orange", 4: "tab:green"}
    for axis, modality in zip(axes[0], modalities):
        rows = [r for r in data["rows"] if r["modality"] == modality]
        for scale in sorted({r["scale"] for r in rows}):
            colour = colours.get(scale, "grey")
            group = sorted((r for r in rows if r["scale"] == scale), key=lambda r: r["ms"])
            axis.scatter([r["ms"] for r in group if not r["default"]],
                         [r["gain_db"] for r in group if not r["default"]], s=20, color=colour,
                         alpha=0.55, label=f"x{scale}")
            axis.scatter([r["ms"] for r in group if r["default"]],
                         [r["gain_db"] for r in group if r["default"]], s=110, marker="*",
                         color=colour, edgecolors="black", linewidths=0.6, zorder=3)
            front = [r for r in group if r["frontier"]]
            axis.plot([r["ms"] for r in front], [r["gain_db"] for r in front], "-", color=colour, lw=1.2)
            for i, r in enumerate(front):
                axis.annotate(f"{r['model']} x{scale}", (r["ms"], r["gain_db"]), fontsize=7,
                              xytext=(5, -9 if i % 2 else 4), textcoords="offset points")
        _log_ms_axis(axis)
        axis.set_xlabel("ms per 512 x 512 slice (log scale)")
        axis.set_ylabel("PSNR gain over bicubic, dB")
        axis.set_title(modality)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    fig.suptitle("Speed/quality frontier (stars: the defaults; lines join the models that no "
                 "other model beats on both)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def short_volume_name(volume: str) -> str:
    """A chart label: "STS_012/MR_T1_image" -> "STS_012 MR", BraTS contrasts named as such."""
    name = volume.replace("_subtrMeanDivStd", "")
    if name in ("T1c", "Flair") or name.endswith(("/T1c", "/Flair")):
        return "BraTS " + name.split("/")[-1].replace("Flair", "FLAIR")
    name = name.replace("/MR_T1_image", " MR").replace("/CT_image", " CT")
    return {"brain-t1-gd-skullstripped": "brain T1-Gd", "totalseg-example-ct": "TotalSeg CT",
            "head-cta-avm": "head CTA"}.get(name, name)


def per_volume_gains(results: Path, subdir: str) -> dict[str, dict[str, dict[str, float]]]:
    """{scale: {volume: {method: mean whole-slice PSNR gain over bicubic}}}."""
    data = _load(results, f"{subdir}/results.json")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for scale, block in data["scales"].items():
        sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for image, scores in block["per_image"].items():
            volume = image.split(" z=")[0]
            for method, values in scores.items():
                if method != "bicubic":
                    sums[volume][method].append(values["psnr_whole"] - scores["bicubic"]["psnr_whole"])
        out[scale] = {v: {m: sum(g) / len(g) for m, g in ms.items()} for v, ms in sums.items()}
    return out


def per_volume_chart(results: Path, subdir: str) -> bytes:
    """Grouped bars: per held-out volume, each model's mean gain over bicubic, one panel per scale."""
    gains = per_volume_gains(results, subdir)
    fig, axes = plt.subplots(1, len(gains), figsize=(4.4 * len(gains), 4.0), squeeze=False, sharey=True)
    for axis, (scale, volumes) in zip(axes[0], gains.items()):
        names = list(volumes)
        models = [m for m in BAR_MODELS if any(m in volumes[v] for v in names)]
        width = 0.8 / max(len(models), 1)
        for i, model in enumerate(models):
            axis.bar([j + i * width for j in range(len(names))],
                     [volumes[v].get(model, 0.0) for v in names], width, label=model)
        axis.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
        axis.set_xticklabels([short_volume_name(n) for n in names], fontsize=7, rotation=20)
        axis.set_title(f"{subdir.upper()} {scale}")
        axis.axhline(0, color="black", lw=0.6)
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("PSNR gain over bicubic, dB")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return _png(fig)


def _through_plane_rows(results: Path, subdir: str) -> list[dict]:
    return _load(results, f"{subdir}/results.json")["rows"]


def _through_plane_case_name(case: str, role: str) -> str:
    """A benchmark case as the tables name it: the file (the case folder for the extra crops,
    whose files are all image.nii.gz) and its role unless it is a test volume."""
    path = Path(case)
    name = (path.parent.name if path.name == "image.nii.gz" else path.name).replace("_subtrMeanDivStd", "")
    return name + ("" if role == "test" else f" ({role})")


def through_plane_table(results: Path, subdir: str = "through_plane") -> str:
    rows = _through_plane_rows(results, subdir)
    methods = [m for m in METHOD_LABELS if any(r["method"] == m for r in rows)]
    cases: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        cases[(r["case"], r["role"], r["factor"], r["thickness_ratio"])][r["method"]] = r
    head = ["volume", "factor", "thickness / spacing"] + [METHOD_LABELS[m] for m in methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (case, role, factor, ratio), by_method in cases.items():
        base = by_method["cubic-z"]["psnr"]
        cells = []
        for m in methods:
            r = by_method.get(m)
            if r is None or r["psnr"] is None:
                cells.append("n/a")
            elif m == "cubic-z":
                cells.append(f"{r['psnr']:.2f} / {r['ssim']:.3f}")
            else:
                cells.append(f"{r['psnr']:.2f} ({r['psnr'] - base:+.2f}) / {r['ssim']:.3f}")
        name = _through_plane_case_name(case, role)
        lines.append(f"| {name} | x{factor:g} | {ratio:g} | " + " | ".join(cells) + " |")
    command = _load(results, f"{subdir}/results.json")["command"]
    return "\n".join(lines) + f"\n\nPSNR dB (gain over cubic) / SSIM. Command: `{command}`"


def through_plane_chart(results: Path) -> bytes:
    """Bars: gain over cubic-z per test volume and factor (contiguous box slices)."""
    rows = [r for r in _through_plane_rows(results, "through_plane") if r["thickness_ratio"] == 1.0]
    base = {(r["case"], r["factor"]): r["psnr"] for r in rows if r["method"] == "cubic-z"}
    methods = [m for m in ("today (edsr_lite + averaging)", "baseline through-plane", "MedSR through-plane")
               if any(r["method"] == m for r in rows)]
    keys = list(base)
    fig, axis = plt.subplots(figsize=(9.5, 3.8))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = []
        for key in keys:
            match = [r for r in rows if (r["case"], r["factor"]) == key and r["method"] == method]
            psnr = match[0]["psnr"] if match else None
            values.append(0.0 if psnr is None else psnr - base[key])
        axis.bar([j + i * width for j in range(len(keys))], values, width, label=METHOD_LABELS[method])
    axis.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(keys))])
    role = {r["case"]: r["role"] for r in rows}
    axis.set_xticklabels([f"{short_volume_name(_through_plane_case_name(c, 'test').split('.')[0])}"
                          f"{'' if role[c] == 'test' else ' (' + role[c] + ')'}\nx{f:g}" for c, f in keys],
                         fontsize=6)
    axis.set_ylabel("PSNR gain over cubic-z, dB")
    axis.set_title("Thick slices to thin: gain per volume (x5 is beyond the in-plane path)", fontsize=10)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def images(results: Path) -> dict[str, bytes]:
    """{site file name: PNG bytes}: the generated charts and the benchmark's example pictures."""
    out = {"frontier.png": frontier_chart(results),
           "per_volume_ct.png": per_volume_chart(results, "ct"),
           "per_volume_mr.png": per_volume_chart(results, "mr"),
           "through_plane_gain.png": through_plane_chart(results)}
    for source, name in EXAMPLE_IMAGES:
        path = results / source
        if not path.is_file():
            raise FileNotFoundError(f"benchmark picture missing: {path}")
        out[name] = path.read_bytes()
    return out
