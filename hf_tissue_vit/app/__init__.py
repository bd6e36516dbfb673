"""The demo app (the ``[app]`` extra): a Gradio UI for a trained tile classifier, and its Hugging Face Space.

* :mod:`.model_info`: what the About tab and the warnings know about the model (from its files).
* :mod:`.handlers`: tile → probabilities + attention overlay; larger image → tissue map and exports.
* :mod:`.exports`: GeoJSON and the class-area table of a tissue map.
* :mod:`.examples`: example tiles from the model's own test split.
* :mod:`.ui`: the ``gr.Blocks`` layout and ``launch`` (imports Gradio).
* :mod:`.space`: writes and pushes a Gradio Space that runs the app on a Hub model.

Only :mod:`.ui` imports Gradio, so the rest works without the extra.
"""
