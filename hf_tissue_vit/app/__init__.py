"""The demo app (the ``[app]`` extra): a Gradio UI for a trained tile classifier, and its Hugging Face Space.

* :mod:`.model_info`: what the About tab and the warnings know about the model (from its files).
* :mod:`.handlers`: tile → probabilities + attention overlay; larger image or whole slide → tissue map,
  class areas, CSV and GeoJSON, through :mod:`hf_tissue_vit.slides` (the files scripts/tissue_map.py writes).
* :mod:`.examples`: example tiles from the model's own test split.
* :mod:`.ui`: the ``gr.Blocks`` layout and ``launch`` (imports Gradio).
* :mod:`.space`: writes and pushes a Gradio Space that runs the app on a Hub model.

Only :mod:`.ui` imports Gradio, so the rest works without the extra.
"""
