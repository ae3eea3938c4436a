"""Draw the template browser's title cards: example_workflows/<name>.jpg, 512x384.

Each card is a vertical colour gradient with the model's name, what it makes, and the graph's
stages as a column of linked boxes. The t2v_A14B, i2v_A14B and ti2v_5B cards were drawn before
this script; their entries here redraw them to within JPEG noise (mean 2 of 255 per channel).
Pillow's bundled font (load_default with a size) keeps the drawing the same on every machine.

    python tools/draw_thumbnails.py                      # every card
    python tools/draw_thumbnails.py s2v_14B s2v_14B_pose  # only these
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORKFLOW_DIR = Path(__file__).resolve().parent.parent / "example_workflows"
SIZE = (512, 384)
TITLE_AT, TITLE_PX = (28, 26), 40
SUBTITLE_AT, SUBTITLE_PX = (30, 80), 24
BOX_LEFT, BOX_RIGHT, BOX_HEIGHT, BOX_PITCH, FIRST_BOX_TOP = 60, 452, 40, 56, 140
BOX_TEXT_X, BOX_TEXT_PX = 80, 20
LINE = (230, 242, 255)
TEXT = (255, 255, 255)
QUALITY = 85  # as the first three cards

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Card:
    title: str
    subtitle: str
    stages: tuple[str, ...]  # at most four fit
    top: RGB  # gradient colours
    bottom: RGB
    box: RGB  # box fill
    subtitle_color: RGB


CARDS = {
    "t2v_A14B": Card("Wan2.2 T2V-A14B", "text to video",
                     ("prompt", "high-noise expert", "low-noise expert", "video 16 fps"),
                     (40, 90, 160), (30, 52, 92), (35, 64, 106), (211, 240, 255)),
    "i2v_A14B": Card("Wan2.2 I2V-A14B", "image to video",
                     ("start image", "high-noise expert", "low-noise expert", "video 16 fps"),
                     (120, 60, 150), (66, 38, 86), (83, 46, 100), (245, 223, 255)),
    "ti2v_5B": Card("Wan2.2 TI2V-5B", "text / image to video",
                    ("prompt (+ image)", "one 5B model", "Wan2.2 VAE", "video 24 fps"),
                    (30, 120, 100), (26, 65, 64), (28, 82, 69), (209, 246, 252)),
    "t2v_A14B_lightning": Card("Wan2.2 T2V-A14B", "text to video, 4-step Lightning",
                               ("prompt", "high-noise expert + LoRA: 2 steps", "low-noise expert + LoRA: 2 steps",
                                "video 16 fps"),
                               (176, 92, 28), (92, 46, 22), (118, 60, 26), (255, 228, 196)),
    "i2v_A14B_lightning": Card("Wan2.2 I2V-A14B", "image to video, 4-step Lightning",
                               ("start image", "high-noise expert + LoRA: 2 steps", "low-noise expert + LoRA: 2 steps",
                                "video 16 fps"),
                               (162, 40, 84), (84, 24, 52), (108, 32, 64), (255, 214, 232)),
    "s2v_14B": Card("Wan2.2 S2V-14B", "speech to video",
                    ("reference image + speech", "wav2vec2 audio features", "one 14B model, 80-frame clips",
                     "video 16 fps with the speech"),
                    (24, 110, 140), (20, 56, 76), (22, 74, 96), (200, 240, 255)),
    "s2v_14B_pose": Card("Wan2.2 S2V-14B", "speech + pose video to video",
                         ("reference image + speech", "pose video", "one 14B model, 80-frame clips",
                          "video 16 fps with the speech"),
                         (120, 104, 30), (62, 52, 20), (82, 70, 24), (255, 242, 196)),
}


def draw(card: Card) -> Image.Image:
    width, height = SIZE
    t = np.linspace(0.0, 1.0, height)[:, None]
    rows = np.array(card.top)[None] * (1 - t) + np.array(card.bottom)[None] * t
    picture = Image.fromarray(np.repeat(rows[:, None], width, axis=1).round().astype(np.uint8))
    pen = ImageDraw.Draw(picture)
    pen.text(TITLE_AT, card.title, font=ImageFont.load_default(size=TITLE_PX), fill=TEXT)
    pen.text(SUBTITLE_AT, card.subtitle, font=ImageFont.load_default(size=SUBTITLE_PX), fill=card.subtitle_color)
    font = ImageFont.load_default(size=BOX_TEXT_PX)
    for i, stage in enumerate(card.stages):
        top = FIRST_BOX_TOP + i * BOX_PITCH
        if i:  # the link from the box above
            pen.line([(width // 2, top - (BOX_PITCH - BOX_HEIGHT)), (width // 2, top)], fill=LINE, width=3)
        pen.rounded_rectangle((BOX_LEFT, top, BOX_RIGHT, top + BOX_HEIGHT), radius=10, fill=card.box, outline=LINE,
                              width=2)
        if font.getlength(stage) > BOX_RIGHT - BOX_TEXT_X - 10:
            raise ValueError(f"stage {stage!r} does not fit its box")
        pen.text((BOX_TEXT_X, top + BOX_HEIGHT // 2 + 1), stage, font=font, fill=TEXT, anchor="lm")
    return picture


def main(names: list[str]) -> None:
    for name in names or CARDS:
        if name not in CARDS:
            raise SystemExit(f"no card for {name!r}; known: {', '.join(CARDS)}")
        path = WORKFLOW_DIR / f"{name}.jpg"
        draw(CARDS[name]).save(path, quality=QUALITY)
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
