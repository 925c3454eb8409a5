"""The studies, listed once: ``STUDIES`` maps each name to its study, in the order the
report shows them (the command line, the suite and the tests read it)."""

from . import (
    batch_size,
    convergence,
    dead_units,
    depth,
    dropout_order,
    init_depth,
    learning_rate,
    norm_free,
    norm_placement,
    qk_norm,
    regularization,
    sequence,
    train_eval_gap,
    weight_decay,
)

__all__ = ["STUDIES"]

STUDIES = {
    study.name: study
    for study in (
        init_depth.STUDY,
        batch_size.STUDY,
        convergence.STUDY,
        learning_rate.STUDY,
        dead_units.STUDY,
        train_eval_gap.STUDY,
        depth.STUDY,
        regularization.STUDY,
        dropout_order.STUDY,
        weight_decay.STUDY,
        sequence.STUDY,
        norm_placement.STUDY,
        norm_free.STUDY,
        qk_norm.STUDY,
    )
}
