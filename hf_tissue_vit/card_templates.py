"""Card templates (model and dataset cards): shipped in the repository's ``model_card/`` and installed as
package data. A base module: :mod:`hf_tissue_vit.data` renders its dataset card with it, and
:mod:`hf_tissue_vit.cards` its model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import CardData, DatasetCard, ModelCard

# An installed package (wheel, non-editable install) carries the templates in ``hf_tissue_vit/templates``
# (setup.py maps ``model_card/*.md`` there); a source checkout reads them from ``model_card/``.
_INSTALLED = Path(__file__).resolve().parent / "templates"
_CHECKOUT = Path(__file__).resolve().parents[1] / "model_card"


def template_path(name: str) -> Path:
    """Path of a card template (e.g. ``"dataset_card.md"``), installed or in the checkout."""
    for folder in (_INSTALLED, _CHECKOUT):
        path = folder / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"card template {name!r} is missing from {_INSTALLED} and {_CHECKOUT}; "
                            "reinstall hf_tissue_vit")


def render_text(template: str, **variables: Any) -> str:
    """Render the Markdown template ``template`` (a part of a card, no metadata) with ``variables``, the
    way ``render_card`` renders a whole card (plain ``jinja2.Template``), runs of blank lines tidied."""
    import re

    import jinja2

    text = jinja2.Template(template_path(template).read_text(encoding="utf-8")).render(**variables)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def render_card(template: str, card_data: CardData, kind: str = "model", **variables: Any) -> ModelCard | DatasetCard:
    """Render the template ``template`` with ``card_data`` as YAML metadata and ``variables`` for Jinja.

    Every variable reaches the template, unknown ones as ``None`` (never Jinja's ``Undefined``, which
    passes ``is not none``), so a template leaves them out with ``{% if x is not none %}``.
    """
    cls = DatasetCard if kind == "dataset" else ModelCard
    return cls.from_template(card_data, template_path=str(template_path(template)), **variables)
