"""The time budget, in one place: the `Budget` that owns a run's plan and deadline (`budget`), the
arithmetic of fitting steps to seconds (`plan`), measuring a run's costs (`calibrate`), and
turning spare compute into a wider model (`growth`)."""
