"""The built-in image task behind ``shapes:<count>[:<seed>]``: coloured shapes drawn with PIL.

The image counterpart of :mod:`spine_ttrl.arith`: :func:`generate_shapes` draws ``count`` images of
2-6 coloured squares, circles and triangles on a white canvas (each in its own cell of a 3 x 3 grid,
so none overlap), deterministically from a seed, and asks one question per image with a known
answer:

- *count*: "How many red squares are in the image?";
- *largest*: "What colour is the largest shape in the image?" (the largest is strictly largest);
- *shape*: "What shape is the blue object?" (asked when exactly one shape has that colour).

Every question is multiple choice (``choices`` set, the answer an option letter), so ``--task
auto`` votes on letters; counting questions offer four consecutive numbers. Images are kept as
PNG bytes in :attr:`~spine_ttrl.example.Example.images` (nothing is written to disk).
"""

from __future__ import annotations

import io
import random

from .example import DataError, Example

__all__ = ["SHAPES_USAGE", "generate_shapes", "parse_shapes_spec"]

SHAPES_USAGE = "shapes:<count>[:<seed>]"
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20),
           "purple": (140, 50, 170)}
SHAPES = ("square", "circle", "triangle")
CANVAS = 224
_CELL = CANVAS // 3
_LETTERS = "ABCDE"


def parse_shapes_spec(spec: str) -> tuple[int, int]:
    """``shapes:<count>[:<seed>]`` -> (count, seed); seed defaults to 0."""
    parts = spec.split(":")
    if parts[0] != "shapes" or not 2 <= len(parts) <= 3:
        raise DataError(f"bad shapes spec {spec!r}: expected {SHAPES_USAGE}")
    try:
        values = [int(p) for p in parts[1:]]
    except ValueError:
        raise DataError(f"bad shapes spec {spec!r}: count and seed must be integers; expected {SHAPES_USAGE}") from None
    count, seed = (values + [0])[:2]
    if count < 1:
        raise DataError(f"bad shapes spec {spec!r}: count must be >= 1, got {count}")
    return count, seed


def generate_shapes(count: int, seed: int = 0) -> list[Example]:
    """``count`` shape questions with their images; ids ``shapes-<seed>-<index:04d>``."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        scene = _scene(rng)
        kind = ("count", "largest", "shape")[len(out) % 3]
        made = {"count": _count_question, "largest": _largest_question, "shape": _shape_question}[kind](scene, rng)
        if made is None:
            continue
        prompt, options, answer = made
        out.append(Example(prompt=prompt, answer=_LETTERS[options.index(answer)], choices=tuple(options),
                           id=f"shapes-{seed}-{len(out):04d}", images=(_draw(scene),)))
    return out


def _scene(rng: random.Random) -> list[tuple[str, str, int, int, int]]:
    """(colour, shape, cell, size, jitter seed) for 2-6 shapes in distinct cells; sizes distinct."""
    n = rng.randint(2, 6)
    cells = rng.sample(range(9), n)
    sizes = rng.sample(range(20, _CELL - 8, 4), n)
    return [(rng.choice(list(COLOURS)), rng.choice(SHAPES), c, s, rng.randrange(1000)) for c, s in zip(cells, sizes)]


def _count_question(scene, rng):
    # mostly ask about a kind that is present, so answers are not nearly always 0
    colour, shape = rng.choice(scene)[:2] if rng.random() < 0.75 else (rng.choice(list(COLOURS)), rng.choice(SHAPES))
    n = sum(1 for c, s, *_ in scene if c == colour and s == shape)
    low = max(0, n - rng.randint(0, 3))
    options = [str(low + i) for i in range(4)]
    return f"How many {colour} {shape}s are in the image?", options, str(n)


def _largest_question(scene, rng):
    colour = max(scene, key=lambda x: x[3])[0]
    others = rng.sample([c for c in COLOURS if c != colour], 3)
    options = sorted(others + [colour])
    return "What colour is the largest shape in the image?", options, colour


def _shape_question(scene, rng):
    colours = [c for c, *_ in scene]
    unique = [c for c in colours if colours.count(c) == 1]
    if not unique:
        return None
    colour = rng.choice(unique)
    shape = next(s for c, s, *_ in scene if c == colour)
    return f"What shape is the {colour} object in the image?", list(SHAPES), shape


def _draw(scene) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (CANVAS, CANVAS), "white")
    draw = ImageDraw.Draw(im)
    for colour, shape, cell, size, jitter in scene:
        room = _CELL - size
        x0 = (cell % 3) * _CELL + jitter % (room + 1)
        y0 = (cell // 3) * _CELL + (jitter // 7) % (room + 1)
        box = (x0, y0, x0 + size, y0 + size)
        fill = COLOURS[colour]
        if shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
