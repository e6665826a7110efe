"""The embedded synthetic "dance" dataset, written in the lab's folder layout.

The lab's dance video cannot be redistributed and the project must run offline, so this module
renders a stand-in with the same structure: RGB frames of one dancer in a light-grey studio and
OpenPose-style skeleton labels on white. Appearance (clothes, skin, studio shading) is fixed per
video and pose changes smoothly, so, as in the lab, the previous frame carries appearance and the
label carries pose. The tree is written as PNG files in the lab layout so that the real loader
(`cvae.data.lab`) is the code path every run exercises.

    python -m cvae.data.synthetic --out /tmp/dance --size full [--seed 0] [--height 32] [--width 64]
"""

from __future__ import annotations

import argparse
import colorsys
import concurrent.futures
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

Size = Literal["smoke", "cpu", "full"]


@dataclass(frozen=True)
class SyntheticSize:
    """Frame counts of one dataset size; `full` matches the lab's counts."""

    train_frames: int
    train_video_frames: int  # typical length of one training video (lengths vary ±33 %)
    val_frames: int
    test_sequences: int
    test_frames: int


SIZES: dict[str, SyntheticSize] = {
    "smoke": SyntheticSize(train_frames=160, train_video_frames=80, val_frames=48,
                           test_sequences=5, test_frames=48),
    "cpu": SyntheticSize(train_frames=1_600, train_video_frames=320, val_frames=630,
                         test_sequences=5, test_frames=630),
    "full": SyntheticSize(train_frames=23_410, train_video_frames=900, val_frames=630,
                          test_sequences=5, test_frames=630),
}

COMPLETE_MARKER = "COMPLETE"
SUPERSAMPLE = 4  # draw at 4x and box-downsample: antialiased edges at any output size
CLIP_ALIGN = 16  # training video lengths are multiples of the lab's clip length (but the last)
# Separate seed streams per split, so val and test dancers and motions never occur in training.
SPLIT_STREAM = {"train": 0, "val": 1, "test": 2, "layout": 3}

# ---------------------------------------------------------------------------------------------
# OpenPose's COCO-18 skeleton

KEYPOINTS = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
)
K = {name: index for index, name in enumerate(KEYPOINTS)}
# The 17 limbs OpenPose draws, in its drawing order (limb i gets colour i).
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)


def _openpose_palette() -> tuple[tuple[int, int, int], ...]:
    """OpenPose's 18 colours: the hue wheel in 20-degree steps at full saturation and value."""
    colours = []
    for index in range(18):
        r, g, b = colorsys.hsv_to_rgb(index / 18, 1.0, 1.0)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return tuple(colours)


PALETTE = _openpose_palette()

# Body proportions as fractions of the dancer's height.
BODY = {
    "torso": 0.30, "shoulder": 0.12, "hip": 0.075, "upper_arm": 0.165, "forearm": 0.15,
    "thigh": 0.235, "shin": 0.235, "neck": 0.05, "head": 0.068,
}

# ---------------------------------------------------------------------------------------------
# Motion: smooth random joint-angle trajectories and forward kinematics


def smooth_signal(rng: np.random.Generator, n_frames: int, *, base: float, amplitude: float,
                  periods: tuple[float, float], beat: tuple[float, float] | None = None,
                  low: float = -np.inf, high: float = np.inf) -> np.ndarray:
    """One angle over time: a few low-frequency sinusoids with random phases, clipped.

    Three incommensurate periods make the motion aperiodic; a slow envelope makes the dancer
    alternate calm and lively passages; `beat` = (period, phase) shared by all joints of a video
    couples them like a dance on a tempo. Clipping keeps joints in a human range.
    """
    t = np.arange(n_frames, dtype=np.float64)
    signal = np.zeros(n_frames)
    for weight in rng.dirichlet(np.ones(3)):
        period = rng.uniform(*periods)
        signal += weight * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
    if beat is not None:
        signal = 0.6 * signal + 0.4 * np.sin(2 * np.pi * t / beat[0] + beat[1] + rng.uniform(-1, 1))
    envelope = 0.65 + 0.35 * np.sin(2 * np.pi * t / rng.uniform(150, 400) + rng.uniform(0, 6.3))
    # A weighted mix of sinusoids seldom reaches ±1; x1.4 makes `amplitude` about its usual peak.
    return np.clip(base + amplitude * envelope * signal * 1.4, low, high)


