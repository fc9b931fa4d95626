"""The images the emulator answers with: derived from (input, seed, prompt), labelled as emulated."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter, ImageOps

Rgb = tuple[int, int, int]


@dataclass(frozen=True)
class Artifact:
    data: bytes
    mime: str
    seed: int
    finish_reason: str


def _palette(seed: int, prompt: str) -> tuple[Rgb, Rgb]:
    """A dark and a light colour that stand for (seed, prompt): the same pair always gives the same image."""
    digest = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
    dark = (digest[0] // 3, digest[1] // 3, digest[2] // 3)
    light = (128 + digest[3] // 2, 128 + digest[4] // 2, 128 + digest[5] // 2)
    return dark, light


def render(source: Image.Image | None, size: tuple[int, int], seed: int, prompt: str, change: float) -> Image.Image:
    """A stand-in for a generated image: the input posterized, edge-enhanced and tinted (more so the larger
    `change` is, 0 to 1), or without an input a gradient with rings; both coloured by (seed, prompt)."""
    dark, light = _palette(seed, prompt)
    if source is None:
        gradient = Image.linear_gradient("L")
        if seed % 2:
            gradient = gradient.transpose(Image.Transpose.ROTATE_90)
        band = 8 + seed % 24
        rings = Image.radial_gradient("L").point([255 if (v // band) % 2 else 0 for v in range(256)])
        pattern = Image.blend(gradient, rings, 0.35).resize(size, Image.Resampling.BILINEAR)
        image = ImageOps.colorize(pattern, black=dark, white=light)
    else:
        work = ImageOps.fit(source.convert("RGB"), size)
        poster = ImageOps.posterize(work, 3).filter(ImageFilter.EDGE_ENHANCE_MORE)
        tinted = ImageOps.colorize(ImageOps.grayscale(work), black=dark, white=light)
        image = Image.blend(poster, tinted, 0.25 + 0.5 * max(0.0, min(1.0, change)))
    # A visible label, so nobody takes an emulator image for a real generation.
    draw = ImageDraw.Draw(image)
    label = f"podq emulator - seed {seed}"
    draw.text((9, 9), label, fill=(0, 0, 0))
    draw.text((8, 8), label, fill=(255, 255, 255))
    return image


def blur(image: Image.Image) -> Image.Image:
    """What CONTENT_FILTERED returns: the image blurred beyond recognition (down-sampling makes it cheap)."""
    small = image.resize((max(1, image.width // 48), max(1, image.height // 48)), Image.Resampling.BILINEAR)
    return small.resize(image.size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(4))


def encode(image: Image.Image, output_format: str) -> bytes:
    out = io.BytesIO()
    if output_format == "png":
        image.save(out, format="PNG", compress_level=1)  # fast: tests make many of these
    elif output_format == "jpeg":
        image.convert("RGB").save(out, format="JPEG", quality=90)
    else:
        image.save(out, format="WEBP", quality=80, method=0)
    return out.getvalue()
