"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (recipe, flag, data file). The message names the problem and the fix."""


class MissingFile(UserError):
    """A data, image or checkpoint file that should exist does not."""

    def __init__(self, path, what: str, fix: str = ""):
        msg = f"missing {what}: {path}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)
        self.path = path
