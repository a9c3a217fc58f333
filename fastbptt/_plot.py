"""matplotlib for the figures of the trainer, the benchmark and the diagnostics (imported lazily)."""
import os


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path, dpi=80):
    """``fig`` into ``path`` (its format from the suffix), written whole (a full disk leaves the
    file before as it was)"""
    from ._preflight import written_whole
    fig.tight_layout()
    with written_whole(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=os.path.splitext(str(path))[1][1:] or None)
    import matplotlib.pyplot as plt
    plt.close(fig)
