"""The 28 subcellular locations and the four channels: the one place that defines them.

The order of LOCATIONS is the label index used everywhere (train.csv targets, classifier
outputs, manifest thresholds, MQTT scores), so it must never be re-ordered.
"""

from __future__ import annotations

LOCATIONS: tuple[str, ...] = (
    "Nucleoplasm",
    "Nuclear membrane",
    "Nucleoli",
    "Nucleoli fibrillar center",
    "Nuclear speckles",
    "Nuclear bodies",
    "Endoplasmic reticulum",
    "Golgi apparatus",
    "Peroxisomes",
    "Endosomes",
    "Lysosomes",
    "Intermediate filaments",
    "Actin filaments",
    "Focal adhesion sites",
    "Microtubules",
    "Microtubule ends",
    "Cytokinetic bridge",
    "Mitotic spindle",
    "Microtubule organizing center",
    "Centrosome",
    "Lipid droplets",
    "Plasma membrane",
    "Cell junctions",
    "Mitochondria",
    "Aggresome",
    "Cytosol",
    "Cytoplasmic bodies",
    "Rods & rings",
)
N_LOCATIONS = len(LOCATIONS)

# HPA convention: red = microtubules, green = protein of interest, blue = nucleus, yellow = ER.
CHANNELS: tuple[str, ...] = ("red", "green", "blue", "yellow")

# Stacks per location in the 31,072-stack HPA Kaggle 2018 training set (from its train.csv),
# and how many stacks carry 1..5 labels. Used as priors for synthetic data and for tests of
# stratification; kept here so the numbers have one home.
KAGGLE_LOCATION_COUNTS: tuple[int, ...] = (
    12885,
    1254,
    3621,
    1561,
    1858,
    2513,
    1008,
    2822,
    53,
    45,
    28,
    1093,
    688,
    537,
    1066,
    21,
    530,
    210,
    902,
    1482,
    172,
    3777,
    802,
    2965,
    322,
    8228,
    328,
    11,
)
KAGGLE_LABELS_PER_STACK: tuple[int, ...] = (15126, 12485, 3160, 299, 2)  # 1, 2, 3, 4, 5 labels
KAGGLE_N_STACKS = 31072


def parse_target(text: str) -> tuple[int, ...]:
    """Parse a Kaggle `Target` field ("25 3 0") into sorted unique label indices.

    Raises ValueError with a message fit for a user when the field is empty, not numeric,
    out of 0..27 or repeats a label.
    """
    parts = text.split()
    if not parts:
        raise ValueError("empty target: at least one location index 0..27 is required")
    labels: list[int] = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"target {part!r} is not an integer location index") from None
        if not 0 <= value < N_LOCATIONS:
            raise ValueError(f"target {value} is outside 0..{N_LOCATIONS - 1}")
        if value in labels:
            raise ValueError(f"target {value} appears twice")
        labels.append(value)
    return tuple(sorted(labels))
