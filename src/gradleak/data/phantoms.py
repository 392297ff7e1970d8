"""Synthetic chest radiograph phantoms: the built-in default data set.

Every image is a frontal (PA) chest radiograph drawn from scratch, at the requested size, from
``(seed, patient, image)``: nothing is stored and any image can be drawn on its own. The picture is built
as an X-ray is: a map of attenuation (soft tissue, air in the lungs, bone) is turned into brightness with
``1 - exp(-mu * density)``, so air outside the body is black, the lungs are dark, soft tissue is grey and
bone, heart and mediastinum are bright. The image's right side is the patient's left, as on a PA film,
so the heart bulges to the image's right.

Anatomy (body and lung shape, heart size, rib spacing, ...) belongs to the patient and is the same in all
their images; each image adds a small change of pose (rotation, shift, scale), exposure, contrast and film
grain. Class 1 ("pneumonia") patients carry consolidation: fuzzy, patchy opacities in one lung (lobar or
patchy, sometimes in both lungs), of varying size and density, sometimes faint. A patient's class is
fixed. Geometry lives in normalised coordinates (x to the image's right, y down, both in [-1, 1]); edges
are smooth at about one pixel and periodic structures (ribs, vertebrae, lung texture) are low-pass
filtered at the pixel scale, so small renderings are anti-aliased rather than jagged.

Random streams (numpy ``default_rng`` on a tuple that starts with a fixed tag, the seed and a stream
kind): the patient's anatomy ``(tag, seed, 1, patient)``, the image's pose and noise
``(tag, seed, 2, patient, image)``, the class assignment ``(tag, seed, 3, block)``, the patient's
opacities ``(tag, seed, 4, patient)``. Each stream kind has a fixed tuple length, which matters because
numpy's SeedSequence treats trailing zero words as absent.
"""

from __future__ import annotations

import math

import numpy as np

from gradleak.data.base import ImageDataset
from gradleak.errors import UserError

_TAG = 0x67726C6B  # "grlk"
_BLOCK = 8  # patients per class-balancing block
MIN_SIZE, MAX_SIZE = 16, 512
CLASSES = ["normal", "pneumonia"]


def _sig(z):
    """Logistic function (numerically safe)."""
    return 0.5 + 0.5 * np.tanh(0.5 * z)


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


# --------------------------------------------------------------------------------------------- patients


def _anatomy(seed: int, patient: int) -> dict:
    rng = np.random.default_rng((_TAG, seed, 1, patient))
    a = {
        "body_w": _u(rng, 0.88, 1.0),  # half width of the thorax
        "neck_w": _u(rng, 0.15, 0.21),
        "sh_y": _u(rng, -0.97, -0.86),  # top of the shoulders
        "sh_drop": _u(rng, 0.3, 0.5),  # how much the shoulders fall laterally
        "lung_cx": _u(rng, 0.42, 0.47),  # lung centre, from the midline
        "lung_w": _u(rng, 0.28, 0.33),  # lung half width at its base
        "lung_top": _u(rng, -0.74, -0.62),
        "dia_r": _u(rng, 0.36, 0.52),  # diaphragm at the patient's right (image left)
        "dia_drop": _u(rng, 0.02, 0.08),  # left hemidiaphragm lower
        "dome_h": _u(rng, 0.10, 0.18),
        "heart_x": _u(rng, 0.12, 0.18),
        "heart_y": _u(rng, 0.27, 0.35),
        "heart_a": _u(rng, 0.30, 0.36),
        "heart_b": _u(rng, 0.21, 0.26),
        "heart_ang": _u(rng, -0.75, -0.45),
        "med_w": _u(rng, 0.075, 0.10),
        "rib_sp": _u(rng, 0.095, 0.12),  # posterior rib spacing
        "rib_top": _u(rng, -0.80, -0.70),
        "rib_curve": _u(rng, 1.0, 1.4),
        "rib_dens": _u(rng, 0.09, 0.14),
        "clav_y": _u(rng, -0.64, -0.54),
        "tissue": _u(rng, 0.95, 1.10),
        "air": _u(rng, 0.52, 0.66),  # fraction of tissue replaced by air in the lungs
        "hilum": _u(rng, 0.15, 0.3),
        "texture": _u(rng, 0.10, 0.18),
        "bubble": _u(rng, 0.0, 1.0),  # stomach gas bubble strength (0 = none)
        "arms": _u(rng, 0.0, 1.0),
        "off_x": _u(rng, -0.04, 0.04),
        "off_y": _u(rng, -0.04, 0.04),
    }
    if a["bubble"] < 0.4:
        a["bubble"] = 0.0
    # band-limited lung texture (vascular markings), fixed for the patient
    k = 16
    f = rng.uniform(2.5, 8.0, k)
    th = rng.uniform(0, math.pi, k)
    a["tex_fx"], a["tex_fy"] = f * np.cos(th), f * np.sin(th)
    a["tex_ph"] = rng.uniform(0, 2 * math.pi, k)
    a["tex_amp"] = rng.normal(0, 1, k) / math.sqrt(k)
    return a


