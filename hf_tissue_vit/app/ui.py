"""The Gradio app: a Tile tab, a Larger image tab and an About tab around :class:`handlers.AppModel`.

The event functions here only translate between Gradio values and :mod:`handlers` (errors become
``gr.Error`` messages in the page). API names (for ``gradio_client``): ``/classify_tile``,
``/attention_heads`` and ``/tissue_map``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

import gradio as gr

from ..constants import CLASS_DESCRIPTIONS
from ..fileio import scratch_dir
from ..slides.outputs import class_colours
from ..slides.reader import SLIDE_EXTENSIONS
from .examples import ATTRIBUTION, MOSAIC_NAME, Example, find_examples, make_mosaic
from .handlers import AREA_COLUMNS, AppModel
from .model_info import DISCLAIMER, about_markdown

logger = logging.getLogger(__name__)

# H&E colours; system fonts only, so a closed network or a strict firewall loads the page as fast.
THEME = gr.themes.Soft(primary_hue="pink", secondary_hue="purple", neutral_hue="slate",
                       font=["Helvetica Neue", "Arial", "ui-sans-serif", "system-ui", "sans-serif"],
                       font_mono=["ui-monospace", "Menlo", "Consolas", "monospace"])
CSS = """
.gradio-container {max-width: 1280px !important; margin: auto;}
#header h1 {margin-bottom: 0.1em;}
#disclaimer {background: #fdf2f8; border-left: 4px solid #be185d; padding: 0.4em 0.9em; border-radius: 6px;}
.warning-box {background: #fff7ed; border-left: 4px solid #ea580c; padding: 0.3em 0.9em; border-radius: 6px;}
.small-print {font-size: 0.82em; color: #64748b;}
#tile-verdict h2 {margin: 0.1em 0;}
#tile-view img, #tile-rollout img {width: 100%; height: 100%; object-fit: contain; padding-top: 2.6em;
  box-sizing: border-box;}
"""


# --------------------------------------------------------------------------------------------
# Event functions
# --------------------------------------------------------------------------------------------
UNCERTAIN_MARGIN = 0.15  # runner-up this close to the top class: say the call is uncertain


def _verdict(probabilities: dict[str, float], true_label: str | None = None) -> str:
    """Markdown headline: the predicted class, what it looks like, how sure, and the true class of an example."""
    ranked = sorted(probabilities.items(), key=lambda kv: -kv[1])
    (label, score), (second, second_score) = ranked[0], ranked[1] if len(ranked) > 1 else ("", 0.0)
    lines = [f"## Predicted: {label} ({score:.1%})", CLASS_DESCRIPTIONS.get(label, "")]
    if score - second_score < UNCERTAIN_MARGIN:
        lines.append(f"*Uncertain: {second} is close behind ({second_score:.1%}).*")
    if true_label:
        mark = "matches" if true_label == label else "differs from the prediction"
        lines.append(f"True class of this example tile: **{true_label}** ({mark}).")
    return "\n\n".join(line for line in lines if line)


def _warnings_update(warnings: Sequence[str]) -> dict[str, Any]:
    text = "\n".join(f"⚠️ {w}" for w in warnings)
    return gr.update(value=text, visible=bool(warnings))


def _tile_fn(model: AppModel, examples: Sequence[Example] = ()):
    # Gradio serves an example from its cache under the example's own file name.
    truth = {Path(e.path).name: e.label for e in examples if e.label}

    def classify_tile(path: str | None, mpp: Any):
        """Every class with its probability, the verdict, the tile and its attention-rollout overlay."""
        if not path:
            return None, "", _warnings_update([]), None, None
        try:
            result = model.classify_tile(path, _mpp(mpp))
        except (ValueError, OSError) as err:
            raise gr.Error(str(err)) from err
        verdict = _verdict(result.probabilities, truth.get(Path(path).name))
        return (result.probabilities, verdict, _warnings_update(result.warnings),
                result.tile, result.rollout_overlay)

    return classify_tile


def _heads_fn(model: AppModel):
    def attention_heads(path: str | None):
        """One overlay per head of the last layer (where each head's CLS token attends)."""
        if not path:
            raise gr.Error("Choose a tile first.")
        try:
            return model.head_overlays(path)
        except (ValueError, OSError) as err:
            raise gr.Error(str(err)) from err

    return attention_heads


def _legend(label_names: Sequence[str], fractions: dict[str, Any]) -> str:
    """The map's colours as large swatches with each class's share of the tissue."""
    colours = class_colours(len(label_names))
    items = []
    for name, rgb in zip(label_names, colours):
        hex_colour = "#" + "".join(f"{round(255 * c):02x}" for c in rgb)
        share = fractions["classes"][name]["fraction_of_tissue"]
        items.append(f'<span style="color:{hex_colour}; font-size:1.3em">■</span> {name} {share:.0%}')
    background = fractions["background_windows"] / max(1, fractions["windows"])
    items.append(f"□ not classified (glass/background) {background:.0%} of windows")
    return " &nbsp; ".join(items)


def _map_fn(model: AppModel):
    def tissue_map(path: str | None, window: float | None, overlap: bool, threshold: float, mpp: Any):
        """The tissue map with its legend, the class-area table and the CSV and GeoJSON files."""
        if not path:
            return None, "", _warnings_update([]), None, None
        try:
            result = model.map_image(path, int(window) if window else None, bool(overlap), float(threshold),
                                     _mpp(mpp))
        except (ValueError, OSError) as err:
            raise gr.Error(str(err)) from err
        return (result.overlay_png, _legend(model.label_names, result.fractions), _warnings_update(result.warnings),
                result.table, [result.csv, result.geojson])

    return tissue_map


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------
# (label, µm per pixel); 0 = not known. Typical scanner resolutions per objective.
RESOLUTIONS = [("not known", 0.0), ("40× (about 0.25 µm/px)", 0.25), ("20× (about 0.5 µm/px)", 0.5),
               ("10× (about 1 µm/px)", 1.0), ("5× (about 2 µm/px)", 2.0)]


def _resolution_input(elem_id: str, note: str = "") -> gr.Dropdown:
    """Objective / µm per pixel of the scan; a typed number (µm/px) is accepted too."""
    return gr.Dropdown(RESOLUTIONS, value=0.0, allow_custom_value=True, elem_id=elem_id,
                       label=f"Scan resolution (objective or µm/px), if known{note}")


def _mpp(value: Any) -> float | None:
    """µm/px from the resolution input; None when not known (empty or 0)."""
    if value is None or value == "":
        return None
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"Scan resolution {value!r}: give µm per pixel as a number, e.g. 0.5") from None
    return mpp if mpp > 0 else None


def _tile_tab(model: AppModel, examples: Sequence[Example]) -> None:
    info = model.info
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            tile_in = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                               label="H&E tile: upload, paste or pick an example", elem_id="tile-input", height=300)
            mpp_in = _resolution_input("tile-mpp")
            if examples:
                gr.Examples([[e.path] for e in examples], inputs=[tile_in], examples_per_page=24,
                            label="Example tiles from the model's test split (click one)")
                gr.Markdown(f"Example tiles from the model's test split: {ATTRIBUTION}", elem_classes=["small-print"])
        with gr.Column(scale=3):
            verdict = gr.Markdown(elem_id="tile-verdict")
            warnings = gr.Markdown(visible=False, elem_id="tile-warnings", elem_classes=["warning-box"])
            with gr.Row():
                tile_view = gr.Image(label="The tile as read", interactive=False, format="png", height=260,
                                     elem_id="tile-view")
                rollout = gr.Image(label="Attention rollout (red: most)", interactive=False,
                                   format="png", height=260, elem_id="tile-rollout")
            probs = gr.Label(num_top_classes=len(info.label_names), label="Probability of each class",
                             show_heading=False, elem_id="tile-probs")
            with gr.Accordion("Attention of the last layer's heads", open=False):
                heads_button = gr.Button("Show the heads")
                heads = gr.Gallery(label="Last layer: CLS attention per head", columns=4, height=240,
                                   elem_id="tile-heads")
            gr.Markdown(f"**What the model sees.** {info.preprocessing_text()}", elem_classes=["small-print"])
    gr.on([tile_in.change, mpp_in.change], _tile_fn(model, examples), [tile_in, mpp_in],
          [probs, verdict, warnings, tile_view, rollout], api_name="classify_tile")
    heads_button.click(_heads_fn(model), [tile_in], [heads], api_name="attention_heads")


