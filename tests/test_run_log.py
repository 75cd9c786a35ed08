"""curves.png: whole-epoch ticks and a mark at the epoch best.pt holds."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from at import run_log  # noqa: E402


def _records(val=(10.0, 30.0, 25.0, 30.0)):
    return [{"epoch": e + 1, "loss": 2.0 - 0.1 * e, "train_adv_acc": 20.0 + e,
             "val_robust_acc": v, "avg_val_robust_acc": 40.0 - v} for e, v in enumerate(val)]


def test_best_epoch_follows_the_trainers_rule():
    # Strictly higher replaces best.pt: of two equal highs the first stays.
    assert run_log.best_epoch(_records()) == 2
    assert run_log.best_epoch(_records(), "avg") == 1
    assert run_log.best_epoch([{"epoch": 1, "loss": 1.0}]) is None  # no validation yet


def test_curves_have_whole_epoch_ticks_and_mark_the_best_epoch(tmp_path):
    # Two epochs: matplotlib's own ticks would be 1.0, 1.2, ..., 2.0.
    fig = run_log.curves_figure(_records((10.0, 30.0)))
    try:
        for ax in fig.axes:
            low, high = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if low <= t <= high]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
            marks = [line for line in ax.get_lines() if line.get_label().startswith("best.pt")]
            assert len(marks) == 1 and list(marks[0].get_xdata()) == [2, 2]
    finally:
        plt.close(fig)
    run_log.plot_curves(_records(), tmp_path / "curves.png", "model")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
