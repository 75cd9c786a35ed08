"""Figure files: the format is the one the file name's suffix names (fig.pdf is a PDF), written
atomically; a suffix matplotlib cannot write is refused before anything is drawn."""
from __future__ import annotations

from pathlib import Path

from errors import EvalError


def figure_format(path: Path) -> str:
    """'pdf' for fig.pdf; an EvalError for a suffix matplotlib does not write (or none)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.backend_bases import FigureCanvasBase

    known = FigureCanvasBase.get_supported_filetypes()
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in known:
        raise EvalError(f"cannot write a figure to {path}: give it one of the suffixes "
                        f"{', '.join('.' + k for k in sorted(known))}")
    return fmt


def save(fig, path: Path, dpi: int = 150) -> Path:
    """fig written to `path` in the suffix's format; never a half-written file."""
    from at.checkpoint import atomic_write

    fmt = figure_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))
    return path
