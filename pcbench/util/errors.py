"""The error every bad input raises: `SpecError(path, reason)`, shown as one line naming `path`."""


class SpecError(ValueError):
    """A spec field is missing, misspelt, of the wrong type or impossible."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")
