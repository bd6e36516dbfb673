"""Install with ``pip install -e ".[test]"`` (install ``torch==2.13.0`` first on CPU-only machines)."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="hf_tissue_vit",
    version="0.1.0",
    description="Vision Transformers and pathology backbones for labelled H&E tiles on the Hugging Face stack",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The card templates live in the repository's model_card/ and install as hf_tissue_vit/templates/.
    packages=find_packages(include=["hf_tissue_vit", "hf_tissue_vit.*"]) + ["hf_tissue_vit.templates"],
    package_dir={"hf_tissue_vit.templates": "model_card"},
    package_data={"hf_tissue_vit": ["evaluate_modules/*/*.py"], "hf_tissue_vit.templates": ["*.md"]},
    exclude_package_data={"hf_tissue_vit.templates": ["images/*"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "datasets>=5.0,<6",
        "evaluate>=0.4.6",
        "accelerate>=1.10",
        "huggingface-hub>=2.0,<3",
        "safetensors>=0.5",
        "pillow>=10",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "pyyaml>=6",
        "tqdm>=4.66",
        "tensorboard>=2.15",
    ],
    extras_require={
        "app": ["gradio>=6.31,<7", "setuptools>=70.1"],  # setuptools: push_space.py builds the wheel
        "wsi": ["openslide-python>=1.4", "openslide-bin>=4.0", "tifffile>=2024.1"],
        # timm backbones (TimmWrapper: UNI, Virchow, H-optimus, ...); timm needs torchvision, which needs PyPI's
        # torch of its own release (e.g. torch 2.14.1 + torchvision 0.29.1), not the CPU torch 2.13.0 wheel
        "timm": ["timm>=1.0.15", "torchvision"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "playwright>=1.65", "tifffile>=2024.1", "imagecodecs>=2024.1",
                 "import-linter>=2.1"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "import-linter>=2.1"],
    },
)
