"""Errors a user can fix. The CLI prints their message as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: a missing file, a malformed budget, an untrusted pickle. The message says what was
    wrong and what to do; it is shown without a traceback."""

    exit_code = 2


class InfeasibleBudgetError(UserError):
    """No plan fits the budget; carries the smallest budget that would."""

    def __init__(self, message: str, smallest_feasible_bytes: int):
        super().__init__(message)
        self.smallest_feasible_bytes = int(smallest_feasible_bytes)


class DivergedError(UserError):
    """Training reached a loss (or weights) that is not a finite number: the run stops there, keeping the
    last good checkpoint, and says which epoch and step diverged."""

    def __init__(self, message: str, epoch: int, step: int):
        super().__init__(message)
        self.epoch, self.step = int(epoch), int(step)