def _direction(abduction: np.ndarray, flexion: np.ndarray, side: float) -> np.ndarray:
    """Unit vector of a limb segment in the body frame, (T,) angles -> (T, 3).

    Body frame: x towards image right when the dancer faces the camera, y down, z towards the
    camera. abduction = 0 hangs down, pi/2 points sideways (outwards on `side`), pi points up;
    flexion swings the segment forwards.
    """
    return np.stack([side * np.sin(abduction), np.cos(abduction) * np.cos(flexion),
                     np.cos(abduction) * np.sin(flexion)], axis=-1)


@dataclass(frozen=True)
class Motion:
    """Per-frame pose of one video: keypoints in pixels and what the renderer needs besides."""

    points: np.ndarray  # (T, 18, 3) float: x, y in output pixels; depth (towards camera)
    feet: np.ndarray  # (T, 2, 2) float: toe points of right and left foot, pixels
    visible: np.ndarray  # (T, 18) bool: OpenPose would detect this keypoint
    height: np.ndarray  # (T,) float: dancer's height in pixels (perspective scale)
    yaw: np.ndarray  # (T,) float: body rotation about the vertical, 0 = facing the camera
    canvas: tuple[int, int]  # output frame (height, width) in pixels


def sample_motion(rng: np.random.Generator, n_frames: int, *, height: int, width: int) -> Motion:
    """A random smooth dance: joint angles, a turning body, drift across and along the stage."""
    beat = (rng.uniform(18, 40), rng.uniform(0, 2 * np.pi))

    def angle(base: float, amplitude: float, low: float, high: float,
              periods: tuple[float, float] = (30, 120)) -> np.ndarray:
        return smooth_signal(rng, n_frames, base=base, amplitude=amplitude, periods=periods,
                             beat=beat, low=low, high=high)

    # Angles in radians: (base, amplitude, lowest, highest); side -1 is the dancer's right.
    arms = {side: {"abduction": angle(rng.uniform(0.2, 1.6), rng.uniform(0.4, 1.2), 0.05, 2.9),
                   "flexion": angle(rng.uniform(-0.2, 0.5), rng.uniform(0.2, 0.8), -1.0, 1.5),
                   "elbow_out": angle(0.3, rng.uniform(0.2, 0.6), -0.2, 1.8),
                   "elbow_flex": angle(0.6, rng.uniform(0.3, 0.7), 0.0, 2.2)}
            for side in (-1.0, 1.0)}
    legs = {side: {"abduction": angle(rng.uniform(0.02, 0.18), rng.uniform(0.05, 0.25), -0.05, 0.7),
                   "flexion": angle(rng.uniform(0.0, 0.2), rng.uniform(0.1, 0.5), -0.5, 1.2),
                   "knee": angle(0.35, rng.uniform(0.2, 0.45), 0.0, 1.6)}
            for side in (-1.0, 1.0)}
    lean = angle(0.0, rng.uniform(0.03, 0.15), -0.3, 0.3)
    bend = angle(0.05, rng.uniform(0.02, 0.12), -0.15, 0.35)
    yaw = smooth_signal(rng, n_frames, base=rng.uniform(-0.4, 0.4), amplitude=rng.uniform(0.5, 1.7),
                        periods=(120, 480))

    dancer_height = height * rng.uniform(0.70, 0.80)
    keypoints, feet = _skeleton(arms, legs, lean, bend, n_frames)  # body frame, unit height
    depth_scale = 1 + smooth_signal(rng, n_frames, base=0, amplitude=0.05, periods=(200, 700))
    centre_x = width * (0.5 + smooth_signal(rng, n_frames, base=0, amplitude=0.12,
                                            periods=(150, 600), low=-0.18, high=0.18))
    ground_y = height * np.minimum(0.92 + 0.6 * (depth_scale - 1), 0.965)
    return _place(keypoints, feet, yaw=yaw, scale=dancer_height * depth_scale,
                  centre_x=centre_x, ground_y=ground_y, canvas=(height, width))


