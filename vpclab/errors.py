"""The lab's exceptions."""


class LabError(Exception):
    """A lab operation failed, or was asked something invalid; the message says which."""


class Ec2Error(LabError):
    """EC2 (the lab's front, or moto behind it) answered with an error."""

    def __init__(self, code: str, message: str, status: int):
        super().__init__(f"{code}: {message} (HTTP {status})")
        self.code = code
        self.message = message
        self.status = status
