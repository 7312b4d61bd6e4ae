"""The end of a run on its best weights: when the last validation was not the best, the best
validated weights and the last ones are both scored on the whole validation split, and the run
ends on the better (as `load_best_model_at_end` does in Hugging Face's Trainer).

A time budget plans the steps ahead of time from a measured pace; on a small dataset the last of
them can overfit (a 10-minute CPU run takes ten epochs of 0.9M tokens), and the final weights are
then not the run's best model. The last state is kept as a resumable checkpoint, so resuming still
continues exactly where the steps stopped.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from cairn.checkpoint import store as ckpt

log = logging.getLogger(__name__)


def best_weights_step(trainer) -> Optional[int]:
    """The step of the run's best checkpoint, when it holds other weights than the model's now."""
    best = trainer.checkpointer.dir / f"{trainer.cfg.name}_best"
    if trainer.val_ds is None or not (best / "state.json").is_file():
        return None
    step = ckpt.read_checkpoint(best).meta["state"]["step"]
    return step if step != trainer.state.step else None


def end_on_best(trainer, last: dict, keep_last: Callable[[], object]) -> Optional[int]:
    """Score the best checkpoint's weights on the whole validation split against `last` (the
    last weights' whole-split result); keep the better in the model. When that is the best,
    `keep_last` saves the last state first. Returns the best weights' step when the run ends on
    them, else None."""
    step = trainer.dist.on_main(lambda: best_weights_step(trainer))
    if step is None:
        return None
    dist, model = trainer.dist, trainer.model
    # this rank's own tensors (under FSDP its shards), to put back if the last weights stay
    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # every rank reads the best checkpoint, as every rank reads the one a run resumes from
    best = ckpt.read_checkpoint(trainer.checkpointer.dir / f"{trainer.cfg.name}_best").model_state()
    dist.load_full_weights(model, best)
    r = trainer.evaluate(trainer.val_ds)
    better = r["loss"] < last["loss"]
    model.load_state_dict(current)
    if better:
        keep_last()  # the last state, saved before the model takes the best weights for good
        dist.load_full_weights(model, best)
    trainer.rundir.metrics.write({"kind": "end_on_best", "step": trainer.state.step, "best_step": step,
                                  "last_val_loss": last["loss"], "best_val_loss": r["loss"],
                                  "last_val_bits_per_byte": last["bits_per_byte"],
                                  "best_val_bits_per_byte": r["bits_per_byte"],
                                  "ends_on": "best" if better else "last"})
    if better:
        log.info(f"end: step {step}'s weights (the best validated) score {r['bits_per_byte']:.3f} bits/byte on the "
                 f"whole validation split, the last ones (step {trainer.state.step}) {last['bits_per_byte']:.3f}: "
                 f"the run ends on step {step}'s")
        return step
    log.info(f"end: the last weights score {last['bits_per_byte']:.3f} bits/byte on the whole validation split, "
             f"step {step}'s (the best of the samples) {r['bits_per_byte']:.3f}: the run ends on the last ones")
    return None