def _skeleton(arms: dict, legs: dict, lean: np.ndarray, bend: np.ndarray,
              n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Forward kinematics in the body frame for a dancer of height 1, origin at mid-hip."""
    points = np.zeros((n_frames, 18, 3))
    up = np.stack([np.sin(lean), -np.cos(lean) * np.cos(bend), np.cos(lean) * np.sin(bend)], -1)
    across = np.stack([np.cos(lean), np.sin(lean), np.zeros(n_frames)], -1)  # dancer's left
    forward = np.array([0.0, 0.0, 1.0])
    neck = BODY["torso"] * up
    points[:, K["neck"]] = neck
    # Person's right appears on the image left when facing the camera: side -1.
    for side, prefix in ((-1.0, "r"), (1.0, "l")):
        arm, leg = arms[side], legs[side]
        shoulder = neck + side * BODY["shoulder"] * across
        elbow = shoulder + BODY["upper_arm"] * _direction(arm["abduction"], arm["flexion"], side)
        wrist = elbow + BODY["forearm"] * _direction(arm["abduction"] + arm["elbow_out"],
                                                     arm["flexion"] + arm["elbow_flex"], side)
        hip = np.zeros((n_frames, 3)) + np.array([side * BODY["hip"], 0.0, 0.0])
        knee = hip + BODY["thigh"] * _direction(leg["abduction"], leg["flexion"], side)
        ankle = knee + BODY["shin"] * _direction(leg["abduction"], leg["flexion"] - leg["knee"],
                                                 side)
        for name, value in (("shoulder", shoulder), ("elbow", elbow), ("wrist", wrist),
                            ("hip", hip), ("knee", knee), ("ankle", ankle)):
            points[:, K[f"{prefix}_{name}"]] = value
    head = neck + (BODY["neck"] + BODY["head"]) * up
    points[:, K["nose"]] = head + 0.01 * up + 0.05 * forward
    for side, prefix in ((-1.0, "r"), (1.0, "l")):
        points[:, K[f"{prefix}_eye"]] = head + 0.025 * up + 0.022 * side * across + 0.045 * forward
        points[:, K[f"{prefix}_ear"]] = head + 0.05 * side * across - 0.01 * forward
    toes = points[:, [K["r_ankle"], K["l_ankle"]]] + np.array([0.0, 0.015, 0.06])
    return points, toes


def _place(points: np.ndarray, toes: np.ndarray, *, yaw: np.ndarray, scale: np.ndarray,
           centre_x: np.ndarray, ground_y: np.ndarray, canvas: tuple[int, int]) -> Motion:
    """Turn the body by `yaw`, project orthographically, and stand it on the floor."""
    cos, sin = np.cos(yaw)[:, None], np.sin(yaw)[:, None]

    def turn(p: np.ndarray) -> np.ndarray:  # (T, J, 3) -> (T, J, 3), rotation about y
        x, z = p[..., 0], p[..., 2]
        return np.stack([x * cos + z * sin, p[..., 1], -x * sin + z * cos], axis=-1)

    points, toes = turn(points), turn(toes)
    lowest = np.maximum(points[:, [K["r_ankle"], K["l_ankle"]], 1].max(1), toes[..., 1].max(1))
    offset = np.stack([centre_x, ground_y, np.zeros_like(ground_y)], -1)[:, None]  # (T, 1, 3)
    points[..., 1] -= lowest[:, None]
    toes[..., 1] -= lowest[:, None]
    s = scale[:, None, None]
    return Motion(points=points * s + offset, feet=(toes * s + offset)[..., :2],
                  visible=_visibility(points), height=scale, yaw=yaw, canvas=canvas)


def _visibility(points: np.ndarray) -> np.ndarray:
    """Which keypoints OpenPose would find: the face only from the front, the far ear hidden."""
    visible = np.ones(points.shape[:2], dtype=bool)
    head_depth = (points[:, K["r_ear"], 2] + points[:, K["l_ear"], 2]) / 2  # (T,)
    facing = points[:, K["nose"], 2] - head_depth > -0.01
    visible[:, K["nose"]] = facing
    for prefix in ("r", "l"):
        eye, ear = K[f"{prefix}_eye"], K[f"{prefix}_ear"]
        visible[:, eye] = facing & (points[:, eye, 2] - head_depth > 0.0)
        visible[:, ear] = points[:, ear, 2] - head_depth > -0.03
    return visible


# ---------------------------------------------------------------------------------------------
# Appearance and drawing


@dataclass(frozen=True)
class Appearance:
    """What stays fixed within a video: the dancer's colours and the studio."""

    shirt: tuple[int, int, int]
    sleeve: tuple[int, int, int]
    trousers: tuple[int, int, int]
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    shoes: tuple[int, int, int]
    shadow: tuple[int, int, int]
    studio: Image.Image  # (S*H, S*W) RGB background


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def sample_appearance(rng: np.random.Generator, *, height: int, width: int) -> Appearance:
    """Random clothes and skin, and a light-grey studio with subtle wall and floor shading."""
    shirt_hue = rng.uniform()
    shirt = _rgb(shirt_hue, rng.uniform(0.4, 0.85), rng.uniform(0.5, 0.95))
    long_sleeves = rng.uniform() < 0.5
    skin_tone = rng.uniform()
    skin = tuple(round(a + (b - a) * skin_tone) for a, b in zip((245, 208, 180), (105, 68, 45)))
    hair = _rgb(rng.uniform(0.05, 0.11), rng.uniform(0.3, 0.8), rng.choice([0.12, 0.3, 0.55, 0.8]))
    trousers = _rgb(rng.uniform(), rng.uniform(0.1, 0.6), rng.uniform(0.25, 0.65))
    shoes = _rgb(0.0, 0.0, rng.uniform(0.05, 0.3))
    wall = rng.uniform(196, 224)
    floor = wall - rng.uniform(12, 26)
    studio, shadow = _studio(rng, height=height, width=width, wall=wall, floor=floor)
    return Appearance(shirt=shirt, sleeve=shirt if long_sleeves else skin, trousers=trousers,
                      skin=skin, hair=hair, shoes=shoes, shadow=shadow, studio=studio)


def _studio(rng: np.random.Generator, *, height: int, width: int, wall: float,
            floor: float) -> tuple[Image.Image, tuple[int, int, int]]:
    """Wall lit from above, a darker floor below a horizon, a faint warm or cool tint."""
    rows, cols = SUPERSAMPLE * height, SUPERSAMPLE * width
    y = np.linspace(0, 1, rows)[:, None]  # (rows, 1)
    x = np.linspace(-1, 1, cols)[None, :]  # (1, cols)
    horizon = rng.uniform(0.58, 0.7)
    light_x = rng.uniform(-0.6, 0.6)
    wall_shade = wall + 10 * (0.5 - y) - 8 * (x - light_x) ** 2
    floor_shade = floor + 6 * (y - horizon) - 6 * (x - light_x) ** 2
    grey = np.where(y < horizon, wall_shade, floor_shade)  # (rows, cols)
    tint = rng.uniform(-3, 3, size=3)
    pixels = np.clip(grey[..., None] + tint, 0, 255).round().astype(np.uint8)  # (rows, cols, 3)
    shadow = tuple(int(v) for v in np.clip((floor - 30) + tint, 0, 255).round())
    return Image.fromarray(pixels, "RGB"), shadow


def _segment(draw: ImageDraw.ImageDraw, a: np.ndarray, b: np.ndarray, width: float,
             colour: tuple[int, int, int]) -> None:
    """A thick line with round caps (PIL's wide lines have square ends)."""
    radius = width / 2
    draw.line([tuple(a), tuple(b)], fill=colour, width=max(1, round(width)))
    for end in (a, b):
        draw.ellipse([end[0] - radius, end[1] - radius, end[0] + radius, end[1] + radius],
                     fill=colour)


def _disk(draw: ImageDraw.ImageDraw, centre: np.ndarray, radius: float,
          colour: tuple[int, int, int]) -> None:
    draw.ellipse([centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius],
                 fill=colour)


def render_frame(motion: Motion, appearance: Appearance, t: int) -> Image.Image:
    """The RGB frame at time t: far limbs first, near limbs last (painter's algorithm)."""
    s = SUPERSAMPLE
    image = appearance.studio.copy()
    draw = ImageDraw.Draw(image)
    p = motion.points[t, :, :2] * s  # (18, 2) supersampled pixels
    depth = motion.points[t, :, 2]  # (18,)
    feet = motion.feet[t] * s  # (2, 2)
    h = motion.height[t] * s
    ankles = motion.points[t, [K["r_ankle"], K["l_ankle"]]]  # (2, 3)
    ground = max(motion.feet[t, :, 1].max(), ankles[:, 1].max())
    centre = ankles[:, 0].mean()
    draw.ellipse([(centre - 0.17 * motion.height[t]) * s, (ground - 0.025 * motion.height[t]) * s,
                  (centre + 0.17 * motion.height[t]) * s, (ground + 0.03 * motion.height[t]) * s],
                 fill=appearance.shadow)

    parts: list[tuple[float, Callable[[], None]]] = []
    for prefix, foot in (("r", feet[0]), ("l", feet[1])):
        sh, el, wr = (K[f"{prefix}_{n}"] for n in ("shoulder", "elbow", "wrist"))
        hip, kn, an = (K[f"{prefix}_{n}"] for n in ("hip", "knee", "ankle"))

        def arm(sh=sh, el=el, wr=wr) -> None:
            _segment(draw, p[sh], p[el], 0.062 * h, appearance.sleeve)
            _segment(draw, p[sh], p[sh] + 0.4 * (p[el] - p[sh]), 0.068 * h, appearance.shirt)
            _segment(draw, p[el], p[wr], 0.052 * h, appearance.skin)
            _disk(draw, p[wr], 0.035 * h, appearance.skin)

        def leg(hip=hip, kn=kn, an=an, foot=foot) -> None:
            _segment(draw, p[an], foot, 0.05 * h, appearance.shoes)
            _segment(draw, p[hip], p[kn], 0.095 * h, appearance.trousers)
            _segment(draw, p[kn], p[an], 0.075 * h, appearance.trousers)

        parts.append((depth[[sh, el, wr]].mean(), arm))
        parts.append((depth[[hip, kn, an]].mean() - 0.5, leg))  # legs sit behind the torso edge

    def torso() -> None:
        rs, ls, rh, lh, neck = (p[K[n]] for n in ("r_shoulder", "l_shoulder", "r_hip", "l_hip",
                                                  "neck"))
        pelvis = (rh + lh) / 2
        waist = pelvis + 0.07 * (neck - pelvis)
        _segment(draw, rh, lh, 0.1 * h, appearance.trousers)
        _segment(draw, neck, waist, 0.15 * h, appearance.shirt)  # keeps width when side-on
        draw.polygon([tuple(rs), tuple(ls), tuple(lh + 0.1 * (neck - lh)),
                      tuple(rh + 0.1 * (neck - rh))], fill=appearance.shirt)
        _segment(draw, rs, ls, 0.06 * h, appearance.shirt)

    def head() -> None:
        neck = p[K["neck"]]
        centre = (p[K["r_ear"]] + p[K["l_ear"]]) / 2
        _segment(draw, neck, neck + 0.6 * (centre - neck), 0.05 * h, appearance.skin)
        face_forward = depth[K["nose"]] - (depth[K["r_ear"]] + depth[K["l_ear"]]) / 2
        back = centre - 0.35 * (p[K["nose"]] - centre) - np.array([0.0, 0.018 * h])
        if face_forward > 0:  # hair behind the face
            _disk(draw, back, 0.075 * h, appearance.hair)
            _disk(draw, centre, 0.064 * h, appearance.skin)
        else:
            _disk(draw, centre, 0.064 * h, appearance.skin)
            _disk(draw, back, 0.072 * h, appearance.hair)

    parts.append((depth[K["neck"]], torso))
    parts.append((depth[K["neck"]] + 1e-3, head))
    for _, paint in sorted(parts, key=lambda part: part[0]):
        paint()
    return image.reduce(s)


def render_label(motion: Motion, t: int) -> Image.Image:
    """The pose label at time t: OpenPose colours, thin lines and small dots on white."""
    s = SUPERSAMPLE
    height, width = motion.canvas
    image = Image.new("RGB", (s * width, s * height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    p = motion.points[t, :, :2] * s
    visible = motion.visible[t]
    line = max(1.0, 0.9 * s * height / 32)  # about one output pixel at 32x64
    for colour, (a, b) in zip(PALETTE, LIMBS):
        if visible[a] and visible[b]:
            draw.line([tuple(p[a]), tuple(p[b])], fill=colour, width=round(line))
    for colour, (point, seen) in zip(PALETTE, zip(p, visible)):
        if seen:
            _disk(draw, point, 0.85 * line, colour)
    return image.reduce(s)


# ---------------------------------------------------------------------------------------------
# Writing the tree


@dataclass(frozen=True)
class VideoJob:
    """One video to render: where its frames and labels go, and its own seed stream."""

    split: str
    video: int
    n_frames: int
    start_index: int
    image_dir: Path
    label_dir: Path
    first_frame_dir: Path | None  # test: frame 0 also goes to test_img/{i}
    seed: int
    height: int
    width: int


def frame_name(index: int) -> str:
    return f"frame{index:06d}.png"


def _save_png(image: Image.Image, path: Path) -> None:
    """PNG without metadata at a fixed compression level: same pixels give the same bytes."""
    image.save(path, format="PNG", compress_level=6)


def render_video(job: VideoJob) -> int:
    """Render and write one video; returns its frame count (for progress)."""
    rng = np.random.default_rng([job.seed, SPLIT_STREAM[job.split], job.video])
    appearance = sample_appearance(rng, height=job.height, width=job.width)
    motion = sample_motion(rng, job.n_frames, height=job.height, width=job.width)
    for t in range(job.n_frames):
        name = frame_name(job.start_index + t)
        frame = render_frame(motion, appearance, t)
        _save_png(frame, job.image_dir / name)
        _save_png(render_label(motion, t), job.label_dir / name)
        if t == 0 and job.first_frame_dir is not None:
            _save_png(frame, job.first_frame_dir / name)
    return job.n_frames


def video_lengths(total: int, typical: int, rng: np.random.Generator) -> list[int]:
    """Split `total` training frames into videos of about `typical` frames (±33 %).

    All but the last are multiples of the lab's 16-frame clip, so non-overlapping clips over
    the sorted frames never straddle two videos (only the last video's remainder is dropped).
    """
    count = max(1, round(total / typical))
    weights = rng.uniform(0.67, 1.33, size=count)
    raw = total * weights / weights.sum()
    lengths = [max(CLIP_ALIGN, int(r) // CLIP_ALIGN * CLIP_ALIGN) for r in raw[:-1]]
    lengths.append(total - sum(lengths))
    if lengths[-1] <= 0:
        raise ValueError(f"cannot split {total} frames into videos of about {typical}")
    return lengths


def plan_jobs(root: Path, *, size: Size, seed: int, height: int, width: int) -> list[VideoJob]:
    """Every video of the dataset, with folders under `root` in the lab layout."""
    spec = SIZES[size]
    common = {"seed": seed, "height": height, "width": width}
    jobs = []
    start = 0
    lengths = video_lengths(spec.train_frames, spec.train_video_frames,
                            np.random.default_rng([seed, SPLIT_STREAM["layout"]]))
    for video, length in enumerate(lengths):
        jobs.append(VideoJob("train", video, length, start, root / "train" / "train_img",
                             root / "train" / "train_label", None, **common))
        start += length
    jobs.append(VideoJob("val", 0, spec.val_frames, 0, root / "val" / "val_img",
                         root / "val" / "val_label", None, **common))
    test = root / "test"
    for sequence in range(spec.test_sequences):
        jobs.append(VideoJob("test", sequence, spec.test_frames, 0,
                             test / "test_gt" / str(sequence), test / "test_label" / str(sequence),
                             test / "test_img" / str(sequence), **common))
    return jobs


def _run_jobs(jobs: Sequence[VideoJob], *, workers: int) -> Iterator[int]:
    """Render videos, in 2 processes when worth it; yields frame counts as videos finish."""
    if workers <= 1:
        for job in jobs:
            yield render_video(job)
        return
    # fork: children start instantly and need nothing but numpy and PIL; spawn would re-run an
    # unguarded user script. Longest videos first keeps both processes busy to the end.
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    ordered = sorted(jobs, key=lambda job: -job.n_frames)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(render_video, job) for job in ordered]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()


def _check_options(size: str, height: int, width: int) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    if height < 8 or width < 8:
        raise ValueError(f"frame size {height}x{width} is too small; need at least 8x8")


def generate(out_dir: str | os.PathLike, *, size: Size = "cpu", seed: int = 0, height: int = 32,
             width: int = 64, progress: bool = True) -> Path:
    """Write the dataset tree to `out_dir` and return it.

    Written to a temporary sibling folder and renamed into place at the end, with a COMPLETE
    marker inside, so an interrupted run never leaves a half dataset where a finished one is
    expected. Raises FileExistsError if `out_dir` already holds something.
    """
    _check_options(size, height, width)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        jobs = plan_jobs(staging, size=size, seed=seed, height=height, width=width)
        for folder in {d for job in jobs for d in (job.image_dir, job.label_dir,
                                                   job.first_frame_dir) if d is not None}:
            folder.mkdir(parents=True, exist_ok=True)
        total = sum(job.n_frames for job in jobs)
        workers = min(2, os.cpu_count() or 1) if total > 2_000 else 1
        bar = _progress_bar(total, f"synthetic {size}") if progress else None
        for done in _run_jobs(jobs, workers=workers):
            if bar is not None:
                bar.update(done)
        if bar is not None:
            bar.close()
        (staging / COMPLETE_MARKER).write_text(f"size={size} seed={seed} height={height} "
                                               f"width={width}\n")
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _move_into_place(staging: Path, out: Path) -> None:
    """Atomic rename; an empty `out` folder is replaced, a non-empty one means another process
    finished first (FileExistsError)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.rename(staging, out)
    except OSError as error:
        raise FileExistsError(f"{out}: already exists and is not empty") from error


def _progress_bar(total: int, description: str):
    """tqdm on an interactive terminal only: logs and CI stay clean."""
    if not sys.stdout.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=description, unit="frame")


def default_root(*, size: Size, seed: int = 0, height: int = 32, width: int = 64) -> Path:
    """Where `ensure_synthetic` caches a dataset: under $CVAE_DATA_DIR if set, else
    ~/.cache/cvae-ablate/synthetic, in a folder named after every option that changes it."""
    parent = os.environ.get("CVAE_DATA_DIR") or Path.home() / ".cache" / "cvae-ablate" / "synthetic"
    counts = SIZES[size]
    return Path(parent).expanduser() / (
        f"{size}-{counts.train_frames}f{counts.val_frames}v-s{seed}-{height}x{width}")


def is_complete(root: str | os.PathLike) -> bool:
    return (Path(root) / COMPLETE_MARKER).is_file()


def ensure_synthetic(*, size: Size, seed: int = 0, height: int = 32, width: int = 64,
                     root: str | os.PathLike | None = None) -> Path:
    """The synthetic dataset folder for these options, generated on first use.

    Safe when several processes ask at once: each generates into its own temporary folder and
    the first to rename wins; the others discard their copy and use the winner's.
    """
    _check_options(size, height, width)
    target = Path(root) if root is not None else default_root(size=size, seed=seed, height=height,
                                                              width=width)
    if is_complete(target):
        return target
    try:
        return generate(target, size=size, seed=seed, height=height, width=width,
                        progress=sys.stdout.isatty())
    except FileExistsError:
        if is_complete(target):
            return target
        raise FileExistsError(f"{target}: exists but is not a finished synthetic dataset (no "
                              f"{COMPLETE_MARKER} file); delete it or pass another root") from None


# ---------------------------------------------------------------------------------------------
# Command line


def _positive(text: str) -> int:
    value = int(text)
    if value < 8:
        raise argparse.ArgumentTypeError(f"must be at least 8, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cvae.data.synthetic",
        description="Write the synthetic dance dataset in the lab's folder layout.")
    parser.add_argument("--out", type=Path, required=True, help="folder to create (must not exist)")
    parser.add_argument("--size", choices=list(SIZES), default="cpu",
                        help="smoke: seconds; cpu: 1,600 train frames; full: the lab's counts")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files")
    parser.add_argument("--height", type=_positive, default=32, help="frame height in pixels")
    parser.add_argument("--width", type=_positive, default=64, help="frame width in pixels")
    args = parser.parse_args(argv)
    try:
        out = generate(args.out, size=args.size, seed=args.seed, height=args.height,
                       width=args.width)
    except (FileExistsError, ValueError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
