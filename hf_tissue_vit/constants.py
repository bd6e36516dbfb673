"""Facts about the known tile releases (Kather 2016, NCT-CRC-HE) that data, cards and scripts share."""

from __future__ import annotations

# Order fixes the label ids: it is the order of the class folders 01_ ... 06_ in the release.
CLASS_NAMES: list[str] = ["Tumor", "Stroma", "Complex", "Lympho", "Debris", "Mucosa"]
EXTRA_CLASS_NAMES: list[str] = ["Adipose", "Empty"]
ALL_CLASS_NAMES: list[str] = CLASS_NAMES + EXTRA_CLASS_NAMES

# Folder names of the Kather 2016 release, in label order.
KATHER_FOLDERS: dict[str, str] = {
    "01_TUMOR": "Tumor",
    "02_STROMA": "Stroma",
    "03_COMPLEX": "Complex",
    "04_LYMPHO": "Lympho",
    "05_DEBRIS": "Debris",
    "06_MUCOSA": "Mucosa",
    "07_ADIPOSE": "Adipose",
    "08_EMPTY": "Empty",
}

# What each tissue looks like in H&E: hematoxylin stains nuclei blue/purple, eosin stains
# cytoplasm and collagen pink.
CLASS_DESCRIPTIONS: dict[str, str] = {
    "Tumor": "Tumour epithelium: crowded, enlarged, hyperchromatic (dark blue/purple) nuclei in "
    "irregular glands or sheets.",
    "Stroma": "Simple stroma: homogeneous pink (eosin) collagen and smooth muscle with few, "
    "elongated nuclei.",
    "Complex": "Complex stroma: stroma mixed with single tumour cells and/or a few immune cells; "
    "pink background with scattered purple nuclei.",
    "Lympho": "Immune cells / lymphocytes: dense small round dark-blue nuclei with little "
    "cytoplasm.",
    "Debris": "Debris and necrosis, haemorrhage and mucus: pale, fragmented, pink-grey material "
    "with nuclear dust.",
    "Mucosa": "Normal mucosal glands: regular crypts of columnar cells with basal nuclei and "
    "pale mucin-filled goblet cells.",
    "Adipose": "Adipose tissue: large empty (white) fat vacuoles with thin pink membranes.",
    "Empty": "Background: no tissue (glass).",
    # NCT-CRC-HE-100K / CRC-VAL-HE-7K classes (Adipose and Debris as above).
    "Background": "Background: no tissue (glass).",
    "Lymphocytes": "Lymphocytes: dense small round dark-blue nuclei with little cytoplasm.",
    "Mucus": "Mucus: pale blue-grey to light pink, nearly acellular extracellular mucin.",
    "Smooth muscle": "Smooth muscle: pink bundles of spindle cells with elongated, cigar-shaped nuclei.",
    "Normal mucosa": "Normal colon mucosa: regular crypts of columnar cells with basal nuclei and goblet cells.",
    "Cancer-associated stroma": "Cancer-associated stroma: pink desmoplastic collagen with scattered "
    "fibroblast nuclei next to tumour.",
    "Tumor epithelium": "Colorectal adenocarcinoma epithelium: crowded, enlarged, hyperchromatic nuclei in "
    "irregular glands.",
}

TILE_SIZE = 150
# Micrometres per pixel of the Kather 2016 tiles (scanned at 20x): a 150 px tile spans 74 um.
KATHER_MPP = 0.495
IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
# Vendor whole-slide formats (OpenSlide reads them; they are slides, never tiles). Pyramidal TIFFs share
# the plain .tif/.tiff suffix and are told apart by opening them.
WHOLE_SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif", ".dcm")

ZENODO_URL = "https://zenodo.org/records/53169/files/Kather_texture_2016_image_tiles_5000.zip"
ZENODO_MD5 = "0ddbebfc56344752028fda72602aaade"

KATHER_CITATION = (
    "Kather JN, Weis CA, Bianconi F, Melchers SM, Schad LR, Gaiser T, Marx A, Zöllner FG. "
    "Multi-class texture analysis in colorectal cancer histology. Scientific Reports 6, 27988 "
    "(2016). doi:10.1038/srep27988. Data: doi:10.5281/zenodo.53169"
)
# NCT-CRC-HE-100K and CRC-VAL-HE-7K (Kather et al. 2019): 224 px tiles at 0.5 um/px, Macenko-normalised;
# folder code -> the readable class name a dataset keeps, in the release's (alphabetical) label order.
NCT_CLASSES: dict[str, str] = {
    "ADI": "Adipose", "BACK": "Background", "DEB": "Debris", "LYM": "Lymphocytes", "MUC": "Mucus",
    "MUS": "Smooth muscle", "NORM": "Normal mucosa", "STR": "Cancer-associated stroma", "TUM": "Tumor epithelium",
}
NCT_MPP = 0.5
NCT_CITATION = (
    "Kather JN, Krisam J, Charoentong P, Luedde T, Herpel E, Weis CA, Gaiser T, Marx A, Valous NA, Ferber D, "
    "Jansen L, Reyes-Aldasoro CC, Zörnig I, Jäger D, Brenner H, Chang-Claude J, Hoffmeister M, Trautwein C, "
    "Halama N. Predicting survival from colorectal cancer histology slides using deep learning: a retrospective "
    "multicenter study. PLoS Medicine 16(1), e1002730 (2019). doi:10.1371/journal.pmed.1002730. "
    "Data: doi:10.5281/zenodo.1214456"
)
NCT_BIBTEX = """@article{kather2019predicting,
  title   = {Predicting survival from colorectal cancer histology slides using deep learning: A retrospective multicenter study},
  author  = {Kather, Jakob Nikolas and Krisam, Johannes and Charoentong, Pornpimol and Luedde, Tom and Herpel, Esther and Weis, Cleo-Aron and Gaiser, Timo and Marx, Alexander and Valous, Nektarios A. and Ferber, Dyke and others},
  journal = {PLoS Medicine},
  volume  = {16},
  number  = {1},
  pages   = {e1002730},
  year    = {2019},
  doi     = {10.1371/journal.pmed.1002730}
}"""
KATHER_BIBTEX = """@article{kather2016multi,
  title   = {Multi-class texture analysis in colorectal cancer histology},
  author  = {Kather, Jakob Nikolas and Weis, Cleo-Aron and Bianconi, Francesco and Melchers, Susanne M. and Schad, Lothar R. and Gaiser, Timo and Marx, Alexander and Z{\\"o}llner, Frank Gerrit},
  journal = {Scientific Reports},
  volume  = {6},
  pages   = {27988},
  year    = {2016},
  doi     = {10.1038/srep27988}
}"""
VIT_BIBTEX = """@inproceedings{dosovitskiy2021an,
  title     = {An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale},
  author    = {Dosovitskiy, Alexey and Beyer, Lucas and Kolesnikov, Alexander and Weissenborn, Dirk and Zhai, Xiaohua and Unterthiner, Thomas and Dehghani, Mostafa and Minderer, Matthias and Heigold, Georg and Gelly, Sylvain and Uszkoreit, Jakob and Houlsby, Neil},
  booktitle = {International Conference on Learning Representations},
  year      = {2021}
}"""