def _opacities(seed: int, patient: int) -> list[tuple]:
    """Consolidation blobs of a pneumonia patient: (side, t_x, t_y, radius, density, elongation)."""
    rng = np.random.default_rng((_TAG, seed, 4, patient))
    kind = rng.choice(["lobar", "patchy", "patchy", "bilateral"])
    strength = _u(rng, 0.25, 0.8)  # some patients have faint disease
    blobs = []
    sides = [int(rng.choice([-1, 1]))]
    if kind == "bilateral":
        sides = [-1, 1]
    for side in sides:
        if kind == "lobar":
            ty = _u(rng, 0.35, 0.85)  # lung zone (0 apex, 1 base)
            tx = _u(rng, 0.3, 0.8)
            blobs.append((side, tx, ty, _u(rng, 0.12, 0.2), strength, _u(rng, 1.0, 1.6)))
            for _ in range(int(rng.integers(1, 4))):  # ragged edge of the lobe
                blobs.append((side, tx + _u(rng, -0.3, 0.3), ty + _u(rng, -0.2, 0.2),
                              _u(rng, 0.05, 0.1), strength * _u(rng, 0.5, 1.0), 1.0))
        else:
            cy, cx = _u(rng, 0.3, 0.85), _u(rng, 0.25, 0.8)
            for _ in range(int(rng.integers(3, 8))):
                blobs.append((side, cx + _u(rng, -0.3, 0.3), cy + _u(rng, -0.25, 0.25),
                              _u(rng, 0.055, 0.11), strength * _u(rng, 0.5, 1.0), _u(rng, 0.8, 1.4)))
    return blobs


