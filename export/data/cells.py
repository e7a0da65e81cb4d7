"""Paint one synthetic field of view: cells, nuclei, microtubules, ER, and a green protein.

The green channel follows the stack's locations, each drawn from the cell geometry the other
channels show (inside the nucleus, along the red microtubules, on the yellow ER, at the
cell outline, as puncta of a typical size and spread...). Several things keep the task from
being trivial: not every cell expresses the protein, strength varies per location and per
cell, look-alike locations differ only in size or placement (peroxisomes, endosomes,
lysosomes; centrosome, MTOC), unspecific background puncta appear in some stacks, and every
stack gets its own focus blur, gain, offset and shot/read noise.

All geometry is in pixels of a 512 x 512 field and scaled with the output size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

Rng = np.random.Generator
Point = tuple[float, float]


@dataclass
class Cell:
    index: int  # 1-based, its value in the label maps
    center: Point
    radius: float
    contour: np.ndarray  # int32 N x 2 polygon
    nucleus: tuple[Point, tuple[float, float], float]  # centre, half-axes, angle (degrees)
    nucleoli: list[tuple[Point, float]] = field(default_factory=list)
    mtoc: Point = (0.0, 0.0)
    mt_ends: list[Point] = field(default_factory=list)
    mitotic: bool = False


@dataclass
class Field:
    size: int
    scale: float
    cells: list[Cell]
    cell_map: np.ndarray  # int16, 0 = background, i = cell i
    nucleus_map: np.ndarray  # int16, same labels, nucleus only
    red: np.ndarray
    yellow: np.ndarray
    blue: np.ndarray

    @property
    def cytoplasm(self) -> np.ndarray:
        return (self.cell_map > 0) & (self.nucleus_map == 0)


# ---------------------------------------------------------------- geometry and markers


def make_field(rng: Rng, size: int, mitotic: bool, crowded: bool) -> Field:
    scale = size / 512.0
    cells = _place_cells(rng, size, scale, crowded)
    cell_map = np.zeros((size, size), np.int16)
    nucleus_map = np.zeros((size, size), np.int16)
    for cell in cells:
        cv2.fillPoly(cell_map, [cell.contour], cell.index)
    for cell in cells:
        (cx, cy), (ax, ay), angle = cell.nucleus
        nucleus = np.zeros((size, size), np.uint8)
        cv2.ellipse(nucleus, _pt((cx, cy)), _pt((ax, ay)), angle, 0, 360, 1, -1)
        nucleus_map[(nucleus > 0) & (cell_map == cell.index)] = cell.index
    if mitotic:
        cells[int(rng.integers(len(cells)))].mitotic = True
    for cell in cells:
        _add_nucleoli(rng, cell, scale)
        cell.mtoc = _mtoc(rng, cell)
    red = _microtubules(rng, cells, cell_map, scale)
    yellow = _er(rng, cell_map, nucleus_map, scale)
    blue = _nuclei(rng, cells, nucleus_map, scale)
    return Field(size, scale, cells, cell_map, nucleus_map, red, yellow, blue)


def _place_cells(rng: Rng, size: int, scale: float, crowded: bool) -> list[Cell]:
    # Crowded fields (needed to show cell junctions) pack more cells that touch and overlap.
    wanted = int(rng.integers(8, 15)) if crowded else int(rng.integers(3, 13))
    spacing = 0.62 if crowded else float(rng.uniform(0.7, 0.95))
    cells: list[Cell] = []
    for _ in range(wanted * 20):
        if len(cells) == wanted:
            break
        radius = float(rng.uniform(38, 68)) * scale
        center = (float(rng.uniform(0, size)), float(rng.uniform(0, size)))
        # Cells may touch (that makes junctions) but not sit on top of each other.
        if any(
            np.hypot(center[0] - c.center[0], center[1] - c.center[1]) < spacing * (radius + c.radius)
            for c in cells
        ):
            continue
        cells.append(_make_cell(rng, len(cells) + 1, center, radius))
    return cells


def _make_cell(rng: Rng, index: int, center: Point, radius: float) -> Cell:
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    wobble = np.ones_like(theta)
    for k in (2, 3, 5):
        wobble += rng.uniform(0, 0.12 if k == 2 else 0.06) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = radius * wobble
    contour = np.stack([center[0] + r * np.cos(theta), center[1] + r * np.sin(theta)], axis=1)
    direction = rng.uniform(0, 2 * np.pi)
    offset = rng.uniform(0, 0.2) * radius
    ncenter = (center[0] + offset * np.cos(direction), center[1] + offset * np.sin(direction))
    axes = (radius * rng.uniform(0.38, 0.5), radius * rng.uniform(0.32, 0.45))
    return Cell(
        index, center, radius, np.rint(contour).astype(np.int32), (ncenter, axes, float(rng.uniform(0, 180)))
    )


def _add_nucleoli(rng: Rng, cell: Cell, scale: float) -> None:
    (cx, cy), (ax, ay), _ = cell.nucleus
    for _ in range(int(rng.integers(1, 5))):
        angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.55)
        point = (cx + dist * ax * np.cos(angle), cy + dist * ay * np.sin(angle))
        cell.nucleoli.append((point, float(rng.uniform(3, 6.5)) * scale))


def _mtoc(rng: Rng, cell: Cell) -> Point:
    (cx, cy), (ax, ay), _ = cell.nucleus
    angle = rng.uniform(0, 2 * np.pi)
    reach = max(ax, ay) + 4 * (cell.radius / 50)
    return (cx + reach * np.cos(angle), cy + reach * np.sin(angle))


def _microtubules(rng: Rng, cells: list[Cell], cell_map: np.ndarray, scale: float) -> np.ndarray:
    red: np.ndarray = np.zeros(cell_map.shape, np.float32)
    for cell in cells:
        layer = np.zeros_like(red)
        points = cell.contour.astype(np.float64)
        for _ in range(int(rng.integers(22, 40))):
            end = points[int(rng.integers(len(points)))]
            end = cell.mtoc + (end - cell.mtoc) * rng.uniform(0.85, 0.98)
            bend = rng.normal(0, 0.15 * cell.radius, 2)
            mid = (np.asarray(cell.mtoc) + end) / 2 + bend
            path = _bezier(np.asarray(cell.mtoc), mid, end)
            cv2.polylines(layer, [path], False, float(rng.uniform(0.5, 1.0)), 1, cv2.LINE_AA)
            cell.mt_ends.append((float(end[0]), float(end[1])))
        red += layer * (cell_map == cell.index)
    red = cv2.GaussianBlur(red, (0, 0), 0.7 * scale + 0.3)
    return red + 0.08 * (cell_map > 0)


def _er(rng: Rng, cell_map: np.ndarray, nucleus_map: np.ndarray, scale: float) -> np.ndarray:
    # Zero crossings of band-passed noise form a net: a fair likeness of the reticular ER.
    noise = rng.standard_normal(cell_map.shape).astype(np.float32)
    band = cv2.GaussianBlur(noise, (0, 0), 2.0 * scale) - cv2.GaussianBlur(noise, (0, 0), 4.0 * scale)
    band /= band.std() + 1e-6
    net = np.exp(-((band / 0.35) ** 2))
    # Denser around the nucleus, fading towards the cell edge.
    nucleus = (nucleus_map > 0).astype(np.uint8)
    distance = cv2.distanceTransform(1 - nucleus, cv2.DIST_L2, 3)
    falloff = np.exp(-distance / (30.0 * scale))
    cytoplasm = ((cell_map > 0) & (nucleus_map == 0)).astype(np.float32)
    return (0.25 + 0.75 * net) * (0.3 + 0.7 * falloff) * cytoplasm


def _nuclei(rng: Rng, cells: list[Cell], nucleus_map: np.ndarray, scale: float) -> np.ndarray:
    texture = _smooth_noise(rng, nucleus_map.shape, 3.0 * scale)
    blue = (nucleus_map > 0) * (0.75 + 0.25 * texture)
    gains = _cell_values(rng, len(cells), 0.6, 1.0)
    blue = blue * gains[nucleus_map]
    for cell in cells:
        for point, radius in cell.nucleoli:  # nucleoli hold little DNA: darker in DAPI
            cv2.circle(blue, _pt(point), max(1, round(radius)), 0.25, -1, cv2.LINE_AA)
        if cell.mitotic:  # condensed chromosomes: a bright metaphase plate instead of a nucleus
            blue[nucleus_map == cell.index] = 0
            (cx, cy), (ax, _), angle = cell.nucleus
            cv2.ellipse(blue, _pt((cx, cy)), _pt((ax * 0.9, 4 * scale)), angle, 0, 360, 1.0, -1)
    return cv2.GaussianBlur(blue.astype(np.float32), (0, 0), 1.0 * scale)


# ---------------------------------------------------------------- green patterns, one per location


def _nucleoplasm(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    texture = _smooth_noise(rng, f.cell_map.shape, 2.0 * f.scale)
    img = (f.nucleus_map > 0) * (0.6 + 0.4 * texture) * gain[f.nucleus_map]
    for cell in f.cells:
        for point, radius in cell.nucleoli:
            cv2.circle(img, _pt(point), max(1, round(radius)), 0.1, -1)
    return img


def _nuclear_membrane(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    img = np.zeros(f.cell_map.shape, np.float32)
    for cell in f.cells:
        (cx, cy), (ax, ay), angle = cell.nucleus
        cv2.ellipse(
            img,
            _pt((cx, cy)),
            _pt((ax, ay)),
            angle,
            0,
            360,
            float(gain[cell.index]),
            max(1, round(2 * f.scale)),
            cv2.LINE_AA,
        )
    return img


def _nucleoli(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    img = np.zeros(f.cell_map.shape, np.float32)
    for cell in f.cells:
        for point, radius in cell.nucleoli:
            cv2.circle(img, _pt(point), max(1, round(radius)), float(gain[cell.index]), -1, cv2.LINE_AA)
    return img


def _fibrillar_center(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    img = np.zeros(f.cell_map.shape, np.float32)
    for cell in f.cells:
        for (x, y), radius in cell.nucleoli:
            for _ in range(int(rng.integers(3, 8))):
                dx, dy = rng.uniform(-0.7, 0.7, 2) * radius
                cv2.circle(img, _pt((x + dx, y + dy)), 1, float(gain[cell.index]), -1, cv2.LINE_AA)
    return img


def _speckles(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    return _puncta(f, rng, gain, "nucleus", (10, 25), (1.8, 3.8), spread=0.0, jagged=True)


def _nuclear_bodies(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    return _puncta(f, rng, gain, "nucleus", (1, 6), (1.2, 2.2), spread=0.0)


def _er_pattern(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    return f.yellow * gain[f.cell_map]


def _golgi(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    img = np.zeros(f.cell_map.shape, np.float32)
    for cell in f.cells:
        mx, my = cell.mtoc
        for _ in range(int(rng.integers(6, 14))):
            dx, dy = rng.normal(0, 4.5 * f.scale, 2)
            cv2.circle(
                img,
                _pt((mx + dx, my + dy)),
                max(1, round(rng.uniform(1.5, 3.5) * f.scale)),
                float(gain[cell.index] * rng.uniform(0.6, 1.0)),
                -1,
                cv2.LINE_AA,
            )
    return img * (f.cell_map > 0)


def _peroxisomes(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    return _puncta(f, rng, gain, "cytoplasm", (30, 70), (0.8, 1.3), spread=0.0)


def _endosomes(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    return _puncta(f, rng, gain, "cytoplasm", (15, 35), (1.4, 2.4), spread=0.6)


def _lysosomes(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    return _puncta(f, rng, gain, "cytoplasm", (8, 20), (2.2, 3.6), spread=0.9, hollow=True)


def _intermediate_filaments(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    img = np.zeros(f.cell_map.shape, np.float32)
    for cell in f.cells:
        (cx, cy), (ax, ay), _ = cell.nucleus
        for _ in range(int(rng.integers(6, 12))):
            start = rng.uniform(0, 2 * np.pi)
            theta = np.linspace(start, start + rng.uniform(1.5, 4.0), 40)
            reach = rng.uniform(1.1, 1.9) + 0.15 * np.sin(3 * theta + rng.uniform(0, 6))
            pts = np.stack([cx + reach * ax * np.cos(theta), cy + reach * ay * np.sin(theta)], 1)
            cv2.polylines(
                img,
                [np.rint(pts).astype(np.int32)],
                False,
                float(gain[cell.index]),
                max(1, round(1.5 * f.scale)),
                cv2.LINE_AA,
            )
    return img * (f.cell_map > 0)


def _actin(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    img = np.zeros(f.cell_map.shape, np.float32)
    for cell in f.cells:
        angle = rng.uniform(0, np.pi)
        direction, normal = (
            np.array([np.cos(angle), np.sin(angle)]),
            np.array([-np.sin(angle), np.cos(angle)]),
        )
        for offset in np.linspace(-cell.radius, cell.radius, int(rng.integers(6, 12))):
            mid = np.asarray(cell.center) + normal * offset
            a, b = mid - direction * cell.radius * 1.2, mid + direction * cell.radius * 1.2
            layer = np.zeros_like(img)
            cv2.line(layer, _pt(a), _pt(b), float(gain[cell.index] * rng.uniform(0.5, 1.0)), 1, cv2.LINE_AA)
            img += layer * (f.cell_map == cell.index)
        cv2.polylines(img, [cell.contour], True, float(gain[cell.index]) * 0.6, 1, cv2.LINE_AA)
    return img


def _focal_adhesions(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    img = np.zeros(f.cell_map.shape, np.float32)
    for cell in f.cells:
        pts = cell.contour.astype(np.float64)
        for _ in range(int(rng.integers(10, 24))):
            edge = pts[int(rng.integers(len(pts)))]
            inward = np.asarray(cell.center) - edge
            inward /= np.linalg.norm(inward) + 1e-6
            a = edge + inward * 3 * f.scale
            b = a + inward * rng.uniform(4, 8) * f.scale
            cv2.line(img, _pt(a), _pt(b), float(gain[cell.index]), max(1, round(1.6 * f.scale)), cv2.LINE_AA)
    return img


def _microtubule_pattern(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    return np.maximum(f.red - 0.08, 0) * gain[f.cell_map]


def _microtubule_ends(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    img = np.zeros(f.cell_map.shape, np.float32)
    for cell in f.cells:
        for end in cell.mt_ends:
            if rng.random() < 0.7:
                cv2.circle(
                    img, _pt(end), max(1, round(1.3 * f.scale)), float(gain[cell.index]), -1, cv2.LINE_AA
                )
    return img


def _cytokinetic_bridge(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    img = np.zeros(f.cell_map.shape, np.float32)
    for cell in f.cells[: max(1, len(f.cells) // 4)]:
        angle = rng.uniform(0, 2 * np.pi)
        direction = np.array([np.cos(angle), np.sin(angle)])
        start = np.asarray(cell.center) + direction * cell.radius * 0.9
        end = start + direction * rng.uniform(14, 26) * f.scale
        cv2.line(img, _pt(start), _pt(end), 1.0, max(1, round(2 * f.scale)), cv2.LINE_AA)
        cv2.circle(img, _pt((start + end) / 2), max(2, round(3 * f.scale)), 1.0, -1, cv2.LINE_AA)
    return img


def _mitotic_spindle(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    img = np.zeros(f.cell_map.shape, np.float32)
    for cell in f.cells:
        if not cell.mitotic:
            continue
        (cx, cy), (ax, _), angle = cell.nucleus
        axis = np.deg2rad(angle + 90)
        direction = np.array([np.cos(axis), np.sin(axis)])
        along = np.array([-direction[1], direction[0]])
        for sign in (-1, 1):
            pole = np.array([cx, cy]) + sign * direction * ax * 1.1
            for t in np.linspace(-0.9, 0.9, 9):
                target = np.array([cx, cy]) + along * ax * t
                cv2.line(img, _pt(pole), _pt(target), 1.0, 1, cv2.LINE_AA)
    return img


def _mtoc_pattern(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    img = np.zeros(f.cell_map.shape, np.float32)
    for cell in f.cells:
        cv2.circle(img, _pt(cell.mtoc), max(2, round(3 * f.scale)), float(gain[cell.index]), -1, cv2.LINE_AA)
    return img


def _centrosome(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    img = np.zeros(f.cell_map.shape, np.float32)
    for cell in f.cells:
        angle = rng.uniform(0, 2 * np.pi)
        d = np.array([np.cos(angle), np.sin(angle)]) * 2.5 * f.scale
        for point in (np.asarray(cell.mtoc) + d, np.asarray(cell.mtoc) - d):
            cv2.circle(
                img, _pt(point), max(1, round(1.4 * f.scale)), float(gain[cell.index]), -1, cv2.LINE_AA
            )
    return img


def _lipid_droplets(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    return _puncta(f, rng, gain, "cytoplasm", (3, 14), (2.5, 5.0), spread=0.0, hollow=True)


def _plasma_membrane(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    img = np.zeros(f.cell_map.shape, np.float32)
    for cell in f.cells:
        cv2.polylines(
            img, [cell.contour], True, float(gain[cell.index]), max(1, round(2 * f.scale)), cv2.LINE_AA
        )
    return img


def _cell_junctions(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    # Pixels of a cell with another cell within 2 px: where neighbouring cells meet.
    cells = f.cell_map.astype(np.float32)
    kernel = np.ones((5, 5), np.uint8)
    highest_near = cv2.dilate(cells, kernel)
    lowest_near = cv2.erode(np.where(cells > 0, cells, np.float32(1e6)), kernel)
    touching = (cells > 0) & ((highest_near > cells) | (lowest_near < cells))
    if not touching.any():  # lone cells: a faint membrane so the label is never invisible
        return _plasma_membrane(f, rng, gain) * 0.35
    return touching * gain[f.cell_map]


def _mitochondria(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    img = np.zeros(f.cell_map.shape, np.float32)
    for cell in f.cells:
        for point in _sample_points(f, rng, cell, "cytoplasm", int(rng.integers(25, 60)), spread=0.5):
            angle = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(5, 12) * f.scale
            bend = rng.normal(0, 2 * f.scale, 2)
            a = np.asarray(point)
            b = a + np.array([np.cos(angle), np.sin(angle)]) * length
            path = _bezier(a, (a + b) / 2 + bend, b)
            cv2.polylines(img, [path], False, float(gain[cell.index] * rng.uniform(0.6, 1.0)), 1, cv2.LINE_AA)
    return img * f.cytoplasm


def _aggresome(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    img = np.zeros(f.cell_map.shape, np.float32)
    for cell in f.cells:
        if rng.random() < 0.6:
            cv2.circle(
                img,
                _pt(cell.mtoc),
                max(3, round(rng.uniform(5, 9) * f.scale)),
                float(gain[cell.index]),
                -1,
                cv2.LINE_AA,
            )
    return img * (f.cell_map > 0)


def _cytosol(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    texture = _smooth_noise(rng, f.cell_map.shape, 3.0 * f.scale)
    return f.cytoplasm * (0.55 + 0.45 * texture) * gain[f.cell_map]


def _cytoplasmic_bodies(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    return _puncta(f, rng, gain, "cytoplasm", (1, 3), (2.2, 3.8), spread=0.0)


def _rods_and_rings(f: Field, rng: Rng, gain: np.ndarray) -> np.ndarray:
    img = np.zeros(f.cell_map.shape, np.float32)
    for cell in f.cells:
        for point in _sample_points(f, rng, cell, "cytoplasm", int(rng.integers(1, 4)), spread=0.0):
            if rng.random() < 0.5:
                angle = rng.uniform(0, np.pi)
                d = np.array([np.cos(angle), np.sin(angle)]) * rng.uniform(4, 7) * f.scale
                cv2.line(
                    img,
                    _pt(np.asarray(point) - d),
                    _pt(np.asarray(point) + d),
                    float(gain[cell.index]),
                    max(1, round(2 * f.scale)),
                    cv2.LINE_AA,
                )
            else:
                cv2.circle(
                    img, _pt(point), max(2, round(3.5 * f.scale)), float(gain[cell.index]), 1, cv2.LINE_AA
                )
    return img


Pattern = Callable[[Field, Rng, np.ndarray], np.ndarray]
PATTERNS: tuple[Pattern, ...] = (
    _nucleoplasm,
    _nuclear_membrane,
    _nucleoli,
    _fibrillar_center,
    _speckles,
    _nuclear_bodies,
    _er_pattern,
    _golgi,
    _peroxisomes,
    _endosomes,
    _lysosomes,
    _intermediate_filaments,
    _actin,
    _focal_adhesions,
    _microtubule_pattern,
    _microtubule_ends,
    _cytokinetic_bridge,
    _mitotic_spindle,
    _mtoc_pattern,
    _centrosome,
    _lipid_droplets,
    _plasma_membrane,
    _cell_junctions,
    _mitochondria,
    _aggresome,
    _cytosol,
    _cytoplasmic_bodies,
    _rods_and_rings,
)


# ---------------------------------------------------------------- putting a stack together


def paint_stack(rng: Rng, labels: tuple[int, ...], size: int = 512, depth: int = 8) -> dict[str, np.ndarray]:
    """Four channels (uint8, or uint16 holding `depth`-bit data) for one field of view."""
    field_ = make_field(rng, size, mitotic=17 in labels, crowded=22 in labels or rng.random() < 0.15)
    expressing = rng.random(len(field_.cells) + 1) < rng.uniform(0.6, 1.0)
    expressing[0] = False
    if not expressing[1:].any():
        expressing[1 + int(rng.integers(len(field_.cells)))] = True
    green = np.zeros((size, size), np.float32)
    for label in labels:
        gain = _cell_values(rng, len(field_.cells), 0.4, 1.0) * expressing * rng.uniform(0.45, 1.0)
        green += PATTERNS[label](field_, rng, gain.astype(np.float32))
    # Exposure is set per protein, as on the microscope: faint small structures are imaged
    # as brightly as a filled compartment, with some spread from stack to stack.
    peak = float(np.percentile(green, 99.9))
    green *= float(rng.uniform(0.5, 1.0)) / max(peak, 0.05)
    if rng.random() < 0.3:  # unspecific antibody background: puncta that mean nothing
        green += 0.35 * _puncta(
            field_, rng, _cell_values(rng, len(field_.cells), 0.2, 0.6), "cell", (3, 12), (1, 3), 0
        )
    green += 0.04 * (field_.cell_map > 0)
    raw = {"red": field_.red, "green": green, "blue": field_.blue, "yellow": field_.yellow}
    return {name: _image(rng, plane, depth) for name, plane in raw.items()}


def _image(rng: Rng, plane: np.ndarray, depth: int) -> np.ndarray:
    """Optics and camera: focus blur, gain, offset, shot and read noise, quantisation."""
    blur = float(rng.uniform(0.4, 2.0)) * plane.shape[0] / 512.0
    signal = cv2.GaussianBlur(plane.astype(np.float32), (0, 0), blur)
    signal = signal * float(rng.uniform(0.35, 0.9)) + float(rng.uniform(0.0, 0.06))
    photons = float(rng.uniform(150, 600))  # photons at full scale: sets the shot noise
    noisy = signal + np.sqrt(np.maximum(signal, 0) / photons) * rng.standard_normal(signal.shape, np.float32)
    noisy += float(rng.uniform(0.004, 0.015)) * rng.standard_normal(signal.shape, np.float32)
    top = float(2**depth - 1)
    dtype = np.uint8 if depth <= 8 else np.uint16
    return np.clip(np.rint(noisy * top), 0, top).astype(dtype)


def _puncta(
    f: Field,
    rng: Rng,
    gain: np.ndarray,
    region: str,
    count: tuple[int, int],
    radius: tuple[float, float],
    spread: float,
    hollow: bool = False,
    jagged: bool = False,
) -> np.ndarray:
    img = np.zeros(f.cell_map.shape, np.float32)
    for cell in f.cells:
        for point in _sample_points(f, rng, cell, region, int(rng.integers(count[0], count[1] + 1)), spread):
            r = max(1, round(rng.uniform(*radius) * f.scale))
            value = float(gain[cell.index] * rng.uniform(0.6, 1.0))
            if jagged:
                axes = (max(1, round(r * rng.uniform(0.8, 1.6))), r)
                cv2.ellipse(img, _pt(point), axes, float(rng.uniform(0, 180)), 0, 360, value, -1, cv2.LINE_AA)
            else:
                cv2.circle(img, _pt(point), r, value, 1 if hollow and r >= 2 else -1, cv2.LINE_AA)
    return img


def _sample_points(f: Field, rng: Rng, cell: Cell, region: str, n: int, spread: float) -> list[Point]:
    """n points inside a cell's nucleus, cytoplasm or whole cell; `spread` > 0 pulls them
    towards the nucleus (perinuclear)."""
    if n <= 0:
        return []
    candidates = np.asarray(cell.center) + rng.uniform(-1, 1, (n * 8, 2)) * cell.radius * 1.3
    if spread > 0:
        (nx, ny), _, _ = cell.nucleus
        candidates = np.asarray((nx, ny)) + (candidates - (nx, ny)) * rng.uniform(1 - spread, 1, (n * 8, 1))
    xy = np.rint(candidates).astype(int)
    inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < f.size) & (xy[:, 1] < f.size)
    xy = xy[inside]
    in_cell = f.cell_map[xy[:, 1], xy[:, 0]] == cell.index
    in_nucleus = f.nucleus_map[xy[:, 1], xy[:, 0]] == cell.index
    keep = {"nucleus": in_nucleus, "cytoplasm": in_cell & ~in_nucleus, "cell": in_cell}[region]
    return [(float(x), float(y)) for x, y in xy[keep][:n]]


def _cell_values(rng: Rng, n_cells: int, low: float, high: float) -> np.ndarray:
    """Per-cell values indexed by label (index 0 = background = 0)."""
    values = np.zeros(n_cells + 1, np.float32)
    values[1:] = rng.uniform(low, high, n_cells)
    return values


def _smooth_noise(rng: Rng, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    noise = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
    return np.clip(noise / (noise.std() + 1e-6) * 0.5 + 0.5, 0, 1)


def _bezier(a: np.ndarray, b: np.ndarray, c: np.ndarray, n: int = 16) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    points = (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t**2 * c
    return np.rint(points).astype(np.int32)


def _pt(p: tuple[float, float] | np.ndarray) -> tuple[int, int]:
    return round(float(p[0])), round(float(p[1]))
