"""Prompt templates that turn class names into captions and zero-shot heads."""
import os

# The 80 prompt templates OpenAI used for ImageNet zero-shot classification (CLIP paper, and
# the FLYP/CaRot training captions).
OPENAI_IMAGENET = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.",
    "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.",
    "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.",
    "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

# A short set for quick runs (the subset OpenAI's notebook recommends as a cheaper ensemble).
SHORT = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)

SETS = {"openai": OPENAI_IMAGENET, "short": SHORT, "simple": ("a photo of a {}.",)}


def read_file(path: str) -> tuple[str, ...]:
    """Templates from a file, one a line, with `{c}` (clip_benchmark's
    zeroshot_classification_templates.txt) or `{}` where the class name goes."""
    try:
        with open(path) as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"templates: cannot read {path!r} ({exc})") from None
    missing = [t for t in lines if "{c}" not in t and "{}" not in t]
    if not lines or missing:
        raise ValueError(f"templates: {path!r} must hold templates one a line, each with {{c}} or {{}} "
                         f"where the class name goes" + (f" (not {missing[0]!r})" if missing else ""))
    return tuple(t.replace("{c}", "{}") for t in lines)


def get(name_or_templates) -> tuple[str, ...]:
    """A template set by name ("openai", "short", "simple"), a file of templates (read_file) or an
    explicit sequence."""
    if isinstance(name_or_templates, str):
        if name_or_templates in SETS:
            return SETS[name_or_templates]
        if os.path.isfile(name_or_templates):
            return read_file(name_or_templates)
        raise ValueError(f"templates: unknown set {name_or_templates!r}; choose from {sorted(SETS)} "
                         f"or give a file of templates")
    templates = tuple(name_or_templates)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("templates: need a non-empty sequence of strings each containing '{}'")
    return templates