def patient_labels(n_patients: int, seed: int, pneumonia_fraction: float) -> np.ndarray:
    """Class of each patient: exactly ``pneumonia_fraction`` of every block of 8 patients (rounded so that
    the running total stays exact), chosen at random within the block."""
    labels = np.zeros(n_patients, dtype=np.int64)
    f = float(pneumonia_fraction)
    for b in range((n_patients + _BLOCK - 1) // _BLOCK):
        k = math.floor((b + 1) * _BLOCK * f + 0.5) - math.floor(b * _BLOCK * f + 0.5)
        perm = np.random.default_rng((_TAG, seed, 3, b)).permutation(_BLOCK)
        for j in range(_BLOCK):
            p = b * _BLOCK + j
            if p < n_patients and perm[j] < k:
                labels[p] = 1
    return labels


# --------------------------------------------------------------------------------------------- drawing


def _periodic_band(phase, duty, blur):
    """Smooth periodic box of width ``duty`` (fraction of a period), Gaussian-blurred by ``blur`` periods.
    Built from its first harmonics, so it never aliases."""
    out = np.full_like(phase, duty)
    for h in range(1, 5):
        c = 2.0 * math.sin(math.pi * h * duty) / (math.pi * h)
        att = math.exp(-2.0 * (math.pi * h * blur) ** 2)
        if att < 1e-3:
            break
        out = out + c * att * np.cos(2 * math.pi * h * phase)
    return out


def render_phantom(size: int, *, seed: int = 0, patient: int = 0, image: int = 0, label: int = 0) -> np.ndarray:
    """One phantom radiograph as float32 ``size x size`` in [0, 1]."""
    S = int(size)
    A = _anatomy(seed, patient)
    rng = np.random.default_rng((_TAG, seed, 2, patient, image))
    px = 2.0 / S  # pixel size in normalised units
    soft = math.hypot(0.015, 0.5 * px)  # edge width: anatomy blur + one pixel of anti-aliasing
    lsoft = math.hypot(0.025, 0.5 * px)  # lung margins are softer
    blur_px = 0.5 * px

    # pose of this image: small rotation, shift, scale
    ang = rng.normal(0, 0.035)
    sc = 1.0 + rng.normal(0, 0.025)
    dx = A["off_x"] + rng.normal(0, 0.02)
    dy = A["off_y"] + rng.normal(0, 0.02)
    c = ((np.arange(S, dtype=np.float64) + 0.5) * px - 1.0).astype(np.float32)
    X, Y = c[None, :] - dx, c[:, None] - dy
    ca, sa = math.cos(ang), math.sin(ang)
    x = (ca * X + sa * Y) / sc
    y = (-sa * X + ca * Y) / sc
    ax = np.abs(x)

    # body outline: neck + shoulders + thorax; thickness falls towards the sides
    bw = A["body_w"] - 0.10 * (np.clip(y, -1, 1) - 0.15) ** 2
    top = A["sh_y"] + A["sh_drop"] * np.clip(ax - A["neck_w"], 0, None) ** 1.6
    torso = _sig((y - top) / soft) * _sig((bw - ax) / soft)
    neck = _sig((A["neck_w"] - ax) / soft)
    body = 1 - (1 - torso) * (1 - neck)
    trachea = (_sig((0.028 - np.abs(x - 0.01)) / soft) * _sig((-0.12 - y) / 0.03) * neck)
    thick = np.sqrt(np.clip(1 - (x / (bw + 0.08)) ** 2, 0, 1))
    tissue = A["tissue"] * body * (0.35 + 0.65 * thick) * (1 - 0.3 * trachea)
    # arms at the sides of the upper chest (some patients)
    if A["arms"] > 0.5:
        arm = _sig((ax - bw - 0.04) / soft) * _sig((y - top - 0.05) / 0.05) * _sig((0.1 - y) / 0.08)
        tissue = tissue + 0.5 * A["tissue"] * arm

    # lungs
    lung = np.zeros_like(x)
    for side in (-1.0, 1.0):
        a = side * x  # lateral coordinate of this hemithorax
        dia = A["dia_r"] + (A["dia_drop"] if side > 0 else 0.0)
        dome = dia - A["dome_h"] * np.exp(-(((a - A["lung_cx"] + 0.02) / 0.22) ** 2))
        t = np.clip((y - A["lung_top"]) / (dia - A["lung_top"]), 0, 1)
        hw = A["lung_w"] * (0.2 + 0.8 * np.sqrt(np.clip(t * 1.7, 0, 1)))
        lat = A["lung_cx"] + hw
        med = A["lung_cx"] - 0.9 * hw
        one = (_sig((y - A["lung_top"]) / lsoft) * _sig((dome - y) / soft)
               * _sig((lat - a) / lsoft) * _sig((a - med) / lsoft))
        lung = lung + one

    # heart: rotated ellipse, bulging to the image's right
    hx, hy = x - A["heart_x"], y - A["heart_y"]
    cph, sph = math.cos(A["heart_ang"]), math.sin(A["heart_ang"])
    p, q = cph * hx + sph * hy, -sph * hx + cph * hy
    r = np.sqrt((p / A["heart_a"]) ** 2 + (q / A["heart_b"]) ** 2)
    heart = _sig((1 - r) * A["heart_b"] / soft)
    # mediastinum and aortic knob
    med = _sig((A["med_w"] - np.abs(x - 0.01)) / soft)
    knob = _sig((0.065 - np.hypot(x - A["med_w"] - 0.01, y + 0.33)) / soft)
    solid = 1 - (1 - heart) * (1 - med) * (1 - knob)
    lung = lung * (1 - solid)

    # lung texture (vascular markings), denser near the hila
    ph = A["tex_fx"][:, None, None] * x + A["tex_fy"][:, None, None] * y + A["tex_ph"][:, None, None]
    fmag = np.hypot(A["tex_fx"], A["tex_fy"])
    att = np.exp(-2 * (math.pi * fmag * blur_px) ** 2)
    tex = np.tensordot(A["tex_amp"] * att, np.cos(2 * math.pi * ph), axes=1)
    dh = np.minimum(np.hypot(x + 0.15, y + 0.02), np.hypot(x - 0.17, y + 0.0))
    hil = np.exp(-(dh / 0.09) ** 2)
    near = np.exp(-dh / 0.35)

    # consolidation
    cons = np.zeros_like(x)
    cons_scale = rng.uniform(0.85, 1.15)  # drawn for both classes so the streams stay aligned
    if label == 1:
        for side, tx, ty, rad, dens, elong in _opacities(seed, patient):
            dia = A["dia_r"] + (A["dia_drop"] if side > 0 else 0.0)
            cy = A["lung_top"] + ty * (dia - A["lung_top"])
            cx = side * (A["lung_cx"] + (tx - 0.5) * 1.6 * A["lung_w"])
            d2 = ((x - cx) / (rad * elong)) ** 2 + ((y - cy) / rad) ** 2
            cons = cons + dens * np.exp(-d2)
        patch = 0.75 + 0.25 * np.tanh(2.0 * tex)  # patchy, not smooth
        cons = np.clip(cons * patch * cons_scale, 0, 0.95)
    # air: less near the hila (vessels), least at the bases (overlying soft tissue), patient texture
    fill = cons + A["texture"] * tex * near + A["hilum"] * hil + 0.12 * np.clip(y - 0.1, 0, None)
    air = A["air"] * lung * np.clip(1 - fill, 0, 1)

    # bones: ribs (posterior, anterior), clavicles, spine
    bone = np.zeros_like(x)
    for side in (-1.0, 1.0):
        a = side * x - 0.04
        # posterior ribs: rise a little from the spine, then fall along the lateral wall
        yr = y - A["rib_top"] + 0.45 * a - A["rib_curve"] * a ** 2
        phase = yr / A["rib_sp"]
        band = _periodic_band(phase, 0.38, blur_px / A["rib_sp"])
        dia_s = A["dia_r"] + (A["dia_drop"] if side > 0 else 0.0)
        below = 1 - 0.7 * _sig((y - dia_s - 0.05) / 0.06)  # lower ribs fade over the abdomen
        extent = (below * _sig((phase + 0.3) / 0.15) * _sig((10.5 - phase) / 0.15)
                  * _sig((a - 0.02) / soft) * _sig((bw - 0.04 - side * x) / soft))
        bone = bone + A["rib_dens"] * band * extent
        # anterior ribs: fainter, falling towards the midline, invisible medially (cartilage)
        ya = y - A["rib_top"] - 0.12 - 0.30 * a
        phase_a = ya / (A["rib_sp"] * 1.15)
        band_a = _periodic_band(phase_a, 0.35, blur_px / (A["rib_sp"] * 1.15))
        ext_a = (below * _sig((phase_a + 0.2) / 0.15) * _sig((5.5 - phase_a) / 0.15)
                 * _sig((a - 0.22) / 0.06) * _sig((bw - 0.06 - side * x) / soft))
        bone = bone + 0.35 * A["rib_dens"] * band_a * ext_a
        # clavicle: from the sternum out and up to the shoulder
        yc = A["clav_y"] - 0.16 * a + 0.25 * (a - 0.3) ** 2
        clav = (_sig((0.028 - np.abs(y - yc)) / soft) * _sig((a - 0.04) / soft)
                * _sig((0.62 - a) / soft))
        bone = bone + 0.45 * clav
    spine = _sig((0.055 - ax) / soft) * _sig((y - A["sh_y"] + 0.15) / soft)
    vert = _periodic_band(y / 0.085, 0.75, blur_px / 0.085)
    bone = bone + spine * (0.24 + 0.06 * vert)

    density = tissue * (1 - air) + 0.06 * heart + bone * body
    # stomach gas under the left hemidiaphragm (image right)
    if A["bubble"] > 0:
        by = A["dia_r"] + A["dia_drop"] + 0.1
        bub = _sig((1 - np.hypot((x - 0.36) / 0.1, (y - by) / 0.06)) * 0.06 / soft)
        density = density - 0.3 * A["bubble"] * bub * body

    # exposure: film brightness, contrast, gamma, heel effect, grain
    mu = 1.25 * rng.uniform(0.85, 1.15)
    img = 1 - np.exp(-mu * np.clip(density, 0, None))
    img = img * (1 + 0.06 * rng.normal() * y + 0.04 * rng.normal() * x)
    lo, hi = rng.uniform(-0.03, 0.06), rng.uniform(0.80, 0.95)
    img = np.clip((img - lo) / (hi - lo), 0, 1) ** rng.uniform(0.85, 1.2)
    img = img + rng.normal(0, rng.uniform(0.01, 0.03), img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------------------------- data set


class PhantomDataset(ImageDataset):
    """``n`` synthetic chest radiographs, ``images_per_patient`` per patient, drawn on demand."""

    source = "phantoms"

    def __init__(self, n: int = 512, seed: int = 0, size: int = 64, images_per_patient: int = 4,
                 pneumonia_fraction: float = 0.5):
        for key, val in (("n", n), ("seed", seed), ("size", size), ("images_per_patient", images_per_patient)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
                raise UserError(f"phantoms: option {key} must be an integer, got {val!r}")
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise UserError(f"phantoms: size must be between {MIN_SIZE} and {MAX_SIZE}, got {size}")
        if n < 1:
            raise UserError(f"phantoms: n must be at least 1, got {n}")
        if seed < 0:
            raise UserError(f"phantoms: seed must be >= 0, got {seed}")
        if images_per_patient < 1:
            raise UserError(f"phantoms: images_per_patient must be at least 1, got {images_per_patient}")
        if isinstance(pneumonia_fraction, bool) or not isinstance(pneumonia_fraction, (int, float)) \
                or not 0.0 <= pneumonia_fraction <= 1.0:
            raise UserError(f"phantoms: pneumonia_fraction must be a number in [0, 1], got {pneumonia_fraction!r}")
        super().__init__(size=size)
        self.n, self.seed = int(n), int(seed)
        self.images_per_patient = int(images_per_patient)
        self.pneumonia_fraction = float(pneumonia_fraction)
        idx = np.arange(self.n)
        self._patient = idx // self.images_per_patient
        self._image = idx % self.images_per_patient
        plabels = patient_labels(int(self._patient[-1]) + 1, self.seed, self.pneumonia_fraction)
        self.labels = plabels[self._patient]
        self.patient_ids = [f"phantom{p}" for p in self._patient]
        self.names = [f"phantom{p}-{j}" for p, j in zip(self._patient, self._image)]
        self.classes = list(CLASSES)

    def _load_one(self, index: int) -> np.ndarray:
        return render_phantom(self.size, seed=self.seed, patient=int(self._patient[index]),
                              image=int(self._image[index]), label=int(self.labels[index]))

    def describe(self) -> dict:
        d = super().describe()
        d.update({
            "path": None, "split": None, "n": self.n, "seed": self.seed,
            "images_per_patient": self.images_per_patient, "pneumonia_fraction": self.pneumonia_fraction,
            "counts": {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)},
            "num_patients": len(set(self.patient_ids)),
            "patient_ids": "synthetic: phantom<patient>, images_per_patient images each",
        })
        return d