def _map_tab(model: AppModel, mosaic: str | None) -> None:
    info = model.info
    suffixes = list(SLIDE_EXTENSIONS)  # what scripts/tissue_map.py reads: plain images and whole slides
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            image_in = gr.File(label="A larger H&E image (PNG, TIFF, JPEG) or a whole slide (SVS, NDPI, ...)",
                               file_types=suffixes, type="filepath", elem_id="map-input")
            gr.Markdown("Mapped exactly as `scripts/tissue_map.py` maps it: windows at the model's µm/px where the "
                        "file records its own, tissue found on a low-resolution overview, only windows with tissue "
                        "classified. Whole-slide files need the `[wsi]` extra and must be small enough to upload.",
                        elem_classes=["small-print"])
            window = gr.Number(value=model.default_window, precision=0, minimum=8,
                               label=f"Window in px at the model's µm/px (it was trained on {info.training_text()})")
            overlap = gr.Checkbox(label="Overlapping windows (half-window step: finer map, 4× the time)")
            threshold = gr.Slider(0.05, 1.0, value=0.8, step=0.05,
                                  label="Skip windows with at least this fraction of glass/background")
            mpp_in = _resolution_input("map-mpp", " (else what the file records)")
            run = gr.Button("Make the tissue map", variant="primary", elem_id="map-run")
            if mosaic:
                gr.Examples([[mosaic]], inputs=[image_in], label="Example: a mosaic of the example tiles")
        with gr.Column(scale=3):
            picture = gr.Image(label="Tissue map (class colours over the image)", interactive=False, format="png",
                               height=560, elem_id="map-output")
            legend = gr.Markdown(elem_id="map-legend")
            warnings = gr.Markdown(visible=False, elem_classes=["warning-box"])
            table = gr.Dataframe(headers=AREA_COLUMNS, label="Class areas", interactive=False, elem_id="map-table")
            files = gr.File(label="Downloads: class areas (CSV) and map (GeoJSON, e.g. for QuPath)",
                            file_count="multiple", interactive=False, elem_id="map-files")
    gr.on([image_in.change, run.click], _map_fn(model), [image_in, window, overlap, threshold, mpp_in],
          [picture, legend, warnings, table, files], api_name="tissue_map")


