"""
SVG drawn by hand, for the pictures of plot.py and inspect_adapter.py (no plotting library; browsers
show them): `tag` writes one element, `svg` a whole document.
"""


def tag(name, body="", **attrs):
    """One SVG element: tag("circle", cx=3, r=2) -> <circle cx="3.0" r="2"/>. stroke_width ->
    stroke-width; class_ -> class. Floats get one decimal: pixels need no more."""
    values = {k.rstrip("_").replace("_", "-"): f"{v:.1f}" if isinstance(v, float) else v
              for k, v in attrs.items()}
    text = " ".join(f'{k}="{v}"' for k, v in values.items())
    return f"<{name} {text}>{body}</{name}>" if body else f"<{name} {text}/>"


def svg(width, height, parts, font_size=12):
    """A document of width x height pixels on white, holding the elements `parts`."""
    head = tag("svg", "\n", xmlns="http://www.w3.org/2000/svg", width=width, height=height,
               font_family="sans-serif", font_size=font_size)[:-len("\n</svg>")]
    return "\n".join([head, tag("rect", width=width, height=height, fill="white"), *parts,
                      "</svg>"]) + "\n"
