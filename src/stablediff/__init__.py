"""stablediff: Stable Diffusion 1.x inference, written from the components up.

The public names are imported lazily so that `stablediff --help` and `import stablediff` stay fast
(torch is only imported when a model component is first used).
"""

__version__ = "0.1.0"

_LAZY = {
    "StableDiffusion": "stablediff.pipeline",
    "CLIPTokenizer": "stablediff.tokenizer",
    "SAMPLERS": "stablediff.samplers",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stablediff' has no attribute {name!r}")