def _class_gallery(examples: Sequence[Example]) -> None:
    """One example tile per class, captioned: what the classes look like."""
    first: dict[str, str] = {}
    for e in examples:
        if e.label and e.label not in first:
            first[e.label] = e.path
    if first:
        gr.Gallery([(path, name) for name, path in first.items()], label="One test tile of each class",
                   columns=len(first), height=220, allow_preview=True, elem_id="about-classes")
        gr.Markdown(f"Example tiles from the model's test split: {ATTRIBUTION}", elem_classes=["small-print"])


def build_app(model: AppModel, examples: Sequence[Example] = (), mosaic: str | None = None) -> gr.Blocks:
    """The app's Blocks for ``model`` (examples and mosaic optional)."""
    info = model.info
    # Uploads and outputs older than 2 h are deleted every hour: a Space runs for weeks.
    with gr.Blocks(title=f"H&E tissue classifier: {info.display_name}", delete_cache=(3600, 7200)) as demo:
        gr.Markdown(f"# H&E colorectal tissue classifier\nModel `{info.display_name}`: {len(info.label_names)} tissue "
                    f"classes ({', '.join(info.label_names)})"
                    f"{', trained on Kather et al. 2016 tiles' if info.data_preset == 'kather2016' else ''}.",
                    elem_id="header")
        gr.Markdown(f"**{DISCLAIMER}**", elem_id="disclaimer")
        with gr.Tabs():
            with gr.Tab("Tile", id="tile"):
                _tile_tab(model, examples)
            with gr.Tab("Larger image", id="map"):
                _map_tab(model, mosaic)
            with gr.Tab("About", id="about"):
                gr.Markdown(about_markdown(info), elem_id="about")
                _class_gallery(examples)
    demo.queue(default_concurrency_limit=1)
    return demo


def create_app(model: str, examples_dir: str | None = None, dataset_dir: str | None = None, device: str | None = None,
               bf16: bool | None = None, n_per_class: int = 2) -> tuple[gr.Blocks, list[str]]:
    """Load ``model``, find example tiles (``examples_dir``, else the test split of ``dataset_dir`` or of
    the dataset the model was trained on, when at hand) and build the app.

    Returns the Blocks and the folders it serves files from (for ``launch(allowed_paths=...)``).
    """
    app_model = AppModel(model, device=device, bf16=bf16)
    work = scratch_dir("hf_tissue_vit_examples_")
    examples = find_examples(app_model.label_names, work, examples_dir,
                             dataset_dir or app_model.info.dataset_dir, n_per_class)
    mosaic = None
    if examples_dir and (Path(examples_dir) / MOSAIC_NAME).is_file():
        mosaic = str(Path(examples_dir) / MOSAIC_NAME)
    elif examples:
        mosaic = make_mosaic(examples, work / MOSAIC_NAME)
    logger.info("%d example tiles%s", len(examples), f", mosaic {mosaic}" if mosaic else "")
    allowed = [str(work)] + ([str(Path(examples_dir).resolve())] if examples_dir else [])
    return build_app(app_model, examples, mosaic), allowed


def launch(demo: gr.Blocks, allowed_paths: Sequence[str] = (), server_name: str | None = "127.0.0.1",
           port: int | None = None, **kwargs: Any) -> Any:
    """``demo.launch`` with the app's theme and CSS. ``server_name=None`` lets Gradio read
    ``GRADIO_SERVER_NAME`` (a Space sets 0.0.0.0 there)."""
    return demo.launch(server_name=server_name, server_port=port, theme=THEME, css=CSS,
                       allowed_paths=list(allowed_paths), show_error=True, **kwargs)
